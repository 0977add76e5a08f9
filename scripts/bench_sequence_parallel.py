"""USP comparison at small scale: every strategy and ring x ulysses split on 8 (fake) devices.

For each configuration: median step time of attention forward + backward, per-device compiled
memory (memory_analysis), bytes sent per device by the compiled collectives next to the cost
model's prediction, and per-device memory at a longer sequence (compile only). Then the cost
model's table for Llama3-8B attention at 128K and 1M tokens on 8 and 64 H100s.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python scripts/bench_sequence_parallel.py --out docs/sequence_parallel.png

On CPU the 8 devices share the host's cores, so step times add up the work of all devices:
they compare total cost (compute + collectives + layout copies), not parallel speed.
"""
import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from lcjax.ops import cost_model as cm  # noqa: E402
from lcjax.ops.hlo_collectives import collective_bytes  # noqa: E402
from lcjax.ops.sequence_parallel import sequence_parallel_attention  # noqa: E402

# usp 1x8 is pure Ulysses and 8x1 the pure (zigzag) ring; all-gather KV ignores the split
CONFIGS = [("usp", 1, 8), ("usp", 2, 4), ("usp", 4, 2), ("usp", 8, 1), ("allgather", 8, 1)]


def _step(strategy, R, U, args, seq_len, *, layout="zigzag"):
  """Jitted grad of sum(out * cos(out)) and its sharded input shapes."""
  mesh = jax.make_mesh((R, U), ("ring", "ulysses"), axis_types=(AxisType.Explicit,) * 2)
  sharding = NamedSharding(mesh, P(None, ("ring", "ulysses")))
  shapes = [jax.ShapeDtypeStruct((args.batch, seq_len, h, args.head_dim), jnp.float32,
                                 sharding=sharding)
            for h in (args.heads, args.kv_heads, args.kv_heads)]

  def loss(q, k, v):
    out = sequence_parallel_attention(q, k, v, mesh=mesh, strategy=strategy, layout=layout,
                                      causal=True, implementation=args.implementation)
    return jnp.sum(out * jnp.cos(out))

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
  return compiled, shapes


def _memory(compiled):
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def measure(args):
  rows = []
  for strategy, R, U in CONFIGS:
    compiled, shapes = _step(strategy, R, U, args, args.seq_len)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    inputs = [jax.device_put(jax.random.normal(k, s.shape, s.dtype), s.sharding)
              for k, s in zip(keys, shapes)]
    jax.block_until_ready(compiled(*inputs))  # warm-up
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*inputs))
      times.append(time.perf_counter() - t)
    shape = cm.AttentionShape(args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim,
                              bytes_per_element=4)
    predicted = sum(cm.comm_bytes(strategy, shape, R, U, backward=True).values())
    long_compiled, _ = _step(strategy, R, U, args, args.long_seq_len)
    rows.append(dict(strategy=strategy, ring=R, ulysses=U, step_ms=1e3 * float(np.median(times)),
                     memory_bytes=_memory(compiled),
                     sent_bytes=sum(collective_bytes(compiled.as_text()).values()),
                     predicted_bytes=predicted, long_memory_bytes=_memory(long_compiled)))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def markdown(rows, args):
  lines = [f"| strategy | ring x ulysses | step ms (median of {args.repeats}) | memory / device "
           f"(S={args.seq_len}) | bytes sent / device (HLO) | cost model | memory / device "
           f"(S={args.long_seq_len}) |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['strategy']} | {r['ring']}x{r['ulysses']} | {r['step_ms']:.0f} | "
                 f"{r['memory_bytes'] / 2**20:.1f} MiB | {r['sent_bytes'] / 2**20:.2f} MiB | "
                 f"{r['predicted_bytes'] / 2**20:.2f} MiB | "
                 f"{r['long_memory_bytes'] / 2**20:.1f} MiB |")
  return "\n".join(lines)


def plot(rows, path):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  labels = [f"{r['strategy']}\n{r['ring']}x{r['ulysses']}" for r in rows]
  panels = [("step time (ms)", [r["step_ms"] for r in rows]),
            ("memory / device (MiB)", [r["memory_bytes"] / 2**20 for r in rows]),
            ("sent / device (MiB)", [r["sent_bytes"] / 2**20 for r in rows])]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, (title, values) in zip(axes, panels):
    ax.bar(range(len(rows)), values, color=["C0" if r["strategy"] == "usp" else "C1" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_title(title)
  fig.suptitle("attention fwd+bwd on 8 fake CPU devices (USP splits ring x ulysses; all-gather KV)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def cost_table():
  """Markdown: the cost model on Llama3-8B attention (32 heads, 8 kv heads, head dim 128, bf16)."""
  lines = ["| tokens | GPUs | strategy | ring x ulysses | sent / device / layer | exposed comm "
           "| attention compute | activation memory / device |", "|---|---|---|---|---|---|---|---|"]
  for S in (1 << 17, 1 << 20):
    for devices in (8, 64):
      shape = cm.AttentionShape(1, S, 32, 8, 128)
      for e in cm.table(shape, devices):
        lines.append(f"| {S // 1024}K | {devices} | {e.strategy} | {e.ring}x{e.ulysses} | "
                     f"{e.bytes_sent / 2**30:.2f} GiB | {e.comm_s * 1e3:.1f} ms | "
                     f"{e.compute_s * 1e3:.0f} ms | {e.memory_bytes / 2**30:.2f} GiB |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--long_seq_len", type=int, default=65536)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--implementation", default="auto")
  p.add_argument("--out", default=None, help="PNG path for the plot")
  p.add_argument("--cost_table_only", action="store_true")
  args = p.parse_args()
  print(f"# {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d')}")
  if not args.cost_table_only:
    rows = measure(args)
    print(markdown(rows, args))
    if args.out:
      plot(rows, args.out)
  print(cost_table())


if __name__ == "__main__":
  main()
