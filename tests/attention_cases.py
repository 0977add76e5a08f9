"""Shared helpers of the attention tests: cases, fresh random inputs, float64 reference, errors."""
import dataclasses
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.ops.blockwise import blockwise_attention
from lcjax.ops.layouts import sequence_layout
from lcjax.ops.pallas_attention import pallas_attention
from lcjax.ops.reference import reference_attention

NO_KEY_SEGMENT = 99  # a query segment id that no key carries: those rows are empty
# Tests compile many small programs: skip LLVM's expensive passes (halves compile time on CPU).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem; q positions are arange(Tq) + q_offset, kv positions arange(Tk)."""
  Tq: int = 77
  Tk: int = 77
  H: int = 6
  K: int = 2
  D: int = 16
  B: int = 2
  causal: bool = False
  segments: bool = False
  window: int | None = None
  softcap: float | None = None
  scale: float | None = None
  q_offset: int = 0
  empty_rows: bool = False  # some queries get NO_KEY_SEGMENT (needs segments)
  shuffled_segments: bool = False  # segment ids not sorted: blocks mix many segments
  # (ring size, q shard, kv shard): positions are those shards of the zigzag layout of a global
  # sequence of ring * Tq tokens (Tq == Tk), as a ring step sees them; q_offset is then unused
  zigzag: tuple[int, int, int] | None = None

  @property
  def id(self):
    flags = [n for n in ("causal", "segments", "empty_rows", "shuffled_segments") if getattr(self, n)]
    extra = [f"{n}{getattr(self, n)}" for n in ("window", "softcap", "scale", "q_offset")
             if getattr(self, n)]
    if self.zigzag:
      extra.append("zigzag" + "_".join(map(str, self.zigzag)))
    return "-".join([f"T{self.Tq}x{self.Tk}", f"H{self.H}K{self.K}D{self.D}", *flags, *extra])


def make_inputs(case: Case, dtype=np.float32):
  """Fresh random q, k, v (seeded by the case) and the keyword arguments of ops.attention."""
  rng = np.random.default_rng(zlib.crc32(case.id.encode()))
  q = rng.standard_normal((case.B, case.Tq, case.H, case.D))
  k, v = (rng.standard_normal((case.B, case.Tk, case.K, case.D)) for _ in range(2))
  qpos = np.broadcast_to(np.arange(case.Tq) + case.q_offset, (case.B, case.Tq)).astype(np.int32)
  kpos = np.broadcast_to(np.arange(case.Tk), (case.B, case.Tk)).astype(np.int32)
  if case.zigzag:
    ring, q_shard, kv_shard = case.zigzag
    assert case.Tq == case.Tk, case
    stored = sequence_layout(ring * case.Tq, ring, 1, "zigzag").reshape(ring, case.Tq)
    qpos, kpos = (np.broadcast_to(stored[s], (case.B, case.Tq)) for s in (q_shard, kv_shard))
  kw = dict(q_positions=qpos, kv_positions=kpos, causal=case.causal,
            sliding_window=case.window, softcap=case.softcap, scale=case.scale)
  if case.segments:  # documents on global positions, as packed data gives them
    lo, hi = min(qpos.min(), 0), max(qpos.max(), kpos.max() + 1) + 1
    bounds = np.sort(rng.integers(lo, hi, (case.B, 4)), axis=1)
    qseg = np.stack([np.searchsorted(b, p, side="right") for b, p in zip(bounds, qpos)])
    kseg = np.stack([np.searchsorted(b, p, side="right") for b, p in zip(bounds, kpos)])
    if case.shuffled_segments:
      qseg, kseg = qseg % 2, rng.permutation(kseg % 2, axis=1)
    if case.empty_rows:
      qseg[:, rng.choice(case.Tq, case.Tq // 5, replace=False)] = NO_KEY_SEGMENT
    kw.update(q_segment_ids=qseg.astype(np.int32), kv_segment_ids=kseg.astype(np.int32))
  return tuple(x.astype(dtype) for x in (q, k, v)), kw


def value_and_grads(attend, q, k, v):
  """(out, lse, [dq, dk, dv]) as numpy; grads of sum(out cos out) + sum(sin lse) over finite lse."""
  def loss(q, k, v):
    out, lse = attend(q, k, v)
    o = out.astype(jnp.promote_types(out.dtype, jnp.float32))
    total = jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))
    return total, (out, lse)

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
  grads, (out, lse) = grad_fn.lower(q, k, v).compile(FAST_COMPILE)(q, k, v)
  return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


