"""cuDNN attention (ops/cudnn_attention.py): what it accepts and refuses, the lowering to cuDNN's
fused attention for compile-only H100s (local, sliding window, GQA, Ulysses, USP ring, the
model's layer, a training step), and its ring/LSE logic on CPU with cuDNN's two kernels replaced
by float32 emulations of their contracts. Numerics of the real kernels need a GPU:
scripts/gpu_check.py.
"""
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from attention_cases import rel_err
from conftest import tiny_config
from lcjax import config as config_lib
from lcjax import mesh as mesh_lib
from lcjax import ops, targets
from lcjax.model.attention import Attention
from lcjax.model.config import ModelConfig
from lcjax.ops import cudnn_attention
from lcjax.ops.reference import allowed_mask, reference_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cudnn_config(**model):
  c = tiny_config()
  c.model.update(attention="cudnn", dtype="bfloat16", document_mask=False, **model)
  return c


# --- what the config and the op accept ---------------------------------------------------------

def test_config_accepts_cudnn_with_what_it_needs():
  assert "cudnn" in config_lib.ATTENTION_IMPLEMENTATIONS and "cudnn" in ops.IMPLEMENTATIONS
  assert config_lib.validate(_cudnn_config(sliding_window=16)).model.attention == "cudnn"
  c = _cudnn_config()
  c.mesh.update(data=2, fsdp=1, ring=2, ulysses=2)
  c.sp.strategy = "usp"
  assert config_lib.validate(c).sp.strategy == "usp"


