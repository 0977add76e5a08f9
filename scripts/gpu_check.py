"""One run on one GPU: numerics and speed of every GPU attention path, side by side.

  python3 scripts/gpu_check.py --out gpu_check.json       # one H100/H200, at most ~8 minutes
  python scripts/gpu_check.py --smoke --out /tmp/x.json   # CPU: tiny sizes, checks the script

(a) numerics: on fresh random bf16 inputs, out, lse and the gradients of
    sum(out cos out) + sum(sin lse) (the lse term only where a path returns lse) of each path
    against the dense float32 reference (matmuls at "highest" precision), over the masking cases
    causal, causal window, GQA, MQA, no mask and packed segments where the path takes them; each
    error is the relative Frobenius error, and the row passes when every error is at most 2x
    (forward) / 3x (gradients) that of a plain bf16 dense implementation (DESIGN.md). Paths:
    lcjax `reference` (bf16), `xla` (blockwise), `cudnn`, the cuDNN ring blocks (the block
    kernel with a ring's merged lse and its cotangent), and Pallas GPU kernels jax ships:
    `pallas_mgpu` (Mosaic GPU, Hopper; no scale, so q is pre-scaled; lse base 2) and
    `pallas_triton` (K/V heads repeated). A path that refuses a case reports why.
(b) speed: TFLOP/s of forward and forward+backward, median of --repeats timed runs after
    warm-up (host clock around block_until_ready, two input sets alternated), causal, at
    several sequence lengths with the same tokens per batch. FLOPs as DESIGN.md: forward
    4 B Hq T^2 D, halved for causal; backward 2.5x forward.
(c) ring overhead: lcjax's ring attention over a ring of one device (its halves, skips, float32
    merges and own backward; no transfers) against the same local kernel, fwd+bwd. The transfer
    cost of a real ring cannot be measured on one GPU.
Prints one table per part and writes everything to --out as JSON.
"""
import argparse
import datetime
import functools
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout on the GPU machine

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lcjax import ops  # noqa: E402
from lcjax.ops import cudnn_attention, layouts, ring  # noqa: E402
from lcjax.ops.reference import reference_attention  # noqa: E402

CASES = {  # name: (H, K, causal, window, segments)
    "causal": (8, 8, True, None, False),
    "causal_window": (8, 8, True, 96, False),
    "gqa4_causal": (8, 2, True, None, False),
    "mqa_window": (8, 1, True, 64, False),
    "no_mask": (8, 2, False, None, False),
    "segments_causal": (8, 2, True, None, True),
}


def _pallas_mgpu():
  from jax.experimental.pallas.ops.gpu import attention_mgpu as m
  return m


def _pallas_triton():
  from jax.experimental.pallas.ops.gpu import attention as m
  return m


def path_fn(name, causal, window, segments, D):
  """(q, k, v, seg) -> (out, lse or None) for one path; raises where it refuses the case."""
  kw = dict(causal=causal, sliding_window=window)
  if name in ("reference", "xla", "cudnn"):
    def fn(q, k, v, seg):
      ids = dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}
      return ops.attention(q, k, v, return_lse=True, implementation=name, **kw, **ids)
    return fn
  if window is not None:
    raise ValueError(f"{name} has no sliding window")
  if name == "pallas_mgpu":
    if segments:
      raise ValueError("pallas_mgpu takes no segment ids")
    m = _pallas_mgpu()

    def fn(q, k, v, seg):
      block = 128 if q.shape[1] % 256 == 0 else 64
      config = m.TuningConfig(block_q=block, block_kv=block, max_concurrent_steps=2,
                              causal=causal, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
                              block_kv_dq=64)
      return m.attention(q * jnp.asarray(D ** -0.5, q.dtype), k, v, config), None
    return fn
  if name == "pallas_triton":
    m = _pallas_triton()

    def fn(q, k, v, seg):
      r = q.shape[2] // k.shape[2]
      k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
      return m.mha(q, k, v, seg if segments else None, sm_scale=D ** -0.5, causal=causal), None
    return fn
  raise ValueError(f"unknown path {name}")


