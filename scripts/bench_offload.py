"""Deep Optimizer States: train step time for four placements of the AdamW state, on one model.

  (a) device:      the whole state on the device (optim.offload=False)
  (b) round trip:  offloaded, one subgroup, updated on the device (move all in, update, move out)
  (c) host:        offloaded, every subgroup updated on the host
  (d) scheduled:   offloaded, the performance model's split (optim.update_on=auto)

For (b)-(d) the model's predicted update time (from figures measured at start) is printed beside
the measured step time and the measured update time alone.

  JAX_PLATFORMS=cpu python scripts/bench_offload.py --out docs/bench/offload_cpu.json

On CPU, host and device memory are the same RAM: the figures check the machinery and the model's
bookkeeping, not the savings. On a GPU, use a model whose state is several GB (--embed 2048 ...).
"""
import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lcjax import config as config_lib  # noqa: E402
from lcjax import parts as parts_lib  # noqa: E402
from lcjax import program as program_lib  # noqa: E402
from lcjax.train import prepare  # noqa: E402

CASES = {"a_device": dict(offload=False),
         "b_round_trip": dict(offload=True, update_on="device", subgroup_mb=1e6),
         "c_host": dict(offload=True, update_on="host"),
         "d_scheduled": dict(offload=True, update_on="auto")}


def _config(args, optim):
  c = config_lib.base_config()
  c.train.update(batch_size=args.batch, seq_len=args.seq_len, steps=1000, warmup_steps=10,
                 sample_prompt="")
  c.mesh.update(data=-1)
  c.model.update(num_layers=args.layers, embed_dim=args.embed, num_heads=args.embed // 64,
                 num_kv_heads=args.embed // 128, head_dim=64, mlp_dim=3 * args.embed)
  c.optim.update(**{"subgroup_mb": args.subgroup_mb, **optim})
  c.data.max_documents = 50
  return config_lib.validate(c)


def run_case(args, name, optim):
  prepared = prepare(_config(args, optim))
  c, mesh, ds, model_cfg = prepared
  with jax.set_mesh(mesh):
    program = program_lib.build(prepared)
    state, _ = program.init(program_lib.Scratch())
    batch = parts_lib.device_batch(ds.train_batch(0, c.train.batch_size), program.batch_sharding)
    runner, _ = program.compile(parts_lib.abstract_batch(c.train.batch_size, c.train.seq_len,
                                                         program.batch_sharding))
    times = []
    for i in range(args.steps + 2):  # two warm-up steps
      start = time.perf_counter()
      state, metrics = runner(state, batch)
      jax.block_until_ready((state, metrics))
      if i >= 2:
        times.append(time.perf_counter() - start)
    row = {"case": name, "params": model_cfg.param_count(),
           "step_s": float(np.median(times))}
    row.update(program.describe())
    row.update(program.stage.measure(state))
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--embed", type=int, default=512)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--subgroup_mb", type=float, default=4.0)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  rows = [run_case(args, name, optim) for name, optim in CASES.items()]
  base = rows[0]["step_s"]
  print(f"{'case':14s} {'step_s':>9s} {'x(a)':>6s} {'update_s':>9s} {'predicted_s':>11s} device_subgroups")
  for r in rows:
    print(f"{r['case']:14s} {r['step_s']:9.4f} {r['step_s'] / base:6.2f} "
          f"{r.get('optim/measured_update_s', float('nan')):9.4f} "
          f"{r.get('optim/predicted_update_s', float('nan')):11.4f} "
          f"{len(r['optim/device_subgroups']) if 'optim/subgroups' in r else '-'}/"
          f"{r.get('optim/subgroups', '-')}")
  if args.out:
    with open(args.out, "w") as f:
      for r in rows:
        f.write(json.dumps({"device": jax.devices()[0].device_kind, **r}) + "\n")


if __name__ == "__main__":
  main()