@pytest.mark.parametrize("change, message", [
    ({"model.dtype": "float32"}, r"cudnn.*bfloat16.*model.dtype='bfloat16'"),
    ({"model.document_mask": True}, r"cannot mask packed documents.*model.document_mask=False"),
    ({"model.head_dim": 12}, r"multiple of 8.*got 12"),
    ({"mesh.ring": 2, "mesh.fsdp": 2, "sp.strategy": "allgather"},
     r"all-gather.*usp, ulysses or ring"),
    ({"mesh.ring": 2, "mesh.fsdp": 2, "sp.strategy": "auto"}, r"'auto' may choose"),
    ({"mesh.ring": 2, "mesh.fsdp": 2, "model.sliding_window": 8},
     r"sliding_window=8 with a ring.*sp.strategy='ulysses'"),
])
def test_config_refuses_what_cudnn_cannot_do(change, message):
  c = _cudnn_config()
  for dotted, value in change.items():
    section, key = dotted.split(".")
    c[section][key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_on_cpu_cudnn_says_it_needs_a_gpu():
  q = jnp.zeros((1, 16, 2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"needs a GPU: this program is compiled for 'cpu'.*gpu:h1"):
    ops.attention(q, q, q, causal=True, implementation="cudnn")
  mesh = jax.make_mesh((8,), ("ring",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match=r"needs a GPU"):
    ops.sequence_parallel_attention(jnp.zeros((1, 32, 2, 8), jnp.bfloat16),
                                    jnp.zeros((1, 32, 2, 8), jnp.bfloat16),
                                    jnp.zeros((1, 32, 2, 8), jnp.bfloat16), mesh=mesh,
                                    strategy="ring", causal=True, implementation="cudnn")


@pytest.fixture(scope="module")
def h100():
  if not targets.have_gpu_compiler():
    pytest.skip(f"the CUDA plugin is not installed: {targets.INSTALL}")
  return targets.parse("gpu:h100:8")


def _mesh(target, **sizes):
  return mesh_lib.make_mesh({a: sizes.get(a, 1) for a in mesh_lib.AXES}, devices=target.devices())


def _sds(shape, dtype=jnp.bfloat16, sharding=None):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


@pytest.mark.parametrize("kw, message", [
    (dict(softcap=30.0), r"no softcap"),
    (dict(segments=True), r"no segment ids.*model.document_mask=False"),
    (dict(positions=True), r"masks by token index and takes no positions"),
    (dict(causal=False, sliding_window=8), r"sliding window is causal.*causal=True"),
    (dict(dtype=jnp.float32), r"bfloat16 or float16 q/k/v, got float32"),
    (dict(D=12), r"multiple of 8 and at most 256 on NVIDIA H100.*got 12"),
    (dict(D=264), r"at most 256 .*got 264"),
])
def test_op_refuses_before_compiling(h100, kw, message):
  kw = dict(dict(causal=True, dtype=jnp.bfloat16, D=16), **kw)
  B, T, dt, D = 8, 64, kw.pop("dtype"), kw.pop("D")
  ids = jnp.zeros((B, T), jnp.int32)
  extra = {}
  if kw.pop("segments", False):
    extra.update(q_segment_ids=ids, kv_segment_ids=ids)
  if kw.pop("positions", False):
    extra.update(q_positions=ids, kv_positions=ids)
  with jax.set_mesh(_mesh(h100, data=8)), pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda q: ops.attention(q, q, q, implementation="cudnn", **kw, **extra),
                   _sds((B, T, 2, D), dt))


def test_sequence_parallel_refusals(h100):
  mesh = _mesh(h100, ring=2, ulysses=4)
  spec = NamedSharding(mesh, P(None, ("ring", "ulysses")))
  q = _sds((1, 128, 8, 16), sharding=spec)

  def run(segments=False, **kw):
    def f(q, ids):
      if segments:
        kw.update(q_segment_ids=ids, kv_segment_ids=ids)
      return ops.sequence_parallel_attention(q, q, q, mesh=jax.sharding.get_abstract_mesh(),
                                             causal=True, implementation="cudnn", **kw)
    return jax.eval_shape(f, q, _sds((1, 128), jnp.int32, NamedSharding(mesh, P())))

  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match=r"'allgather'.*all-gather attends local queries"):
      run(strategy="allgather")
    with pytest.raises(ValueError, match=r"ring attention .*cannot window"):
      run(strategy="usp", sliding_window=16)
    with pytest.raises(ValueError, match=r"takes no segment ids"):
      run(strategy="ulysses", segments=True)
    assert run(strategy="ulysses", sliding_window=16).shape == q.shape  # no ring: windows work


# --- compiled for H100 -------------------------------------------------------------------------

def _fmha_calls(hlo):
  """{custom call target: [cudnn_fmha_backend_config dicts]} of cuDNN's fused attention."""
  calls = {}
  for line in hlo.splitlines():
    m = re.search(r'custom_call_target="(__cudnn\$fmha\w+)"', line)
    if m:
      config = json.JSONDecoder().raw_decode(line, line.index("backend_config=") + 15)[0]
      calls.setdefault(m.group(1), []).append(config["cudnn_fmha_backend_config"])
  return calls


def _loss_and_grads(attend):
  def loss(q, k, v):
    out, lse = attend(q, k, v)
    o = out.astype(jnp.float32)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.sin(lse))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("H, K, window", [(4, 4, None), (6, 2, None), (4, 1, 48)],
                         ids=["mha-causal", "gqa3-causal", "mqa-window48"])
def test_local_attention_lowers_to_cudnn_fwd_and_bwd(h100, H, K, window):
  mesh = _mesh(h100, data=8)
  spec = NamedSharding(mesh, P("data"))
  B, T, D = 8, 200, 64
  q, kv = _sds((B, T, H, D), sharding=spec), _sds((B, T, K, D), sharding=spec)
  attend = lambda q, k, v: ops.attention(q, k, v, causal=True, sliding_window=window,
                                         return_lse=True, implementation="cudnn")
  with jax.set_mesh(mesh):
    hlo = _loss_and_grads(attend).lower(q, kv, kv).compile().as_text()
  calls = _fmha_calls(hlo)
  assert set(calls) == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}, calls.keys()
  for config in calls["__cudnn$fmhaSoftmax"] + calls["__cudnn$fmhaSoftmaxBackward"]:
    assert (config["mask_type"], config["sliding_window_length"]) == ("CAUSAL", window or 0)
  # GQA without repeating K/V: the backward's dk has K heads (and the lse cotangent's 8 columns)
  bwd = [l for l in hlo.splitlines() if "fmhaSoftmaxBackward" in l and "custom-call(" in l]
  assert f"bf16[1,{K},{T},{D + cudnn_attention.EXTRA}]" in bwd[0], bwd[0][:300]


