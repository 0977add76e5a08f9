"""Compiled TPU and GPU targets from this CPU machine: target strings, kernel dispatch by the
mesh's platform, lcjax's attention (Mosaic kernels inside shard_map, the USP ring, the model's
layer) and whole training steps (USP + MsT + offload, DiLoCo) compiled ahead of time for
compile-only TPU and H100 devices, the dry run for a target, and fits judged by the target's
compiler. Compiles prove lowering, memory and schedule only.
"""
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax import mesh as mesh_lib
from lcjax import ops, targets
from lcjax.model.attention import Attention
from lcjax.model.config import ModelConfig
from lcjax.ops import manual
from lcjax.ops.attention import resolve_implementation

needs_libtpu = pytest.mark.skipif(
    not targets.have_tpu_compiler(),
    reason=f"libtpu is not installed (compile-only TPU devices): {targets.INSTALL}")


def _mesh(target, **sizes):
  """lcjax's six-axis Auto mesh over the target's compile-only devices."""
  return mesh_lib.make_mesh({a: sizes.get(a, 1) for a in mesh_lib.AXES}, devices=target.devices())


def _custom_calls(hlo):
  return len(re.findall(r'custom_call_target="tpu_custom_call"', hlo))


def test_parse_targets():
  t = targets.parse("tpu:v5p:2x2x2")
  assert (t.platform, t.kind, t.topology, t.chips) == ("tpu", "v5p", (2, 2, 2), 8)
  assert t.hbm_bytes_per_chip == 95 * targets.GiB
  assert targets.parse("tpu:v6e:4x4").hbm_bytes_per_chip == 32 * targets.GiB
  assert targets.parse("tpu:v5e:2x2").topology_name == "v5e:2x2"
  assert targets.parse("tpu:v4:2x2x1").hbm_bytes_per_chip == 32 * targets.GiB
  for bad in ("tpu:v9:2x2", "v5p:2x2x2", "tpu:v5p", "tpu:v5p:2xx2"):
    with pytest.raises(ValueError, match=r"valid forms: tpu:v5p:AxBxC"):
      targets.parse(bad)
  for bad in ("gpu:v5p:8", "tpu:h100:8", "gpu:h100:2x2x8", "gpu:h100:0"):
    with pytest.raises(ValueError, match=r"gpu:h100"):
      targets.parse(bad)
  g = targets.parse("gpu:h100:8")
  assert (g.platform, g.kind, g.topology, g.chips, g.topology_name) == ("gpu", "h100", (1, 8), 8,
                                                                       "1x1x8")
  assert g.hbm_bytes_per_chip == 81559 * 2**20
  assert targets.parse("gpu:h200:2x8").topology == (2, 8)
  with pytest.raises(ValueError, match=r"a v5p topology has 3 positive dimensions"):
    targets.parse("tpu:v5p:4x4")
  with pytest.raises(ValueError, match=r"a v6e topology has 2 positive dimensions"):
    targets.parse("tpu:v6e:2x2x1")


@pytest.mark.parametrize("name,probe,cache,message", [
    ("tpu:v5e:2x2", "have_tpu_compiler", "_tpu_topology", r"needs libtpu"),
    ("gpu:h100:2", "have_gpu_compiler", "_gpu_topology", r"needs jax's CUDA plugin")])
def test_a_missing_compiler_names_the_install(monkeypatch, name, probe, cache, message):
  monkeypatch.setattr(targets, probe, lambda: False)
  getattr(targets, cache).cache_clear()
  with pytest.raises(ImportError, match=message + r".*pip install -r requirements-targets.txt"):
    targets.parse(name).devices()
  getattr(targets, cache).cache_clear()


