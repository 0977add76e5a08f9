"""DiPaCo against its baselines at equal inner steps, from one base run (experiments/dipaco_cpu.py).

The base run trains the dense model on the whole corpus to step BASE_STEPS; every other run goes
on from its checkpoint (parameters, AdamW moments, step) to step STEPS, so each path, island or
dense model takes the same number of inner steps:
  dense                 the base model alone, on one path's tokens per step (batch B / 4)
  dense, 4x the batch   ... on all 4 paths' tokens per step (batch B, data parallel)
  DiLoCo P=4            4 islands on uniform shares of every batch, synced every 50 steps
  flat MoE P=4          4 paths, nothing shared (every part private): they never exchange
  DiPaCo 2x2            4 paths over a 2x2 grid of modules, embedding and head shared by all
  DiPaCo 2x2 private    ... with the embedding and the head private to each path
  DiPaCo 2x2 discrim.   the 2x2 run's state at step STEPS - 250, re-routed by a logistic router
                        fitted on router documents labelled by its paths, then to STEPS
  DiPaCo 2x4 rounds     8 paths on the 4 islands in 2 rounds (STEPS + 500: equal inner steps)
The paths are routed by k-means (P clusters) on the base model's features; the DiPaCo runs keep
15% of the train documents apart as router data (the discriminative router is fitted on them).
Every run is scored on every held-out token after each document's first 32 (the routing
prefix), each document by the path it is routed to.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/compare_dipaco.py \
    --out docs/dipaco.json --plot docs/dipaco.png

Prints a markdown table; docs/dipaco.md holds the measured one.
"""
import argparse
import json
import os
import pathlib
import re
import shutil
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import dipaco_cpu  # noqa: E402
from lcjax.train import train_and_evaluate  # noqa: E402

PLAIN, DIPACO_STEPS = dict(kind="none"), dipaco_cpu.STEPS
EVERYTHING = "embed,head,level0,level1"


def variants(root: pathlib.Path) -> dict:
  """name -> (config argument, updates of the config, runs it needs first)."""
  base = str(root / "base")
  two_by_two = str(root / "dipaco_2x2")
  return {
      "base": ("base", {}, []),
      "dense": ("base", dict(outer=dict(PLAIN, init_from=base), steps=DIPACO_STEPS,
                             batch_divisor=4), ["base"]),
      "dense, 4x the batch": ("base", dict(outer=dict(PLAIN, init_from=base),
                                           steps=DIPACO_STEPS), ["base"]),
      "DiLoCo P=4": ("base", dict(mesh=dict(replica=4, data=2), steps=DIPACO_STEPS,
                                  outer=dict(kind="diloco", init_from=base)), ["base"]),
      "flat MoE P=4": ("dipaco", dict(outer=dict(base_from=base, private=EVERYTHING)), ["base"]),
      "DiPaCo 2x2": ("dipaco", dict(outer=dict(base_from=base)), ["base"]),
      "DiPaCo 2x2 private embed+head": ("dipaco", dict(outer=dict(base_from=base,
                                                                  private="embed,head")), ["base"]),
      "DiPaCo 2x2 discriminative": ("dipaco", dict(outer=dict(
          base_from=base, routing="discriminative", init_from=two_by_two,
          init_step=DIPACO_STEPS - 250)), ["base", "DiPaCo 2x2"]),
      "DiPaCo 2x4 rounds": ("dipaco", dict(outer=dict(base_from=base, modules="2x4"),
                                           steps=DIPACO_STEPS + 500), ["base"]),
  }


def config_for(arg: str, updates: dict):
  c = dipaco_cpu.get_config(arg)
  c.mesh.update(**updates.get("mesh", {}))
  c.outer.update(**updates.get("outer", {}))
  c.train.steps = updates.get("steps", c.train.steps)
  c.train.batch_size //= updates.get("batch_divisor", 1)
  return c


