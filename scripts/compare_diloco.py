"""DiLoCo against data parallelism at equal total tokens, on the default corpus (stdlib sources).

Runs experiments/diloco_cpu.py's model and data with: data parallelism over all 8 devices;
DiLoCo with 4 islands at H = 1, 10, 50 (float32 exchange, Nesterov outer lr 0.7, momentum 0.9),
at H = 50 with int4, at H = 50 with plain averaging (outer lr 1, no momentum), and at H = 50
starting from the data-parallel run's checkpoint at half the steps (the paper's warm start); and a
single island (one island's batch, 4x the steps: the same tokens). Held-out loss of the shared
parameters every 50 steps; bytes one island sends, against what data parallelism over the same
4 islands would send (a float32 ring all-reduce of the gradients every step).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/compare_diloco.py \
    --steps 1000 --out docs/diloco.json --plot docs/diloco.png

Prints a markdown table; docs/diloco.md holds the measured one.
"""
import argparse
import json
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import diloco_cpu  # noqa: E402
from lcjax.train import train_and_evaluate  # noqa: E402

PLAIN = dict(kind="none")


def variants(steps, workdir):
  dp_workdir = str(pathlib.Path(workdir, "data_parallel").absolute())
  return {
      "data parallel": dict(mesh=dict(replica=1, data=8), outer=PLAIN, steps=steps),
      "DiLoCo H=1": dict(outer=dict(inner_steps=1), steps=steps),
      "DiLoCo H=10": dict(outer=dict(inner_steps=10), steps=steps),
      "DiLoCo H=50": dict(outer=dict(inner_steps=50), steps=steps),
      "DiLoCo H=50 int4": dict(outer=dict(inner_steps=50, compression="int4"), steps=steps),
      "DiLoCo H=50 averaging": dict(outer=dict(inner_steps=50, lr=1.0, momentum=0.0), steps=steps),
      "DiLoCo H=50 after DP half": dict(  # islands start from the data-parallel run's midpoint
          outer=dict(inner_steps=50, init_from=dp_workdir, init_step=steps // 2), steps=steps),
      "single island": dict(mesh=dict(replica=1, data=8), outer=PLAIN, steps=4 * steps,
                            batch_divisor=4),
  }


def config_for(variant, steps):
  c = diloco_cpu.get_config()
  c.mesh.update(**variant.get("mesh", {}))
  c.outer.update(**variant["outer"])
  divisor = variant.get("batch_divisor", 1)
  c.train.update(steps=variant["steps"], batch_size=c.train.batch_size // divisor,
                 eval_every=c.train.eval_every * divisor, warmup_steps=c.train.warmup_steps * divisor)
  c.checkpoint.every = variant["steps"] // 2  # the midpoint is a warm start for DiLoCo
  return c


def read(workdir):
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  start = next(r for r in records if "model/params" in r)
  tokens_per_step = start["model/tokens_per_step"]
  curve = [(r["step"] * tokens_per_step, r["eval/loss"]) for r in records if "eval/loss" in r]
  train = [r for r in records if "train/loss" in r]
  return {"curve": curve, "start": start, "last_train": train[-1],
          "wall_s": float((workdir / "wall_s.txt").read_text())}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--workdir", default="runs/compare_diloco")
  parser.add_argument("--only", default="", help="comma-separated variant names to run")
  parser.add_argument("--report_only", action="store_true",
                      help="run nothing: tabulate and plot the runs already in --workdir")
  parser.add_argument("--out", default="docs/diloco.json")
  parser.add_argument("--plot", default="docs/diloco.png")
  args = parser.parse_args()
  for name, variant in variants(args.steps, args.workdir).items():
    if args.report_only or (args.only and name not in args.only.split(",")):
      continue
    workdir = _workdir(args, name)
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    train_and_evaluate(config_for(variant, args.steps), workdir)
    (workdir / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}")
  results = {name: read(_workdir(args, name)) for name in variants(args.steps, args.workdir)
             if (_workdir(args, name) / "wall_s.txt").exists()}
  report(results, variants(args.steps, args.workdir), args)


def _workdir(args, name):
  return pathlib.Path(args.workdir) / name.replace(" ", "_").replace("=", "")


def report(results, variants_run, args):
  """Bytes compare each run with data parallelism over the steps it ran as DiLoCo (a warm-started
  run's first half was data parallelism itself)."""
  dp_per_step = next((r["start"]["outer/bytes_data_parallel_per_step"] for r in results.values()
                      if "outer/bytes_data_parallel_per_step" in r["start"]), None)
  dp_loss = results.get("data parallel", {}).get("curve", [(0, None)])[-1][1]
  print("| run | held-out loss | vs data parallel | DiLoCo steps | bytes per island in them | "
        "vs data parallel | wall s |")
  print("|---|---|---|---|---|---|---|")
  for name, r in results.items():
    loss = r["curve"][-1][1]
    rel = f"{100 * (loss / dp_loss - 1):+.1f}%" if dp_loss else ""
    sent = r["last_train"].get("outer/bytes_communicated")
    own_steps = args.steps - variants_run[name]["outer"].get("init_step", 0)
    dp_bytes = own_steps * dp_per_step if dp_per_step else None
    if name == "data parallel":
      sent = dp_bytes
    ratio = f"1/{dp_bytes / sent:.0f}" if sent and dp_bytes else ""
    diloco_steps = own_steps if sent is not None and name != "data parallel" else "-"
    print(f"| {name} | {loss:.4f} | {rel} | {diloco_steps} | {sent if sent is not None else '-'} | "
          f"{ratio} | {r['wall_s']:.0f} |")
  pathlib.Path(args.out).write_text(json.dumps(
      {name: {"curve": r["curve"], "bytes": r["last_train"].get("outer/bytes_communicated"),
              "wall_s": r["wall_s"]} for name, r in results.items()}, indent=1))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, r in results.items():
    tokens, losses = zip(*r["curve"])
    ax.plot([t / 1e6 for t in tokens], losses, marker="o", markersize=3, label=name)
  ax.set_xlabel("training tokens (millions)")
  ax.set_ylabel("held-out loss of the shared parameters (nats/token)")
  ax.set_ylim(top=min(4.5, ax.get_ylim()[1]))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
  main()