@needs_libtpu
def test_auto_resolves_to_the_mosaic_kernel_on_a_tpu_mesh():
  """Under a TPU mesh, in and out of jit and shard_map: "auto" is the Mosaic kernel, never the
  interpreter, though this host's default backend is the CPU."""
  target = targets.parse("tpu:v5p:2x2x1")
  assert jax.default_backend() == "cpu" and len(target.devices()) == 4
  assert target.devices()[0].platform == "tpu"
  mesh = _mesh(target, fsdp=2, tensor=2)
  seen = []

  def f(x):
    seen.append((manual.platform(), resolve_implementation("auto"), resolve_implementation("pallas")))
    inner = jax.shard_map(lambda y: (seen.append(resolve_implementation("auto")), y)[1],
                          mesh=jax.sharding.get_abstract_mesh(), in_specs=P(), out_specs=P())
    return inner(x)

  with jax.set_mesh(mesh):
    assert manual.platform() == "tpu"
    jax.jit(f).lower(jax.ShapeDtypeStruct((8,), jnp.float32))
  assert seen == [("tpu", "pallas", "pallas"), "pallas"]
  assert manual.platform(mesh) == "tpu" and manual.platform() == "cpu"


# (name, T, Hq, Hkv, keywords): each feature of the masking semantics at least once, odd
# lengths, GQA and MQA; combined to keep the compiles few
KERNEL_CASES = [
    ("causal-segments-gqa-odd", 333, 6, 2, dict(causal=True, segments=True)),
    ("window-softcap-mqa", 256, 4, 1, dict(causal=True, sliding_window=100, softcap=30.0)),
    ("full-odd", 200, 4, 4, dict()),
]


@needs_libtpu
@pytest.mark.parametrize("topology", ["tpu:v5p:2x2x1", "tpu:v6e:2x2"])
@pytest.mark.parametrize("name, T, H, K, kw", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_pallas_attention_compiles_for_tpu(topology, name, T, H, K, kw):
  """ops.attention forward + backward on an fsdp x tensor mesh: "auto" is the Mosaic kernel,
  run in a shard_map (forward, dK/dV and dQ kernels on [B/2, T, H/2, D] blocks)."""
  target = targets.parse(topology)
  mesh = _mesh(target, fsdp=2, tensor=2)
  B, D = 4, 128
  kw = dict(kw)
  segments = kw.pop("segments", False)
  batch = NamedSharding(mesh, P("fsdp"))
  q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16, sharding=batch)
  kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16, sharding=batch)
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch)

  def loss(q, k, v, seg):
    out, lse = ops.attention(q, k, v, q_segment_ids=seg if segments else None,
                             kv_segment_ids=seg if segments else None, return_lse=True, **kw)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(lse > -jnp.inf, lse, 0))

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids).compile()
  hlo = compiled.as_text()
  assert _custom_calls(hlo) == 3, _custom_calls(hlo)  # forward, dK/dV, dQ: Mosaic, not interpreted
  heads = H // 2 if K % 2 == 0 else H  # tensor splits heads only when it divides Hkv too
  assert f"bf16[{B // 2},{heads},{T}," in hlo or f"bf16[{B // 2},{heads},{-(-T // 8) * 8}," in hlo
  assert compiled.memory_analysis() is not None  # the target's own memory analysis