def ring_blocks_fn(causal, window, segments, D, chunks=4):
  """The cuDNN ring's per-device work on one device: K/V in `chunks` blocks, cuDNN block
  forwards (causal on the diagonal, none below) merged in float32 like the ring, and the ring's
  backward: `cudnn_attention.block_grads` with the merged out and lse and their cotangents."""
  if window is not None or segments or not causal:
    raise ValueError("the check covers the causal ring without window or segments")
  scale = D ** -0.5

  @jax.custom_vjp
  def blocks(q, k, v):
    return forward(q, k, v)[0]

  def split(x):
    return jnp.split(x, chunks, axis=1)

  def forward(q, k, v):
    qs, ks, vs = split(q), split(k), split(v)
    results = []
    for i in range(chunks):
      acc = ring._nothing(qs[i])
      for j in range(i + 1):
        acc = ring._merge(acc, cudnn_attention.block_forward(qs[i], ks[j], vs[j], causal=i == j,
                                                             scale=scale))
      results.append(acc)
    out = jnp.concatenate([r[0] for r in results], 1).astype(q.dtype)
    lse = jnp.concatenate([r[1] for r in results], 2)
    return (out, lse), (q, k, v, out, lse)

  def backward(res, cts):
    q, k, v, out, lse = res
    dout, dlse = cts
    qs, ks, vs, outs, douts = split(q), split(k), split(v), split(out), split(dout)
    lses, dlses = jnp.split(lse, chunks, 2), jnp.split(dlse, chunks, 2)
    dq = [jnp.zeros(x.shape, jnp.float32) for x in qs]
    dk = [jnp.zeros(x.shape, jnp.float32) for x in ks]
    dv = [jnp.zeros(x.shape, jnp.float32) for x in vs]
    for i in range(chunks):
      for j in range(i + 1):
        g = cudnn_attention.block_grads(qs[i], ks[j], vs[j], outs[i], lses[i], douts[i], dlses[i],
                                        causal=i == j, scale=scale)
        dq[i], dk[j], dv[j] = dq[i] + g[0], dk[j] + g[1], dv[j] + g[2]
    cat = lambda xs, like: jnp.concatenate(xs, 1).astype(like.dtype)
    return cat(dq, q), cat(dk, k), cat(dv, v)

  blocks.defvjp(forward, backward)
  return lambda q, k, v, seg: blocks(q, k, v)


def _why(error, n):
  """One line naming a refusal or failure."""
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:n]}"


def _inputs(rng, B, T, H, K, D, dtype):
  q = rng.standard_normal((B, T, H, D), np.float32)
  k, v = (rng.standard_normal((B, T, K, D), np.float32) for _ in range(2))
  bounds = np.sort(rng.integers(0, T, (B, 3)), axis=1)
  seg = np.stack([np.searchsorted(b, np.arange(T), side="right") for b in bounds]).astype(np.int32)
  return [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(seg)]


def _value_and_grads(fn, q, k, v, seg, with_lse):
  def loss(q, k, v):
    out, lse = fn(q, k, v, seg)
    o = out.astype(jnp.float32)
    total = jnp.sum(o * jnp.cos(o))
    if with_lse:
      total += jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))
    return total, (out, lse)
  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return [out, lse, *grads]


def _rel(x, ref):
  if x is None:
    return None
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.isfinite(x).all():
    return float("nan")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def numerics(paths, sizes, seed, cases):
  """Part (a): one row per (path, case)."""
  B, T, D = sizes
  rows = []
  for case in cases:
    H, K, causal, window, segments = CASES[case]
    rng = np.random.default_rng([seed, len(rows)])
    q, k, v, seg = _inputs(rng, B, T, H, K, D, jnp.bfloat16)
    ids = dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    dense = lambda dtype: lambda q, k, v, seg: reference_attention(
        q, k, v, causal=causal, sliding_window=window, q_positions=pos, kv_positions=pos,
        return_lse=True, compute_dtype=dtype, **ids)
    f32 = lambda x: x.astype(jnp.float32)

    @functools.lru_cache(maxsize=None)
    def references(with_lse):  # (float32 reference, plain bf16 dense), shared by the paths
      with jax.default_matmul_precision("highest"):
        want = _value_and_grads(dense(jnp.float32), f32(q), f32(k), f32(v), seg, with_lse)
      return want, _value_and_grads(dense(jnp.bfloat16), q, k, v, seg, with_lse)

    for name in paths:
      row = {"path": name, "case": case, "B": B, "T": T, "H": H, "K": K, "D": D}
      try:
        fn = ring_blocks_fn(causal, window, segments, D) if name == "cudnn_ring_blocks" else \
            path_fn(name, causal, window, segments, D)
        with_lse = name not in ("pallas_mgpu", "pallas_triton")
        try:
          got = _value_and_grads(fn, q, k, v, seg, with_lse)
        except NotImplementedError as e:  # e.g. a kernel without this backward: forward only
          got = [*jax.jit(lambda q, k, v: fn(q, k, v, seg))(q, k, v), None, None, None]
          row["backward"] = _why(e, 120)
        want, plain = references(with_lse)
        names = ("out", "lse", "dq", "dk", "dv")
        errs = {n: _rel(g, w) for n, g, w in zip(names, got, want)}
        base = {n: _rel(p, w) for n, p, w in zip(names, plain, want)}
        bound = {n: (2 if n in ("out", "lse") else 3) * base[n] for n in names
                 if errs[n] is not None}
        row.update(errors=errs, plain_bf16=base, max_rel_err=max(e for e in errs.values()
                                                                 if e is not None),
                   ok=all(errs[n] <= bound[n] for n in bound))
      except Exception as e:  # a refusal (ValueError) or a path missing from this jax
        row.update(skipped=_why(e, 160))
      rows.append(_show(row, f"{name:18s} {case:16s}", _errors_line))
  return rows