def test_ulysses_usp_and_ring_lower_to_cudnn(h100):
  mesh = _mesh(h100, data=2, ring=2, ulysses=2)
  spec = NamedSharding(mesh, P("data", ("ring", "ulysses")))
  B, S, H, K, D = 2, 256, 4, 2, 64
  q, kv = _sds((B, S, H, D), sharding=spec), _sds((B, S, K, D), sharding=spec)
  for strategy, layout in (("ulysses", "zigzag"), ("usp", "zigzag"), ("ring", "contiguous")):
    def attend(q, k, v):
      return ops.sequence_parallel_attention(
          q, k, v, mesh=jax.sharding.get_abstract_mesh(), strategy=strategy, layout=layout,
          causal=True, return_lse=True, implementation="cudnn")
    with jax.set_mesh(mesh):
      hlo = _loss_and_grads(attend).lower(q, kv, kv).compile().as_text()
    calls = _fmha_calls(hlo)
    assert set(calls) == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}, strategy
    masks = {c["mask_type"] for c in sum(calls.values(), [])}
    # a ring's blocks are causal on the diagonal and unmasked below it
    assert masks == ({"CAUSAL"} if strategy == "ulysses" else {"CAUSAL", "NO_MASK"}), strategy
    assert ("all-to-all" in hlo) == (strategy != "ring")
    assert ("collective-permute" in hlo) == (strategy != "ulysses")


def test_model_attention_layer_compiles_for_h100(h100):
  mesh = _mesh(h100, fsdp=8)
  cfg = ModelConfig(vocab_size=256, num_layers=1, embed_dim=128, num_heads=4, num_kv_heads=2,
                    head_dim=64, mlp_dim=256, dtype="bfloat16", sliding_window=64,
                    attention="cudnn", document_mask=False)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Attention(cfg, nnx.Rngs(0))))
  params = jax.tree.map(
      lambda v: _sds(v.shape, v.dtype, mesh_lib.logical_sharding(
          v.shape, v.get_metadata()["logical_axes"], mesh)),
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  B, T = 8, 384
  x = _sds((B, T, cfg.embed_dim), sharding=mesh_lib.batch_sharding(mesh, 3))
  ids = _sds((B, T), jnp.int32, mesh_lib.batch_sharding(mesh))

  def loss(params, x, pos, seg):
    out = nnx.merge(graphdef, params)(x, pos, seg)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, ids, ids).compile().as_text()
  calls = _fmha_calls(hlo)
  assert len(calls["__cudnn$fmhaSoftmax"]) == len(calls["__cudnn$fmhaSoftmaxBackward"]) == 1
  assert calls["__cudnn$fmhaSoftmax"][0]["sliding_window_length"] == 64


def test_training_step_compiles_for_h100(h100):
  """The tiny model's whole training step, fsdp 2 x USP (ring 2 x ulysses 2)."""
  from lcjax import parts as parts_lib
  from lcjax import program as program_lib
  from lcjax.train import prepare
  config = _cudnn_config()
  config.mesh.update(data=1, fsdp=2, ring=2, ulysses=2)
  prepared = prepare(config, with_data=False, devices=h100.devices())
  with jax.set_mesh(prepared.mesh):
    program = program_lib.build(prepared, aot=True)
    batch = parts_lib.abstract_batch(config.train.batch_size, config.train.seq_len,
                                     program.batch_sharding)
    _, compiled = program.compile(batch)
  calls = _fmha_calls(compiled.as_text())
  assert calls.get("__cudnn$fmhaSoftmax") and calls.get("__cudnn$fmhaSoftmaxBackward"), calls.keys()


# --- the ring and LSE logic on CPU, cuDNN's kernels replaced by emulations of their contracts --