@needs_libtpu
def test_pallas_attention_at_262144_tokens_per_device_keeps_its_plan_in_smem():
  """At 262144 tokens per device (B = 1 there, 512-blocks) one call's whole tile plan was 1 MiB
  and the v5p compile failed ("Ran out of memory in memory space smem"); each kernel now runs as
  a loop of calls whose scalar-prefetched plan slab fits pallas_common.PLAN_BUDGET_BYTES.
  Per-row values (lse, Delta) and ids are rows [.., 1, T] in HBM: broadcast over 128 lanes, each
  f32 one was 1 GiB here and the compile held 4849 MiB of temporaries (1555 MiB as rows)."""
  from lcjax.ops import pallas_common
  mesh = _mesh(targets.parse("tpu:v5p:2x2x1"), fsdp=4)
  B, T, H, K, D = 4, 262144, 8, 2, 128
  batch = NamedSharding(mesh, P("fsdp"))
  q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16, sharding=batch)
  kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16, sharding=batch)
  seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch)

  def loss(q, k, v, seg):
    out = ops.attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
  hlo = compiled.as_text()
  plans = [int(n) for n in re.findall(  # scalar prefetch: (first row [1], plan slab [n])
      r'custom_call_target="tpu_custom_call", operand_layout_constraints=\{s32\[1\]\{0\}, '
      r's32\[(\d+)\]', hlo)]
  assert len(plans) == 3, plans  # forward, dK/dV, dQ
  assert all(0 < 4 * n <= pallas_common.PLAN_BUDGET_BYTES < 4 * (T // 512) ** 2 for n in plans)
  # temporaries: q, out and dO in kernel layout [1, H, T, D] (bf16, 512 MiB each here) and rows
  # of 4 bytes a token; one [1, H, T, 128] f32 array alone would take 1 GiB more
  q_bytes = T * H * D * 2
  assert compiled.memory_analysis().temp_size_in_bytes < 4 * q_bytes


def _async_permutes_around_compute(hlo):
  """(# collective-permute-start, # of them with a Mosaic call scheduled before their done)."""
  total = overlapped = 0
  for body in re.split(r"\n(?=\S)", hlo):  # one computation per block, instructions in order
    lines = body.splitlines()
    for i, line in enumerate(lines):
      m = re.match(r"\s*(%?[\w.\-]+) = .*collective-permute-start\(", line)
      if not m:
        continue
      total += 1
      done = next((j for j in range(i + 1, len(lines))
                   if "collective-permute-done(" in lines[j] and m.group(1) in lines[j]), i)
      overlapped += any("tpu_custom_call" in x or " fusion(" in x for x in lines[i + 1:done])
  return total, overlapped


@needs_libtpu
def test_sequence_parallel_usp_compiles_for_v5p_with_async_ring():
  """USP ring 2 x ulysses 2 with fsdp 2 on v5p:2x2x2: the local Mosaic kernels compile inside the
  shard_map (manual over every axis), and the ring's collective-permutes are asynchronous in
  the TPU schedule with compute between start and done."""
  target = targets.parse("tpu:v5p:2x2x2")
  mesh = _mesh(target, fsdp=2, ring=2, ulysses=2)
  B, S, H, K, D = 2, 256, 4, 2, 128
  spec = NamedSharding(mesh, P("fsdp", ("ring", "ulysses")))
  q = jax.ShapeDtypeStruct((B, S, H, D), jnp.bfloat16, sharding=spec)
  kv = jax.ShapeDtypeStruct((B, S, K, D), jnp.bfloat16, sharding=spec)

  def loss(q, k, v):
    out = ops.sequence_parallel_attention(q, k, v, mesh=jax.sharding.get_abstract_mesh(),
                                          strategy="usp", causal=True)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()
  assert _custom_calls(hlo) > 0
  assert " all-to-all(" in hlo or "all-to-all-start(" in hlo
  assert not re.search(r"\scollective-permute\(", hlo), "a synchronous collective-permute"
  total, overlapped = _async_permutes_around_compute(hlo)
  assert total > 0 and hlo.count("collective-permute-done(") == total
  assert overlapped > 0, (total, overlapped)


@needs_libtpu
def test_model_attention_layer_compiles_on_a_v5p_fsdp_mesh():
  """The model's attention layer, forward + backward on fsdp 4: without the shard_map this fails
  with "Mosaic kernels cannot be automatically partitioned"."""
  target = targets.parse("tpu:v5p:2x2x1")
  mesh = _mesh(target, fsdp=4)
  cfg = ModelConfig(vocab_size=256, num_layers=1, embed_dim=128, num_heads=4, num_kv_heads=2,
                    head_dim=128, mlp_dim=256, dtype="bfloat16", sliding_window=64)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Attention(cfg, nnx.Rngs(0))))
  params = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=mesh_lib.logical_sharding(
          v.shape, v.get_metadata()["logical_axes"], mesh)),
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  B, T = 8, 384
  batch = mesh_lib.batch_sharding(mesh)
  x = jax.ShapeDtypeStruct((B, T, cfg.embed_dim), jnp.bfloat16, sharding=mesh_lib.batch_sharding(
      mesh, 3))
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch)

  def loss(params, x, pos, seg):
    out = nnx.merge(graphdef, params)(x, pos, seg)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, ids, ids).compile()
  assert _custom_calls(compiled.as_text()) == 3
  stats = compiled.memory_analysis()
  assert stats.argument_size_in_bytes < target.hbm_bytes_per_device


