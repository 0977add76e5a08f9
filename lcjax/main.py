"""CLI: python -m lcjax.main --config=experiments/tiny_cpu.py --workdir=DIR [--config.a.b=v]
[--dry_run [--target=tpu:v5p:2x2x2 | gpu:h100:8 | ...]]
[--coordinator=HOST:PORT --num_processes=N --process_id=I]

Several processes (hosts) run the same command, each with its --process_id (scripts/launch_*.sh);
under SLURM, Open MPI or on a TPU VM pod the three flags are found in the environment instead.

Exit status: 0 done, 1 bad input (one `lcjax: error:` line), 3 stopped on a non-finite loss,
75 preempted by SIGTERM/SIGINT after saving a checkpoint (rerun the same command to resume).
"""
import json
import os
import sys

from absl import flags, logging

from lcjax import cli


def _flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, "experiment config file (FILE.py or FILE.py:ARG); "
                      "--config.section.key=VALUE overrides one key", flag_values=fv)
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics); resumed if present",
                      flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "compile the step, report its size and memory, exit",
                    flag_values=fv)
  flags.DEFINE_string("target", None, "with --dry_run: compile for this accelerator's "
                      "compile-only devices (lcjax.targets: tpu:v5p:2x2x2, tpu:v6e:4x4, "
                      "gpu:h100:8, gpu:h200:2x8, ...) and judge fit by its memory", flag_values=fv)
  flags.DEFINE_string("coordinator", None, "multi-process run: HOST:PORT of process 0's "
                      "coordination service", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "multi-process run: how many processes",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "multi-process run: this process's index, 0 .. N-1",
                       flag_values=fv)
  return fv


def _main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  argv, overrides = cli.split_overrides(argv)
  fv = _flags()
  cli.parse_flags(fv, argv, required=("config", "workdir"), doc=__doc__)
  from lcjax import config as config_lib
  config = cli.apply_overrides(cli.load_config(fv.config), overrides, config_lib.base_config())
  if fv.target:  # compile-only devices: no accelerator of this host is wanted
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from lcjax import distributed
  processes = distributed.from_flags(fv.coordinator, fv.num_processes, fv.process_id)
  if processes and fv.target:
    raise ValueError("--target compiles on this one machine for compile-only devices; drop "
                     "--coordinator/--num_processes/--process_id (or the cluster's variables)")
  distributed.initialize(processes)
  from lcjax import train  # after the flags, so JAX sees the environment as set
  result = train.train_and_evaluate(config, fv.workdir, dry_run=fv.dry_run, target=fv.target)
  if not distributed.is_leader():
    return
  print(json.dumps(result, indent=1, sort_keys=True))
  if "eval/loss" in result:
    loss, unigram = result["eval/loss"], result["data/unigram_entropy"]
    print(f"[lcjax] held-out loss {loss:.3f} nats/token vs unigram entropy {unigram:.3f} of the "
          f"corpus: {100 * (1 - loss / unigram):.0f}% below")


def main(argv=None) -> int:
  """The exit status of the command line `argv` (program name first; default sys.argv)."""
  return cli.run(_main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