def workdir_of(root, name) -> pathlib.Path:
  return root / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def read(workdir: pathlib.Path) -> dict:
  """Held-out loss against steps and against FLOPs trained after the base, bytes, shards."""
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  start = [r for r in records if "model/flops_per_step" in r][-1]  # the last (re)start
  first_step = 0 if workdir.name == "base" else dipaco_cpu.BASE_STEPS  # discriminative: from
  flops = start["model/flops_per_step"]  # the base too (its k-means half has the same FLOPs)
  evals = [r for r in records if "eval/loss" in r]
  train = [r for r in records if "train/loss" in r]
  return {"steps": [r["step"] for r in evals], "loss": [r["eval/loss"] for r in evals],
          "flops": [(r["step"] - first_step) * flops for r in evals],
          "paths": {k: v for k, v in evals[-1].items() if k.startswith("eval/loss/path")},
          "bytes": train[-1].get("outer/bytes_communicated", 0) if train else 0,
          "shard_tokens": start.get("outer/shard_tokens"),
          "shard_documents": start.get("outer/shard_documents"),
          "flops_per_step": flops, "tokens_per_step": start["model/tokens_per_step"],
          "wall_s": float((workdir / "wall_s.txt").read_text())}


def run(name, spec, root, done):
  arg, updates, needs = spec
  for need in needs:
    if need not in done:
      raise SystemExit(f"{name} needs the run {need!r}: run it first (or drop --only)")
  workdir = workdir_of(root, name)
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.perf_counter()
  train_and_evaluate(config_for(arg, updates), workdir)
  (workdir / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}")


def report(results: dict, args):
  dense = results.get("dense", {}).get("loss", [None])[-1]
  print("| run | held-out loss at the end | vs dense | vs DiLoCo P=4 | steps | FLOPs after base "
        "| bytes sent per island | shard tokens (documents) | wall s |")
  print("|---|---|---|---|---|---|---|---|---|")
  diloco = results.get("DiLoCo P=4", {}).get("loss", [None])[-1]
  for name, r in results.items():
    loss = r["loss"][-1]
    rel = (lambda ref: f"{100 * (loss / ref - 1):+.2f}%" if ref else "")
    shards = ("" if not r["shard_tokens"] else
              ", ".join(f"{t / 1e6:.2f}M ({d})" for t, d in zip(r["shard_tokens"],
                                                                 r["shard_documents"])))
    print(f"| {name} | {loss:.4f} | {rel(dense)} | {rel(diloco)} | {r['steps'][-1]} | "
          f"{r['flops'][-1]:.3g} | {r['bytes']:,} | {shards} | {r['wall_s']:.0f} |")
  pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (by_step, by_flops) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for name, r in results.items():
    if name == "base":
      continue
    by_step.plot(r["steps"], r["loss"], marker="o", markersize=3, label=name)
    by_flops.plot(r["flops"], r["loss"], marker="o", markersize=3, label=name)
  by_step.set_xlabel("step (inner steps of every path; the base run ends at "
                     f"{dipaco_cpu.BASE_STEPS})")
  by_flops.set_xlabel("training FLOPs after the base run")
  by_flops.set_xscale("log")
  by_step.set_ylabel("held-out loss, routed (nats/byte, after the 32-byte prefix)")
  for ax in (by_step, by_flops):
    ax.grid(alpha=0.3)
  by_step.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/compare_dipaco")
  parser.add_argument("--only", default="", help="comma-separated run names (the runs they "
                      "start from must be in --workdir already)")
  parser.add_argument("--report_only", action="store_true",
                      help="run nothing: tabulate and plot the runs already in --workdir")
  parser.add_argument("--out", default="docs/dipaco.json")
  parser.add_argument("--plot", default="docs/dipaco.png")
  args = parser.parse_args()
  root = pathlib.Path(args.workdir).absolute()
  specs = variants(root)
  done = {name for name in specs if (workdir_of(root, name) / "wall_s.txt").exists()}
  only = set(filter(None, args.only.split(",")))
  unknown = only - set(specs)
  if unknown:
    raise SystemExit(f"--only: unknown runs {sorted(unknown)}; choose from {list(specs)}")
  for name, spec in specs.items():
    if args.report_only or (only and name not in only):
      continue
    run(name, spec, root, done)
    done.add(name)
  report({name: read(workdir_of(root, name)) for name in specs if name in done}, args)


if __name__ == "__main__":
  main()