def test_mosaic_region_matches_reference_on_cpu():
  """The shard_map that carries the Mosaic kernel, run here with the blockwise kernel in its
  place on 8 CPU devices (data 2 x fsdp 2 x tensor 2): same output and gradients as the dense
  reference, with batch and heads split."""
  from lcjax.ops.attention import _mosaic_in_manual_region
  from lcjax.ops.blockwise import blockwise_attention
  mesh = mesh_lib.make_mesh({a: {"data": 2, "fsdp": 2, "tensor": 2}.get(a, 1) for a in mesh_lib.AXES})
  rng = np.random.default_rng(0)
  B, T, H, K, D = 4, 45, 6, 2, 8
  q = rng.standard_normal((B, T, H, D)).astype(np.float32)
  k, v = (rng.standard_normal((B, T, K, D)).astype(np.float32) for _ in range(2))
  seg = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  kw = dict(causal=True, sliding_window=20, softcap=None, scale=D ** -0.5)

  def run(attend):
    def loss(q, k, v):
      out, lse = attend(q, k, v)
      return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(lse > -jnp.inf, jnp.sin(lse), 0))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  ids = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
  want = run(lambda q, k, v: ops.reference_attention(q, k, v, return_lse=True, **ids, **kw))
  with jax.set_mesh(mesh):
    got = run(lambda q, k, v: _mosaic_in_manual_region(
        q, k, v, local=blockwise_attention, **ids, **kw))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


# Whole training steps of the tiny model compiled for a TPU slice and for 8 H100s.
needs_both_compilers = pytest.mark.skipif(
    not (targets.have_tpu_compiler() and targets.have_gpu_compiler()),
    reason=f"the TPU and GPU compilers are not installed: {targets.INSTALL}")
STEP_TARGETS = ("tpu:v5p:2x2x2", "gpu:h100:8")


def _step_config(variant):
  from conftest import tiny_config
  if variant == "usp_mst_offload":  # ring 2 x ulysses 2 inside fsdp 2, MsT, optimizer on host
    c = tiny_config(data=1, fsdp=2, ring=2, ulysses=2)
    c.model.update(mlp_chunks=2, loss_chunks=4)
    c.optim.update(offload=True, subgroup_mb=0.01)
    c.train.seq_len = 64
  elif variant == "diloco":  # 2 islands of data 2 x fsdp 2
    c = tiny_config(replica=2, data=2, fsdp=2)
    c.outer.update(kind="diloco", inner_steps=2)
  else:  # "plain" or "mst": fsdp 4 x data 2, 256 tokens, the LM head and loss whole or in 4
    c = tiny_config()
    c.model.loss_chunks = 4 if variant == "mst" else 1
    c.train.seq_len = 256
  return c


def _compile_step(config, target_name):
  from lcjax import parts as parts_lib
  from lcjax import program as program_lib
  from lcjax.train import prepare
  prepared = prepare(config, with_data=False, devices=targets.parse(target_name).devices())
  with jax.set_mesh(prepared.mesh):
    program = program_lib.build(prepared, aot=True)
    batch = parts_lib.abstract_batch(config.train.batch_size, config.train.seq_len,
                                     program.batch_sharding)
    return prepared, program, program.compile(batch)[1]


@pytest.fixture(scope="module")
def compiled_steps():
  """{(target, variant): (prepared, program, compiled)}, each compiled once for the module."""
  cache = {}

  def get(target_name, variant):
    if (target_name, variant) not in cache:
      cache[target_name, variant] = _compile_step(_step_config(variant), target_name)
    return cache[target_name, variant]
  return get


