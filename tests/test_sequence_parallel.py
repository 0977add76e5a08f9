"""ops.sequence_parallel_attention against the dense reference on the global sequence (8 fake devices).

Each case runs output and dq, dk, dv through sum(out * cos(out)) in one compiled program; the
cases cover every ring x ulysses split, both layouts, causal and not, GQA/MQA with Hkv < u,
segments and sliding windows that cross shard boundaries, and a data axis beside the sequence
axes on Explicit and Auto meshes, features combined per case to keep the file fast.
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lcjax.ops import attention, reference_attention
from lcjax.ops import ring
from lcjax.ops.layouts import ring_block_starts, sequence_layout
from lcjax.ops.sequence_parallel import check_sequence_parallel, sequence_parallel_attention

EXPLICIT, AUTO = AxisType.Explicit, AxisType.Auto


@dataclasses.dataclass(frozen=True)
class Case:
  ring: int
  ulysses: int
  strategy: str = "usp"
  layout: str = "zigzag"
  causal: bool = True
  heads: int = 4
  kv_heads: int = 2
  seq: int = 32
  batch: int = 1
  data: int = 1
  window: int | None = None
  segments: str | None = None  # None | "docs" (shared ids) | "docs_restart" (+ per-doc positions)
  softcap: float | None = None
  axis_type: AxisType = EXPLICIT
  dtype: str = "float32"

  def __str__(self):
    fields = [f"{self.strategy}-{self.ring}x{self.ulysses}", self.layout,
              "causal" if self.causal else "full", f"H{self.heads}K{self.kv_heads}"]
    fields += [f"data{self.data}"] * (self.data > 1) + [f"w{self.window}"] * bool(self.window)
    fields += [self.segments] * bool(self.segments) + ["softcap"] * bool(self.softcap)
    return "-".join(fields + ["auto"] * (self.axis_type == AUTO))


CASES = [
    Case(1, 8, heads=8, kv_heads=2, segments="docs"),  # Hkv < u: kv heads repeated 4x
    Case(2, 4, window=5, seq=48),
    Case(4, 2, heads=6, kv_heads=2, segments="docs_restart", window=7),  # GQA 3:1
    Case(8, 1, heads=5, kv_heads=1, window=9, segments="docs"),  # MQA, odd head count
    Case(1, 8, layout="contiguous", causal=False, heads=8, kv_heads=8),
    Case(2, 4, layout="contiguous", heads=4, kv_heads=4, segments="docs", seq=40),
    Case(4, 2, layout="contiguous", causal=False, window=6),
    Case(8, 1, layout="contiguous", heads=3, kv_heads=1),
    Case(2, 4, strategy="ring", heads=3, kv_heads=1, window=11, segments="docs"),
    Case(4, 2, strategy="ulysses", heads=8, kv_heads=2, causal=False),
    Case(2, 4, strategy="allgather", heads=3, kv_heads=1, window=10, segments="docs"),
    Case(8, 1, strategy="allgather", layout="contiguous", causal=False),
    Case(2, 2, data=2, batch=2, segments="docs", window=8),
    Case(2, 2, data=2, batch=2, heads=4, kv_heads=1, softcap=5.0, axis_type=AUTO),
    Case(2, 2, data=2, batch=1, strategy="ring", layout="contiguous", causal=False),
]


def _mesh(case):
  return jax.make_mesh((case.data, case.ring, case.ulysses), ("data", "ring", "ulysses"),
                       axis_types=(case.axis_type,) * 3)


def _inputs(case, seed=0):
  """Global-order q, k, v, segment ids and positions (per-document with 'docs_restart')."""
  kq, kk, kv, ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  B, S, D = case.batch, case.seq, 8
  q = jax.random.normal(kq, (B, S, case.heads, D), jnp.float32)
  k = jax.random.normal(kk, (B, S, case.kv_heads, D), jnp.float32)
  v = jax.random.normal(kv, (B, S, case.kv_heads, D), jnp.float32)
  pos = np.broadcast_to(np.arange(S), (B, S)).astype(np.int32)
  seg = None
  if case.segments:
    # documents of random lengths, boundaries not aligned with any shard
    cuts = np.sort(np.asarray(jax.random.choice(ks, np.arange(1, S), (B, 3), replace=False)), 1)
    seg = np.stack([np.searchsorted(c, np.arange(S), side="right") for c in cuts]).astype(np.int32)
    if case.segments == "docs_restart":
      starts = np.stack([np.concatenate([[0], c])[s] for c, s in zip(cuts, seg)])
      pos = (pos - starts).astype(np.int32)
  return q, k, v, seg, pos


def _loss(out):
  return jnp.sum(out * jnp.cos(out))


def _reference(case, q, k, v, seg, pos, **extra):
  def loss(q, k, v):
    out = reference_attention(q, k, v, causal=case.causal, q_segment_ids=seg, kv_segment_ids=seg,
                              q_positions=pos, kv_positions=pos, sliding_window=case.window,
                              softcap=case.softcap, **extra)
    return _loss(out), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _sharded(case, mesh, x):
  """Stored-order array placed with its batch over data and its sequence over (ring, ulysses)."""
  spec = P("data" if case.data > 1 and case.batch % case.data == 0 else None, ("ring", "ulysses"))
  return jax.device_put(x, NamedSharding(mesh, spec))


def _run(case, q, k, v, seg, pos, **extra):
  """Output and grads of the sequence-parallel path, in stored order."""
  mesh = _mesh(case)
  perm = sequence_layout(case.seq, case.ring, case.ulysses, case.layout)
  store = lambda x: None if x is None else _sharded(case, mesh, np.asarray(x)[:, perm])
  seg_s = store(seg)
  pos_s = store(pos) if case.segments == "docs_restart" else None  # else: the default positions

  def loss(q, k, v):
    out = sequence_parallel_attention(
        q, k, v, mesh=mesh, strategy=case.strategy, layout=case.layout, causal=case.causal,
        q_segment_ids=seg_s, kv_segment_ids=seg_s, q_positions=pos_s, kv_positions=pos_s,
        sliding_window=case.window, softcap=case.softcap, implementation="reference", **extra)
    return _loss(out), out

  with jax.set_mesh(mesh):
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = fn(store(q), store(k), store(v))
  return perm, out, grads


def _close(got, want, rtol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
  assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
  q, k, v, seg, pos = _inputs(case)
  out_ref, grads_ref = _reference(case, q, k, v, seg, pos)
  perm, out, grads = _run(case, q, k, v, seg, pos)
  assert out.sharding.spec[1] == ("ring", "ulysses") or case.axis_type == AUTO
  _close(out, np.asarray(out_ref)[:, perm], 1e-5)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert g.shape == g_ref.shape, name
    _close(g, np.asarray(g_ref)[:, perm], 1e-5)


def test_lse_and_empty_rows():
  """Queries with no allowed key give out 0 and lse -inf, and finite gradients through lse."""
  case = Case(2, 4, heads=4, kv_heads=2, seq=48)
  q, k, v, _, _ = _inputs(case, seed=1)
  q_seg = np.zeros((1, 48), np.int32)
  q_seg[0, [5, 20, 33]] = 7  # no key has segment 7
  kv_seg = np.zeros((1, 48), np.int32)
  kv_seg[0, [0, 30, 31]] = -1  # padding keys nobody may attend
  mesh = _mesh(case)
  perm = sequence_layout(48, 2, 4, "zigzag")
  store = lambda x: _sharded(case, mesh, np.asarray(x)[:, perm])

  def loss(fn, q, k, v, *segs):
    out, lse = fn(q, k, v, *segs)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return _loss(out) + jnp.sum(jnp.sin(finite)), (out, lse)

  ref = lambda q, k, v, qs, ks: attention(
      q, k, v, causal=True, q_segment_ids=qs, kv_segment_ids=ks, return_lse=True,
      implementation="reference")
  sp = lambda q, k, v, qs, ks: sequence_parallel_attention(
      q, k, v, mesh=mesh, causal=True, q_segment_ids=qs, kv_segment_ids=ks, return_lse=True,
      implementation="reference")
  grad = lambda fn: jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True)
  (_, (out_ref, lse_ref)), g_ref = grad(ref)(q, k, v, jnp.asarray(q_seg), jnp.asarray(kv_seg))
  with jax.set_mesh(mesh):
    (_, (out, lse)), g = jax.jit(grad(sp))(*(store(x) for x in (q, k, v, q_seg, kv_seg)))
  empty = np.asarray(q_seg[0, perm] == 7)
  assert np.all(np.isneginf(np.asarray(lse)[0][:, empty]))
  assert np.all(np.asarray(out)[0][empty] == 0)
  _close(out, np.asarray(out_ref)[:, perm], 1e-5)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(np.asarray(lse_ref)[:, :, perm]))
  finite = np.isfinite(np.asarray(lse_ref)[:, :, perm])
  _close(np.asarray(lse)[finite], np.asarray(lse_ref)[:, :, perm][finite], 1e-6)
  for got, want in zip(g, g_ref):
    assert np.all(np.isfinite(got))
    _close(got, np.asarray(want)[:, perm], 1e-5)


def _plain_bf16_attention(q, k, v, pos):
  """A plain bf16 implementation: every step in bf16 (DESIGN.md's bf16 yardstick)."""
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, 2), jnp.repeat(v, G, 2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  s = jnp.where(pos[:, None, None, :] <= pos[:, None, :, None], s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def test_bfloat16_error_within_plain_bf16():
  """bf16 inputs: error against float32 at most 2x (out) / 3x (grads) that of plain bf16."""
  case = Case(4, 2, heads=4, kv_heads=2, seq=32)
  q, k, v, _, pos = _inputs(case, seed=2)
  out32, g32 = _reference(case, q, k, v, None, pos)
  bf = lambda x: x.astype(jnp.bfloat16)
  plain = jax.value_and_grad(lambda *a: (_loss(_plain_bf16_attention(*a, pos)).astype(jnp.float32),
                                         _plain_bf16_attention(*a, pos)),
                             argnums=(0, 1, 2), has_aux=True)
  (_, out_plain), g_plain = plain(bf(q), bf(k), bf(v))
  perm, out, g = _run(dataclasses.replace(case, dtype="bfloat16"), bf(q), bf(k), bf(v), None, pos)
  assert out.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in g)
  err = lambda a, b: np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  assert err(out, np.asarray(out32)[:, perm]) <= 2 * err(out_plain, out32)
  for got, want, base in zip(g, g32, g_plain):
    assert err(got, np.asarray(want)[:, perm]) <= 3 * err(base, want)


def test_ring_skips_masked_block_pairs_and_balances_zigzag():
  """Causal zigzag: every member computes 2R+1 of its 4R block pairs; contiguous is unbalanced."""
  R = 4
  for layout, want in (("zigzag", [2 * R + 1] * R), ("contiguous", [1, 2, 3, 4])):
    starts, half = ring_block_starts(64, R, 1, layout, ring_over_ulysses=False)
    spec = ring.RingSpec(axes=("ring",), starts=tuple(map(tuple, starts.tolist())),
                         half_len=half, causal=True)
    live = [sum(bool(ring._may_attend(spec, starts[me][i], starts[(me - s) % R][j]))
                for s in range(R) for i in range(spec.halves) for j in range(spec.halves))
            for me in range(R)]
    assert live == want, (layout, live)
  window = ring.RingSpec(axes=("ring",), starts=((0,), (16,), (32,), (48,)), half_len=16,
                         causal=True, sliding_window=4)
  assert not ring._may_attend(window, 48, 16) and ring._may_attend(window, 48, 32)


_COLLECTIVES = {"usp": {"all-to-all", "collective-permute"}, "ring": {"collective-permute"},
                "ulysses": {"all-to-all"}, "allgather": {"all-gather", "reduce-scatter"}}


@pytest.mark.parametrize("strategy", sorted(_COLLECTIVES))
def test_compiled_program_structure(strategy):
  """Each strategy's collectives are in the compiled fwd+bwd program, and no array has two
  global-sequence dimensions (blockwise local attention, S above its block size)."""
  S, R, U = 2304, 2, 4
  mesh = jax.make_mesh((R, U), ("ring", "ulysses"), axis_types=(EXPLICIT,) * 2)
  spec = NamedSharding(mesh, P(None, ("ring", "ulysses")))
  shape = lambda h: jax.ShapeDtypeStruct((1, S, h, 8), jnp.float32, sharding=spec)
  loss = lambda q, k, v: _loss(sequence_parallel_attention(
      q, k, v, mesh=mesh, strategy=strategy, causal=True, implementation="xla"))
  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        shape(8), shape(4), shape(4)).compile().as_text()
  kinds = {k for k in ("all-to-all", "collective-permute", "all-gather", "reduce-scatter")
           if re.search(rf"\s{k}(-start)?\(", hlo)}
  assert kinds == _COLLECTIVES[strategy] | ({"all-gather"} if strategy in ("usp", "ulysses")
                                            else set()), kinds  # ids gathered with Ulysses
  dims = [[int(d) for d in m.split(",") if d] for m in re.findall(r"\w+\[([\d,]+)\]", hlo)]
  assert not [d for d in dims if d.count(S) >= 2]