def _errors_line(r):
  fmt = lambda x: "   -    " if x is None else f"{x:8.2e}"
  return (" ".join(fmt(x) for x in r["errors"].values()) + ("  ok" if r["ok"] else "  FAIL") +
          (f"  (forward only: {r['backward']})" if "backward" in r else ""))


def _show(row, label, line):
  """Prints `label` and line(row), or why the row was skipped; returns the row."""
  print(f"  {label} " + (f"skipped: {row['skipped']}" if "skipped" in row else line(row)),
        flush=True)
  return row


def _time(fn, args_sets, warmup, repeats):
  """Median seconds of fn(*args) over `repeats` runs, alternating input sets."""
  for i in range(warmup):
    jax.block_until_ready(fn(*args_sets[i % len(args_sets)]))
  times = []
  for i in range(repeats):
    args = args_sets[i % len(args_sets)]
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def speed(paths, lengths, tokens, H, K, D, warmup, repeats, deadline, dtype):
  """Part (b): TFLOP/s of each path, causal, forward and forward+backward."""
  rows = []
  for T in lengths:
    B = max(1, tokens // T)
    flops_fwd = 4 * B * H * T * T * D / 2
    rng = np.random.default_rng(T)
    sets = [_inputs(rng, B, T, H, K, D, dtype)[:3] for _ in range(2)]
    for name in paths:
      row = {"path": name, "B": B, "T": T, "H": H, "K": K, "D": D, "causal": True}
      if time.perf_counter() > deadline:
        row["skipped"] = "time budget spent"
        rows.append(_show(row, f"{name:14s} T={T:<7d}", _speed_line))
        continue
      try:
        fn = path_fn(name, True, None, False, D)
        fwd = jax.jit(lambda q, k, v: fn(q, k, v, None)[0])
        train = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, None)[0].astype(
            jnp.float32) ** 2), argnums=(0, 1, 2)))
        for part, f, flops in (("fwd", fwd, flops_fwd), ("fwd_bwd", train, 3.5 * flops_fwd)):
          try:
            median, times = _time(f, sets, warmup, repeats)
            row[part] = {"median_s": median, "tflops": flops / median / 1e12,
                         "spread": (max(times) - min(times)) / median}
          except Exception as e:
            row[part] = {"skipped": _why(e, 120)}
      except Exception as e:
        row["skipped"] = _why(e, 160)
      rows.append(_show(row, f"{name:14s} T={T:<7d}", _speed_line))
  return rows


def _speed_line(r):
  cell = lambda p: (f"{r[p]['tflops']:8.1f} ({r[p]['median_s'] * 1e3:8.3f} ms)" if "tflops" in
                    r[p] else f"skipped: {r[p]['skipped'][:50]}")
  return f"B={r['B']:<4d} fwd {cell('fwd')}  fwd+bwd {cell('fwd_bwd')}"