@needs_both_compilers
@pytest.mark.parametrize("target_name", STEP_TARGETS)
@pytest.mark.parametrize("variant", ["usp_mst_offload", "diloco"])
def test_train_step_compiles_for_the_target(compiled_steps, target_name, variant):
  """The whole step (forward, backward, update; the outer sync for DiLoCo) compiles for the
  target's devices, with "auto" attention resolved for the target: the Mosaic kernel on TPU
  (tpu_custom_calls in the program: never the interpreter, which lowers to plain HLO loops), the
  blockwise XLA path on GPU; the ring's K/V rotations are asynchronous collective-permutes."""
  _, program, compiled = compiled_steps(target_name, variant)
  hlo = compiled.as_text()
  kernels = _custom_calls(hlo)
  if target_name.startswith("tpu"):
    assert kernels >= 3  # forward, dK/dV and dQ kernels at least once each
  else:
    assert kernels == 0 and compiled.memory_analysis().peak_memory_in_bytes > 0
  if variant == "usp_mst_offload":
    assert re.search(r"collective-permute-start", hlo)
    assert not re.search(r"= \S+ collective-permute\(", hlo)  # no synchronous rotation left
  assert program.describe()["program/stage"] == {"usp_mst_offload": "offload",
                                                 "diloco": "diloco(plain)"}[variant]


@needs_both_compilers
def test_offloaded_optimizer_state_is_host_memory_on_tpu(compiled_steps):
  """The fp32 master params and moments that offload keeps in host memory are host arguments of
  the TPU program (at least their shards' bytes: TPU layouts pad small arrays); without offload
  the program has no host arguments."""
  _, program, compiled = compiled_steps("tpu:v5p:2x2x2", "usp_mst_offload")
  live = program.live
  host_state = sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(live.abstract), jax.tree.leaves(live.shardings))
                   if s.memory_kind == "pinned_host")
  assert host_state > 0
  assert compiled.memory_analysis().host_argument_size_in_bytes >= host_state
  _, _, plain = compiled_steps("tpu:v5p:2x2x2", "plain")
  assert plain.memory_analysis().host_argument_size_in_bytes == 0


@needs_both_compilers
def test_mini_sequences_leave_no_full_logits_buffer_on_tpu(compiled_steps):
  """With the LM head and loss in 4 mini-sequences, no [1, T, V] logits buffer is in the TPU
  program (only [1, T/4, V] chunks); without MsT the full one is there."""
  prepared, _, mst = compiled_steps("tpu:v5p:2x2x2", "mst")
  _, _, plain = compiled_steps("tpu:v5p:2x2x2", "plain")
  T = prepared.config.train.seq_len
  V = int(re.findall(r"f32\[1,64,(\d+)\]", mst.as_text())[0])
  assert V >= prepared.model_cfg.vocab_size  # the chunk's logits (vocab padded to the lanes)
  full = re.compile(rf"\[1,{T},{V}\]")
  assert full.search(plain.as_text()) and not full.search(mst.as_text())


@needs_both_compilers
def test_dry_run_for_a_target_writes_its_start_record(tmp_path, tiny_config):
  """--dry_run --target: the start record names the target and its memory, and says whether the
  compiler's peak fits it; without --dry_run the target is refused before anything is written."""
  from lcjax import train
  config = tiny_config()
  config.train.peak_flops = 0.0  # unset: the target's peak, not a measurement of this machine
  record = train.train_and_evaluate(config, tmp_path / "run", dry_run=True, target="gpu:h100:8")
  assert record["compile/target"] == "gpu:h100:8" and record["compile/fits"] is True
  assert record["compile/target_hbm_bytes_per_device"] == 81559 * 2**20
  assert 0 < record["compile/step_bytes"] < 2**30
  assert record["device/peak_flops"] == targets.parse("gpu:h100:8").peak_flops_per_chip
  written = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
  assert written["compile/target"] == "gpu:h100:8"
  with pytest.raises(ValueError, match=r"compile-only devices.*add --dry_run"):
    train.train_and_evaluate(tiny_config(), tmp_path / "other", target="tpu:v5p:2x2x2")
  assert not (tmp_path / "other").exists()