def reference64(q, k, v, kw, **extra):
  """Reference out, lse and grads computed in float64 (x64 switched on only here)."""
  with jax.enable_x64(True):
    args = [np.asarray(x, np.float64) for x in (q, k, v)]
    return value_and_grads(
        lambda q, k, v: reference_attention(q, k, v, return_lse=True, **kw, **extra), *args)


def rel_err(x, ref):
  """Relative Frobenius error over the finite entries of ref; -inf entries must match exactly."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  finite = np.isfinite(ref)
  np.testing.assert_array_equal(np.isneginf(x), np.isneginf(ref))
  assert not np.isnan(x).any()
  diff = np.where(finite, x - np.where(finite, ref, 0.0), 0.0)
  return np.linalg.norm(diff) / max(np.linalg.norm(np.where(finite, ref, 0.0)), 1e-30)


def errors(result, ref):
  """[out, lse, dq, dk, dv] relative errors of an (out, lse, grads) triple against the reference."""
  (out, lse, grads), (rout, rlse, rgrads) = result, ref
  return [rel_err(out, rout), rel_err(lse, rlse)] + [rel_err(g, r) for g, r in zip(grads, rgrads)]


def check_f32(attend, case: Case):
  """f32 inputs against the float64 reference: rel. Frobenius < 2e-5 forward, < 1e-4 gradients."""
  (q, k, v), kw = make_inputs(case)
  errs = errors(value_and_grads(lambda q, k, v: attend(q, k, v, kw), q, k, v),
                reference64(q, k, v, _filled(kw, case)))
  names = ["out", "lse", "dq", "dk", "dv"]
  assert all(e < 2e-5 for e in errs[:2]), dict(zip(names, errs))
  assert all(e < 1e-4 for e in errs[2:]), dict(zip(names, errs))


def check_bf16(attend, case: Case):
  """bf16 error against float64 at most 2x (forward) / 3x (grads) that of a plain bf16 dense run."""
  (q, k, v), kw = make_inputs(case)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  ref = reference64(q, k, v, _filled(kw, case))
  plain = value_and_grads(lambda q, k, v: reference_attention(
      q, k, v, return_lse=True, compute_dtype=jnp.bfloat16, **_filled(kw, case)), q, k, v)
  got = errors(value_and_grads(lambda q, k, v: attend(q, k, v, kw), q, k, v), ref)
  base = errors(plain, ref)
  bounds = [2, 2, 3, 3, 3]
  assert all(g <= b * e for g, b, e in zip(got, bounds, base)), (got, base)


def _filled(kw, case: Case):
  """kw with the default scale filled in, as ops.attention passes it on."""
  return dict(kw, scale=case.D ** -0.5 if case.scale is None else case.scale)


def semantic_cases():
  """causal x segments x window x softcap, each with a GQA ratio (1, 3, Hq), odd lengths, Tq != Tk
  with offsets (queries after, among or before the keys) and empty rows cycled through them."""
  heads = [(5, 5), (6, 2), (6, 1)]
  lengths = [(77, 77, 0), (130, 130, 0), (200, 200, 0), (77, 130, 53), (130, 77, 77),
             (77, 200, -60)]
  cases = []
  for n, (causal, segments, window, softcap) in enumerate(itertools.product(
      (False, True), (False, True), (None, 37), (None, 5.0))):
    (H, K), (Tq, Tk, offset) = heads[n % 3], lengths[n % 6]
    cases.append(Case(Tq=Tq, Tk=Tk, H=H, K=K, causal=causal, segments=segments, window=window,
                      softcap=softcap, scale=0.3 if n % 4 == 1 else None, q_offset=offset,
                      empty_rows=segments and n % 2 == 0))
  cases.append(Case(Tq=130, Tk=130, segments=True, shuffled_segments=True, causal=True))
  cases.append(Case(Tq=77, Tk=130, causal=True, q_offset=-200))  # every row empty
  return cases


def blocked(implementation, block_sizes=None, interpret=True):
  """attend(q, k, v, kw) for the module function behind "xla" or "pallas", with given blocks."""
  def attend(q, k, v, kw):
    kw = {"q_segment_ids": None, "kv_segment_ids": None, **kw}
    kw["scale"] = q.shape[-1] ** -0.5 if kw["scale"] is None else kw["scale"]
    if implementation == "xla":
      return blockwise_attention(q, k, v, block_sizes=block_sizes, **kw)
    return pallas_attention(q, k, v, interpret=interpret, block_sizes=block_sizes, **kw)
  return attend