def _index_mask(m, T, S):
  idx = lambda n: jnp.arange(n, dtype=jnp.int32)[None]
  return allowed_mask(idx(T), idx(S), None, None, causal=m.causal, sliding_window=m.window)


def _emulated_forward(m, q, k, v):
  """cuDNN's forward contract: index masks, (out in q.dtype, lse [B, H, T] float32)."""
  pos = lambda x: jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
  out, lse = reference_attention(q, k, v, causal=m.causal, sliding_window=m.window, scale=m.scale,
                                 q_positions=pos(q), kv_positions=pos(k), return_lse=True)
  return out, lse.astype(jnp.float32)


def _emulated_backward(m, q, k, v, out, lse, dout):
  """cuDNN's backward contract: P from the given lse, D = rowsum(dout * out) from the given out
  (FlashAttention-2 Alg. 2), GQA gradients summed over each group."""
  B, T, H, _ = q.shape
  K, f = k.shape[2], lambda x: x.astype(jnp.float32)
  group = lambda x: f(x).reshape(B, T, K, H // K, x.shape[-1])
  s = jnp.einsum("btkgd,bskd->bkgts", group(q), f(k)) * m.scale
  mask = _index_mask(m, T, k.shape[1])[:, None, None]
  p = jnp.where(mask, jnp.exp(s - lse.reshape(B, K, H // K, T)[..., None]), 0.0)
  do = group(dout)
  dv = jnp.einsum("bkgts,btkgd->bskd", p, do)
  dp = jnp.einsum("btkgd,bskd->bkgts", do, f(v))
  d_row = jnp.einsum("btkgd,btkgd->bkgt", do, group(out))
  ds = p * (dp - d_row[..., None]) * m.scale
  dq = jnp.einsum("bkgts,bskd->btkgd", ds, f(k)).reshape(q.shape)
  dk = jnp.einsum("bkgts,btkgd->bskd", ds, group(q))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@pytest.fixture
def emulated_cudnn(monkeypatch):
  monkeypatch.setattr(cudnn_attention, "_forward_kernel", _emulated_forward)
  monkeypatch.setattr(cudnn_attention, "_backward_kernel", _emulated_backward)
  monkeypatch.setattr(cudnn_attention, "PLATFORMS", ("gpu", "cpu"))
  monkeypatch.setattr(cudnn_attention, "DTYPES",
                      cudnn_attention.DTYPES + (jnp.dtype(jnp.float32),))


def _values_and_grads(attend, q, k, v, use_lse=True):
  def loss(q, k, v):
    out, lse = attend(q, k, v)
    return jnp.sum(out * jnp.cos(out)) + (jnp.sum(jnp.sin(lse)) if use_lse else 0.0), (out, lse)
  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return [out, lse, *grads]


def _random(shape_q, K, seed):
  rng = np.random.default_rng(seed)
  B, T, H, D = shape_q
  return (rng.standard_normal(shape_q, np.float32),
          *(rng.standard_normal((B, T, K, D), np.float32) for _ in range(2)))


@pytest.mark.parametrize("causal, window, use_lse", [
    (True, 29, True), (False, None, True), (True, None, False)])
def test_local_custom_vjp_with_an_lse_cotangent_matches_reference(emulated_cudnn, causal, window,
                                                                  use_lse):
  """The lse cotangent folded into the kernel through the extra columns (or, unused, a symbolic
  zero and the plain kernel): out, lse and all gradients equal the dense reference."""
  q, k, v = _random((2, 77, 6, 16), 2, seed=int(causal) + 2 * (window or 0) + 5 * use_lse)
  pos = np.broadcast_to(np.arange(77, dtype=np.int32), (2, 77))
  got = _values_and_grads(lambda q, k, v: ops.attention(
      q, k, v, causal=causal, sliding_window=window, return_lse=True, implementation="cudnn"),
      q, k, v, use_lse)
  want = _values_and_grads(lambda q, k, v: reference_attention(
      q, k, v, causal=causal, sliding_window=window, q_positions=pos, kv_positions=pos,
      return_lse=True), q, k, v, use_lse)
  errs = [rel_err(g, w) for g, w in zip(got, want)]
  assert max(errs) < 1e-5, errs


@pytest.mark.parametrize("strategy, layout, sizes", [
    ("usp", "zigzag", dict(ring=2, ulysses=4)), ("ring", "contiguous", dict(ring=4, ulysses=2)),
    ("ulysses", "zigzag", dict(data=2, ulysses=4))],
    ids=["usp2x4-zigzag", "ring8-contiguous", "ulysses4-zigzag-data2"])
def test_sequence_parallel_with_cudnn_blocks_matches_reference(emulated_cudnn, strategy, layout,
                                                               sizes):
  """Ring block masks from the layout (causal on the diagonal, none below), the global-statistics
  backward with the ring's lse cotangent, and Ulysses unzipped into global order: out, lse and
  all gradients equal the dense reference on the layout's positions."""
  mesh = mesh_lib.make_mesh({a: sizes.get(a, 1) for a in mesh_lib.AXES})
  R, U = sizes.get("ring", 1), sizes.get("ulysses", 1)
  B, S, H, K, D = 2, 96, 8, 2, 16
  q, k, v = _random((B, S, H, D), K, seed=R * 10 + U)
  perm = ops.sequence_layout(S, R, U, layout)
  pos = np.broadcast_to(perm, (B, S))
  spec = NamedSharding(mesh, P(("data",) if "data" in sizes else None, ("ring", "ulysses")))
  with jax.set_mesh(mesh):
    got = _values_and_grads(lambda q, k, v: ops.sequence_parallel_attention(
        q, k, v, mesh=mesh, strategy=strategy, layout=layout, causal=True, return_lse=True,
        implementation="cudnn"), *(jax.device_put(x, spec) for x in (q, k, v)))
  want = _values_and_grads(lambda q, k, v: reference_attention(
      q, k, v, causal=True, q_positions=pos, kv_positions=pos, return_lse=True), q, k, v)
  errs = [rel_err(g, w) for g, w in zip(got, want)]
  assert max(errs) < 2e-5, errs


def _gpu_check():
  import importlib.util
  spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gpu_check_cudnn_rows_with_emulated_kernels(emulated_cudnn):
  """The script's GPU-only numerics rows (cudnn, the cuDNN ring blocks) run here on the emulated
  kernels: they pass their bf16 bounds, and refusals become reasons."""
  gpu_check = _gpu_check()
  rows = gpu_check.numerics(["cudnn", "cudnn_ring_blocks"], (1, 64, 64), 0,
                            ["gqa4_causal", "segments_causal"])
  by = {(r["path"], r["case"]): r for r in rows}
  assert by["cudnn", "gqa4_causal"]["ok"] and by["cudnn_ring_blocks", "gqa4_causal"]["ok"], rows
  assert "takes no segment ids" in by["cudnn", "segments_causal"]["skipped"]
  assert "without window or segments" in by["cudnn_ring_blocks", "segments_causal"]["skipped"]


def test_gpu_check_script_runs_its_smoke_mode_on_cpu(tmp_path):
  """scripts/gpu_check.py --smoke: every part runs at tiny sizes, the CPU paths pass their bf16
  bounds against the float32 reference, and the JSON says what was skipped."""
  gpu_check = _gpu_check()
  out = tmp_path / "check.json"
  gpu_check.main(["--smoke", "--out", str(out)])
  result = json.loads(out.read_text())
  assert result["smoke"] and result["skipped"]["cudnn"] == "needs a GPU"
  rows = result["numerics"]
  assert {(r["path"], r["case"]) for r in rows} == {("reference", "mqa_window"),
                                                     ("xla", "mqa_window")}
  for r in rows:
    assert r["ok"] and 1e-4 < r["max_rel_err"] < 1e-2, r
    assert set(r["errors"]) == {"out", "lse", "dq", "dk", "dv"}
  assert all(r[p]["tflops"] > 0 for r in result["speed"] for p in ("fwd", "fwd_bwd"))
  (ring_row,) = result["ring_overhead"]
  assert ring_row["local_s"] > 0 and ring_row["ring1_s"] > 0