def test_invalid_configurations_raise():
  mesh = jax.make_mesh((2, 4), ("ring", "ulysses"), axis_types=(EXPLICIT,) * 2)
  x = lambda s, h: jnp.zeros((1, s, h, 8))
  with pytest.raises(ValueError, match=r"sequence length 36 .* 2 \* 2 \* 4 = 16 .* 32 or 48"):
    sequence_parallel_attention(x(36, 4), x(36, 4), x(36, 4), mesh=mesh)
  with pytest.raises(ValueError, match=r"sequence length 36 .* ring \* ulysses = 2 \* 4 = 8"):
    sequence_parallel_attention(x(36, 4), x(36, 4), x(36, 4), mesh=mesh, layout="contiguous")
  with pytest.raises(ValueError, match=r"query heads \(6\) .* Ulysses degree \(4\)"):
    sequence_parallel_attention(x(32, 6), x(32, 2), x(32, 2), mesh=mesh)
  with pytest.raises(ValueError, match=r"query heads \(4\) .* Ulysses degree \(8\)"):
    sequence_parallel_attention(x(32, 4), x(32, 2), x(32, 2), mesh=mesh, strategy="ulysses")
  with pytest.raises(ValueError, match="unknown sequence-parallel strategy"):
    sequence_parallel_attention(x(32, 4), x(32, 2), x(32, 2), mesh=mesh, strategy="tree")
  with pytest.raises(ValueError, match="unknown sequence layout"):
    sequence_parallel_attention(x(32, 4), x(32, 2), x(32, 2), mesh=mesh, layout="striped")
  with pytest.raises(ValueError, match="share batch and length"):
    sequence_parallel_attention(x(32, 4), x(16, 2), x(16, 2), mesh=mesh)
  with pytest.raises(ValueError, match="pass both q_segment_ids and kv_segment_ids"):
    sequence_parallel_attention(x(32, 4), x(32, 2), x(32, 2), mesh=mesh,
                                q_segment_ids=jnp.zeros((1, 32), jnp.int32))
  with pytest.raises(ValueError, match=r"q_positions must have shape \(B, S\)"):
    sequence_parallel_attention(x(32, 4), x(32, 2), x(32, 2), mesh=mesh,
                                q_positions=jnp.zeros((32,), jnp.int32),
                                kv_positions=jnp.zeros((32,), jnp.int32))
  with pytest.raises(ValueError, match="batch_axes"):
    sequence_parallel_attention(x(32, 4), x(32, 2), x(32, 2), mesh=mesh, batch_axes="ring")
  # the same checks at config time, before any array exists
  check_sequence_parallel(32, 8, 1 << 17, ring_size=4, ulysses_size=8, strategy="usp",
                          layout="zigzag")
  with pytest.raises(ValueError, match="kv heads"):
    check_sequence_parallel(6, 4, 64, ring_size=2, ulysses_size=1, strategy="ring",
                            layout="zigzag")
