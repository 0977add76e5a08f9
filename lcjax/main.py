"""CLI: python -m lcjax.main --config=experiments/tiny_cpu.py --workdir=DIR [--config.a.b=v]
[--dry_run [--target=tpu:v5p:2x2x2 | gpu:h100:8 | ...]]"""
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics); resumed if present")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "compile the step, report its size and memory, exit")
_TARGET = flags.DEFINE_string("target", None, "with --dry_run: compile for this accelerator's "
                              "compile-only devices (lcjax.targets: tpu:v5p:2x2x2, tpu:v6e:4x4, "
                              "gpu:h100:8, gpu:h200:2x8, ...) and judge fit by its memory")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _TARGET.value:  # compile-only devices: no accelerator of this host is wanted
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from lcjax import train  # after absl parsed flags, so JAX sees the environment as set
  try:
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, dry_run=_DRY_RUN.value,
                                      target=_TARGET.value)
  except (ValueError, ImportError) as e:
    raise SystemExit(f"lcjax: error: {e}")
  print(json.dumps(result, indent=1, sort_keys=True))
  if "eval/loss" in result:
    loss, unigram = result["eval/loss"], result["data/unigram_entropy"]
    print(f"[lcjax] held-out loss {loss:.3f} nats/token vs unigram entropy {unigram:.3f} of the "
          f"corpus: {100 * (1 - loss / unigram):.0f}% below")


if __name__ == "__main__":
  app.run(main)