def ring_overhead(name, T, B, H, K, D, warmup, repeats, dtype):
  """Part (c): a ring of one device against the local kernel (fwd+bwd, causal, zigzag halves)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ring",))
  starts, half = layouts.ring_block_starts(T, 1, 1, "zigzag", ring_over_ulysses=True)
  spec = ring.RingSpec(axes=("ring",), starts=tuple(map(tuple, starts.tolist())), half_len=half,
                       causal=True, scale=D ** -0.5, implementation=name)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  P = jax.sharding.PartitionSpec

  def ringed(q, k, v):
    body = lambda q, k, v, pos: ring.ring_attention(q, k, v, (pos, None), (pos, None), spec)[0]
    return jax.shard_map(body, mesh=mesh, in_specs=(P(None, "ring"),) * 4,
                         out_specs=P(None, "ring"), check_vma=False)(q, k, v, pos)

  local = lambda q, k, v: ops.attention(q, k, v, causal=True, implementation=name)
  grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2),
                                    argnums=(0, 1, 2)))
  rng = np.random.default_rng(1)
  sets = [_inputs(rng, B, T, H, K, D, dtype)[:3] for _ in range(2)]
  row = {"path": name, "T": T, "B": B}
  try:
    t_local, _ = _time(grad(local), sets, warmup, repeats)
    t_ring, _ = _time(grad(ringed), sets, warmup, repeats)
    row.update(local_s=t_local, ring1_s=t_ring, overhead=t_ring / t_local - 1)
  except Exception as e:
    row["skipped"] = _why(e, 160)
  return _show(row, f"{name:8s} T={T}:", lambda r: (
      f"local {r['local_s'] * 1e3:.3f} ms, ring of 1 {r['ring1_s'] * 1e3:.3f} ms, "
      f"overhead {100 * r['overhead']:+.1f}%"))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="JSON results path")
  p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU (no cuDNN there)")
  p.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 32768])
  p.add_argument("--tokens", type=int, default=65536, help="tokens per timed batch (B = tokens/T)")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--budget_s", type=float, default=330.0,
                 help="start no new timed row after this many seconds")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  start = time.perf_counter()
  backend = jax.default_backend()
  gpu = backend == "gpu"
  if not (gpu or a.smoke):
    p.error(f"no GPU here (backend {backend!r}); run with --smoke to check the script on CPU")
  paths = ["reference", "xla"] + (["cudnn", "cudnn_ring_blocks", "pallas_mgpu", "pallas_triton"]
                                  if gpu else [])
  cases = list(CASES)
  if a.smoke:
    sizes, lengths, tokens, repeats = (1, 64, 64), [64], 128, 2
    H, K, D = 4, 2, 64
    cases = ["mqa_window"]
  else:
    sizes, lengths, tokens, repeats = (2, 1024, 128), a.lengths, a.tokens, a.repeats
    H, K, D = 32, 8, 128
  result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "backend": backend, "smoke": a.smoke,
            "devices": [d.device_kind for d in jax.devices()],
            "flops_convention": "fwd 4*B*Hq*T*T*D, halved causal; bwd 2.5x fwd (DESIGN.md)"}
  if not gpu:
    result["skipped"] = {"cudnn": "needs a GPU", "pallas GPU kernels": "need a GPU"}
  print(f"gpu_check {result['date']} jax {jax.__version__} on {result['devices'][0]}")
  print(f"(a) numerics, relative Frobenius error vs float32 reference (B, T, D = {sizes}):"
        f"\n  {'path':18s} {'case':16s} out      lse      dq       dk       dv")
  result["numerics"] = numerics(paths, sizes, a.seed, cases)
  print(f"(b) causal attention TFLOP/s (median of {repeats}; Hq={H} Hkv={K} D={D}, "
        f"{tokens} tokens per batch):")
  timed = [n for n in paths if n not in ("reference", "cudnn_ring_blocks")]
  result["speed"] = speed(timed, lengths, tokens, H, K, D, a.warmup, repeats,
                          start + a.budget_s, jnp.bfloat16)
  print("(c) ring of one device vs local, fwd+bwd (no transfers: a real ring's cannot be "
        "measured on one GPU):")
  T = lengths[-2] if len(lengths) > 1 else lengths[0]
  result["ring_overhead"] = [ring_overhead(n, T, max(1, tokens // T), H, K, D, a.warmup, repeats,
                                           jnp.bfloat16) for n in (["cudnn", "xla"] if gpu else
                                                                   ["xla"])]
  result["wall_s"] = time.perf_counter() - start
  pathlib.Path(a.out).write_text(json.dumps(result, indent=1))
  failed = [f"{r['path']}/{r['case']}" for r in result["numerics"] if r.get("ok") is False]
  print(f"done in {result['wall_s']:.0f} s; numerics failing the bf16 bound: {failed or 'none'}; "
        f"wrote {a.out}")
  return result


if __name__ == "__main__":
  main()
