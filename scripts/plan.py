"""The fastest configuration of a training step that fits a compile target (lcjax/plan.py):
searches sequence parallelism (ring x ulysses), MsT, remat and optimizer offload by compiling
candidates for the target, keeps those that fit its memory with a margin, ranks them by the cost
model's predicted step time, and prints the table and the winning --config.* flags:

  python scripts/plan.py --config=experiments/llama3_8b.py --target=tpu:v5p:2x2x2 \
    --seq_len=131072 --batch_size=8

Prints one line per compile as it goes, then a markdown table, fastest fitting first.
"""
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_TARGET = flags.DEFINE_string("target", None, "compile target (tpu:v5p:2x2x2, gpu:h100:8, ...)")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "tokens per sequence (default: the config's)")
_BATCH = flags.DEFINE_integer("batch_size", None, "sequences per step (default: the config's)")
_MARGIN = flags.DEFINE_float("margin", 0.05, "fraction of the target's memory kept free")
_REMAT = flags.DEFINE_list("remat", None, "remat policies to try (default: all)")
flags.mark_flags_as_required(["config", "target"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices: no accelerator wanted
  from lcjax import plan, targets
  config = _CONFIG.value
  seq_len = _SEQ_LEN.value or config.train.seq_len
  batch = _BATCH.value or config.train.batch_size
  if seq_len < 1 or batch < 1 or not 0 <= _MARGIN.value < 1:
    raise SystemExit("plan.py: error: --seq_len and --batch_size must be >= 1 and --margin in "
                     f"[0, 1); got {seq_len}, {batch}, {_MARGIN.value}")
  remats = tuple(_REMAT.value or plan.REMAT_BY_MEMORY)
  bad = [r for r in remats if r not in plan.REMAT_BY_MEMORY]
  if bad:
    raise SystemExit(f"plan.py: error: unknown remat policies {bad}; valid: {plan.REMAT_BY_MEMORY}")
  try:
    target = targets.parse(_TARGET.value)
    print(f"{target.name}: {target.chips} chips, {target.hbm_bytes_per_device / 2**30:.1f} GiB "
          f"per device (keeping {100 * _MARGIN.value:g}% free); {seq_len} tokens x {batch} "
          "sequences", flush=True)

    def show(r):
      if r.memory is not None or not r.note.startswith("not compiled"):
        what = r.memory.describe() if r.memory else r.note
        print(f"  {r.candidate.describe()}: {what}", flush=True)

    rows = plan.search(config, target, seq_len, batch_size=batch, margin=_MARGIN.value,
                       remats=remats, isolated=True, on_row=show)
  except (ValueError, ImportError) as e:
    raise SystemExit(f"plan.py: error: {e}")
  print("\n| ring | ulysses | fsdp | MsT | remat | opt. offload | memory (GiB) | fits | "
        "predicted step (s) | note |\n|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    c, m = r.candidate, r.memory
    memory = "-" if m is None else ("OOM " + plan.gib(m.total) if m.exhausted else plan.gib(m.total))
    print(f"| {c.ring} | {c.ulysses} | {c.fsdp} | {'on' if c.mst else 'off'} | {c.remat} | "
          f"{'on' if c.offload else 'off'} | {memory} | {'yes' if r.fits else 'no'} | "
          f"{r.prediction.step_s:.3f} | {r.note} |")
  best = rows[0] if rows and rows[0].fits else None
  if best is None:
    raise SystemExit(f"plan.py: nothing fits {target.name} at {seq_len} tokens x {batch}: add "
                     "chips, or shorten the sequence")
  model_cfg = plan.model_config(config)
  print(f"\nplan: {best.candidate.describe()}: {plan.gib(best.memory.total)} GiB, predicted "
        f"{best.prediction.step_s:.3f} s per step\n  {plan.flags(best, model_cfg, seq_len, batch)}")


if __name__ == "__main__":
  app.run(main)
