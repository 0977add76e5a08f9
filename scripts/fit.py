"""Longest sequence whose training step fits a per-device memory budget, for each
(MsT off/on) x remat policy. Compiles ahead of time from abstract shapes: nothing is allocated,
so real model shapes are planned on a CPU, for a compile target (lcjax.targets: the TPU or GPU
compiler, judged against the target's memory) or for this machine's devices:

  python scripts/fit.py --config=experiments/llama3_8b.py --target=tpu:v5p:2x2x1 \
    --config.mesh.fsdp=4 --config.train.batch_size=4
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python scripts/fit.py --config=experiments/llama3_8b.py --memory_gb=80

Without --target, memory analysis is this machine's backend's (CPU: no separate host memory, so
the `offload` policy is left out, and the sum of buffers stands in for the compiler's peak).
"""
import math
import os
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lcjax import cli  # noqa: E402


def _flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, "experiment config file; --config.a.b=v overrides a key",
                      flag_values=fv)
  flags.DEFINE_string("target", None, "compile for this accelerator (tpu:v5p:2x2x2, gpu:h100:8, "
                      "...; lcjax.targets); the budget defaults to its memory", flag_values=fv)
  flags.DEFINE_float("memory_gb", None, "per-device memory budget in GiB (default: the target's "
                     "memory per device; 80 without a target)", flag_values=fv)
  flags.DEFINE_integer("granularity", 1024, "sequence lengths are multiples of this",
                       flag_values=fv)
  flags.DEFINE_integer("max_len", 1 << 22, "longest sequence to consider", flag_values=fv)
  flags.DEFINE_list("remat", None, "remat policies to try (default: none, full, dots, and "
                    "offload where the devices have a separate host memory)", flag_values=fv)
  return fv


def _check(fv):
  from lcjax import config as config_lib
  gib = fv.memory_gb
  if gib is not None and not (math.isfinite(gib) and gib > 0):
    raise ValueError(f"--memory_gb must be a positive number of GiB; got {gib:g}")
  for name in ("granularity", "max_len"):
    if fv[name].value < 1:
      raise ValueError(f"--{name} must be >= 1; got {fv[name].value}")
  if fv.max_len < fv.granularity:
    raise ValueError(f"--max_len ({fv.max_len}) is below --granularity ({fv.granularity}): no "
                     "length to try")
  for policy in fv.remat or ():
    if policy not in config_lib.REMAT_POLICIES:
      raise ValueError(f"--remat: {policy!r} is not one of {config_lib.REMAT_POLICIES}")


def _main(argv):
  argv, overrides = cli.split_overrides(argv)
  fv = _flags()
  cli.parse_flags(fv, argv, required=("config",), doc=__doc__)
  _check(fv)
  from lcjax import config as config_lib
  config = cli.apply_overrides(cli.load_config(fv.config), overrides, config_lib.base_config())
  config = config_lib.validate(config)
  if fv.target:  # compile-only devices: no accelerator of this host is wanted
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from lcjax import fit, targets
  from lcjax.ops import manual
  target = targets.parse(fv.target) if fv.target else None
  devices = target.devices() if target else jax.devices()
  gib = fv.memory_gb
  if gib is None:
    gib = target.hbm_bytes_per_device / 2**30 if target else 80.0
  platform = manual.platform_of(devices[0])
  policies = fv.remat or (["none", "full", "dots"] + ([] if platform == "cpu" else ["offload"]))
  print(f"budget {gib:g} GiB per device; {target.name if target else platform}, {len(devices)} "
        f"devices; MsT chunks {fit.mst_chunks(config.model)}")
  rows = fit.fit_table(config, int(gib * 2**30), policies, granularity=fv.granularity,
                       max_len=fv.max_len, devices=devices,
                       on_probe=lambda m: print(f"  probe T={m.seq_len}: {m.describe()}",
                                                flush=True))
  print("\n| MsT | remat | longest sequence | memory (GiB) |\n|---|---|---|---|")
  for r in rows:
    print(f"| {'on' if r['mst'] else 'off'} | {r['remat']} | {r['seq_len']} | {r['memory_gb']:.2f} |")
  sys.stdout.flush()


def main(argv=None) -> int:
  return cli.run(_main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
