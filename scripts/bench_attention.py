"""Attention benchmark: time and compiled memory of each implementation over a sweep.

For every sequence length and head dim it compiles forward and forward+backward of each
implementation on the same inputs, reads the compiled memory (`memory_analysis()`), and, when
that fits `--memory-budget-gib`, times the median of `--repeats` runs after `--warmup` runs.
A program over budget is reported with its memory and not run (how the dense reference
"runs out of memory first" on a CPU); `--compile-only` reports memory alone, without allocating.

Implementations: lcjax's `reference`, `xla` (blockwise) and `pallas` (TPU only), and JAX's own
`jax.nn.dot_product_attention` with implementation="xla" (`jax_dense`) and, on GPU, "cudnn".
FLOPs follow DESIGN.md: forward 4*B*Hq*Tq*Tk*D, halved when causal; backward 2.5x forward, so
forward+backward is 3.5x forward. TFLOP/s = those FLOPs / median seconds.

  python scripts/bench_attention.py --seq-lens 1024 4096 16384 --head-dims 64 128
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from lcjax import ops

GIB = 2 ** 30


def default_implementations(backend):
  """Every implementation worth timing on this backend, in the order they are reported."""
  names = ["reference", "jax_dense", "xla"]
  if backend == "tpu":
    names.append("pallas")
  if backend == "gpu":
    names.append("cudnn")
  return names


def attention_fn(name, causal, block_sizes):
  """(q, k, v) -> out for one implementation name."""
  if name in ("jax_dense", "cudnn"):
    impl = "xla" if name == "jax_dense" else "cudnn"
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                         implementation=impl)
  if name == "xla" and block_sizes is not None:
    return lambda q, k, v: _blockwise(q, k, v, causal, block_sizes)
  return lambda q, k, v: ops.attention(q, k, v, causal=causal, implementation=name)


def _blockwise(q, k, v, causal, block_sizes):
  """The xla path with explicit block sizes (for tuning the per-backend defaults)."""
  B, T = q.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  out, _ = ops.blockwise_attention(q, k, v, q_positions=pos, kv_positions=pos,
                                   q_segment_ids=None, kv_segment_ids=None, causal=causal,
                                   sliding_window=None, softcap=None,
                                   scale=q.shape[-1] ** -0.5, block_sizes=block_sizes)
  return out


def program(fn, mode):
  """The jitted program timed for `mode`: "fwd" (q, k, v) or "fwd_bwd" (q, k, v, dout)."""
  if mode == "fwd":
    return jax.jit(fn)

  def fwd_bwd(q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout)
  return jax.jit(fwd_bwd)


def attention_flops(B, H, T, D, causal, mode):
  fwd = 4 * B * H * T * T * D / (2 if causal else 1)
  return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


def measure(args, name, mode, T, D):
  """One row of the report: compiled memory and, when it fits the budget, median time."""
  dtype = jnp.dtype(args.dtype)
  q_shape, kv_shape = (args.batch, T, args.heads, D), (args.batch, T, args.kv_heads, D)
  shapes = [q_shape, kv_shape, kv_shape] + ([q_shape] if mode == "fwd_bwd" else [])
  fn = program(attention_fn(name, args.causal, args.xla_blocks), mode)
  row = dict(impl=name, mode=mode, seq_len=T, head_dim=D)
  try:
    compiled = fn.lower(*[jax.ShapeDtypeStruct(s, dtype) for s in shapes]).compile()
  except Exception as e:  # e.g. cuDNN rejects a head dim or dtype: report it, go on
    return dict(row, status=f"unsupported: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
  mem = compiled.memory_analysis()
  need = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  row.update(temp_gib=mem.temp_size_in_bytes / GIB, total_gib=need / GIB)
  if args.compile_only:
    return dict(row, status="compiled")
  if need > args.memory_budget_gib * GIB:
    return dict(row, status=f"over budget ({need / GIB:.1f} > {args.memory_budget_gib} GiB)")
  keys = jax.random.split(jax.random.key(0), len(shapes))
  inputs = [jax.random.normal(key, s, dtype) for key, s in zip(keys, shapes)]
  for _ in range(args.warmup):
    jax.block_until_ready(compiled(*inputs))
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  flops = attention_flops(args.batch, args.heads, T, D, args.causal, mode)
  return dict(row, status="ok", median_ms=median * 1e3, tflops=flops / median / 1e12,
              times_ms=[t * 1e3 for t in times])


def format_row(r):
  timing = (f"{r['median_ms']:11.1f} {r['tflops']:9.4f}" if "median_ms" in r else
            f"{'-':>11} {'-':>9}")
  memory = (f"{r['temp_gib']:9.3f} {r['total_gib']:9.3f}" if "temp_gib" in r else
            f"{'-':>9} {'-':>9}")
  status = "" if r["status"] == "ok" else r["status"]
  return f"{r['impl']:>10} {r['mode']:>8} {r['seq_len']:>7} {r['head_dim']:>4} {timing} {memory}  {status}"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
  p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=8, help="query heads Hq")
  p.add_argument("--kv-heads", type=int, default=8, help="kv heads Hkv (Hq %% Hkv == 0)")
  p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
  p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--impls", nargs="+", default=None,
                 help="default: reference jax_dense xla (+ pallas on TPU, cudnn on GPU)")
  p.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--memory-budget-gib", type=float, default=8.0,
                 help="do not run programs whose compiled memory exceeds this")
  p.add_argument("--compile-only", action="store_true", help="report compiled memory only")
  p.add_argument("--xla-blocks", type=int, nargs=2, default=None, metavar=("BQ", "BKV"),
                 help="block sizes for the xla path (default: the backend's)")
  p.add_argument("--json", default=None, help="also write the rows as JSON lines here")
  args = p.parse_args(argv)
  backend = jax.default_backend()
  args.dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
  args.impls = args.impls or default_implementations(backend)
  args.xla_blocks = ops.BlockSizes(*args.xla_blocks) if args.xla_blocks else None
  if args.heads % args.kv_heads:
    p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
  return args


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  device = jax.devices()[0]
  header = dict(date=datetime.date.today().isoformat(), device=device.device_kind,
                backend=jax.default_backend(), jax=jax.__version__,
                host=f"{platform.machine()}, {os.cpu_count()} cpus",
                command="python " + " ".join(sys.argv), batch=args.batch, heads=args.heads,
                kv_heads=args.kv_heads, dtype=args.dtype, causal=args.causal)
  print("# " + json.dumps(header))
  print(f"{'impl':>10} {'mode':>8} {'seq_len':>7} {'D':>4} {'median_ms':>11} {'TFLOP/s':>9} "
        f"{'temp_GiB':>9} {'total_GiB':>9}")
  out = open(args.json, "w") if args.json else None
  for T in args.seq_lens:
    for D in args.head_dims:
      for mode in args.modes:
        for name in args.impls:
          row = measure(args, name, mode, T, D)
          print(format_row(row), flush=True)
          if out:
            out.write(json.dumps(dict(header, **row)) + "\n")
            out.flush()
  if out:
    out.close()


if __name__ == "__main__":
  main()