def test_the_hbm_total_of_libtpus_memory_usage_report():
  """The figure read from the reports docs/targets.md quotes (Llama3-8B, v5p)."""
  from lcjax import metrics
  bench = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bench"
  for name, total in (("libtpu_memory_v5p_2x2x1_mst_remat_full_opt_offload_8k.txt", 14146843072),
                      ("libtpu_memory_v5p_2x2x2_mst_remat_full_opt_offload_256k.txt", None)):
    got = metrics.hbm_bytes_of_report((bench / name).read_text())
    if total:
      assert got == total
    else:  # 91.86 GiB: the 256K step fits a v5p chip's 95.74 GiB
      assert 91.8 * 2**30 < got < 91.9 * 2**30
  assert metrics.hbm_bytes_of_report("Memory Space: host (color=5)\nTotal bytes: 7\n") is None


@needs_libtpu
def test_tpu_steps_are_judged_by_libtpus_buffer_assignment(tmp_path, tiny_config):
  """On a TPU target the step's figure (the dry run's compile/step_bytes, scripts/fit.py's) is
  the HBM of libtpu's own buffer assignment, not memory_analysis()'s: no more than the device
  buffers' sum, and for this tiny step above the peak of live bytes (the layout's alignment;
  for Llama3-8B at 256K with host-resident state it is below both, docs/targets.md)."""
  from lcjax import fit, train
  config = tiny_config()
  config.optim.update(offload=True, update_on="host")
  config.mesh.update(data=1, fsdp=4)
  config.train.update(peak_flops=1.0, batch_size=4)
  record = train.train_and_evaluate(config, tmp_path / "run", dry_run=True,
                                    target="tpu:v5p:2x2x1")
  assert record["compile/step_bytes_source"] == "libtpu buffer assignment"
  device_sum = (record["compile/argument_bytes"] + record["compile/temp_bytes"]
                + record["compile/output_bytes"] - record["compile/alias_bytes"])
  assert record["compile/step_bytes_analysis"] < record["compile/step_bytes"] <= device_sum
  mem = fit.step_memory(config, config.train.seq_len, targets.parse("tpu:v5p:2x2x1").devices())
  assert mem.total == record["compile/step_bytes"]


@needs_libtpu
def test_a_step_that_exceeds_the_target_memory_does_not_fit(tmp_path):
  """The TPU compiler's RESOURCE_EXHAUSTED is a step that does not fit, with the figure it
  names; the dry run says so in one line naming the target and the tools that find one that fits."""
  from lcjax import fit, train
  from conftest import wide_config
  config = wide_config(1024)  # 256K tokens per chip need about 74 GiB of a v5e's 16
  mem = fit.step_memory(config, 262144, devices=targets.parse("tpu:v5e:2x2").devices())
  assert mem.exhausted and "HBM" in mem.exhausted
  assert not mem.fits(16 * targets.GiB) and mem.total > 16 * targets.GiB
  config = fit.with_overrides(config, {"train.seq_len": 262144})
  with pytest.raises(ValueError, match=r"tpu:v5e:2x2: the step does not fit: .*HBM.*scripts/fit.py"):
    train.train_and_evaluate(config, tmp_path / "run", dry_run=True, target="tpu:v5e:2x2")


@needs_libtpu
def test_a_mesh_axis_that_splits_a_physical_axis_of_a_pod():
  """v5p:4x4x4 is 4 x 4 x 4 chips: ring 32 x ulysses 2 needs an axis of 2, no product of whole
  physical axes; the mesh splits one (scripts/plan.py compiles such splits)."""
  import ml_collections
  devices = targets.parse("tpu:v5p:4x4x4").devices()
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(
      dict(replica=1, data=1, fsdp=1, ring=32, ulysses=2, tensor=1)), devices)
  assert dict(mesh.shape)["ulysses"] == 2 and dict(mesh.shape)["ring"] == 32
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
