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
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_TARGET = flags.DEFINE_string("target", None, "compile for this accelerator (tpu:v5p:2x2x2, "
                              "gpu:h100:8, ...; lcjax.targets); the budget defaults to its memory")
_MEMORY_GB = flags.DEFINE_float("memory_gb", None, "per-device memory budget in GiB (default: the "
                                "target's memory per device; 80 without a target)")
_GRANULARITY = flags.DEFINE_integer("granularity", 1024, "sequence lengths are multiples of this")
_MAX_LEN = flags.DEFINE_integer("max_len", 1 << 22, "longest sequence to consider")
_REMAT = flags.DEFINE_list("remat", None, "remat policies to try (default: none, full, dots, and "
                           "offload where the devices have a separate host memory)")
flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _TARGET.value:  # compile-only devices: no accelerator of this host is wanted
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from lcjax import fit, targets
  from lcjax.ops import manual
  try:
    target = targets.parse(_TARGET.value) if _TARGET.value else None
    devices = target.devices() if target else jax.devices()
  except (ValueError, ImportError) as e:
    raise SystemExit(f"fit.py: error: {e}")
  gib = _MEMORY_GB.value
  if gib is None:
    gib = target.hbm_bytes_per_device / 2**30 if target else 80.0
  if not gib > 0:
    raise SystemExit(f"fit.py: error: --memory_gb must be a positive number of GiB; got {gib:g}")
  for name, value in (("granularity", _GRANULARITY.value), ("max_len", _MAX_LEN.value)):
    if value < 1:
      raise SystemExit(f"fit.py: error: --{name} must be >= 1; got {value}")
  platform = manual.platform_of(devices[0])
  policies = _REMAT.value or (["none", "full", "dots"] + ([] if platform == "cpu" else ["offload"]))
  print(f"budget {gib:g} GiB per device; {target.name if target else platform}, {len(devices)} "
        f"devices; MsT chunks {fit.mst_chunks(_CONFIG.value.model)}")
  try:
    rows = fit.fit_table(_CONFIG.value, int(gib * 2**30), policies,
                         granularity=_GRANULARITY.value, max_len=_MAX_LEN.value, devices=devices,
                         on_probe=lambda m: print(f"  probe T={m.seq_len}: {m.describe()}",
                                                  flush=True))
  except ValueError as e:
    raise SystemExit(f"fit.py: error: {e}")
  print("\n| MsT | remat | longest sequence | memory (GiB) |\n|---|---|---|---|")
  for r in rows:
    print(f"| {'on' if r['mst'] else 'off'} | {r['remat']} | {r['seq_len']} | {r['memory_gb']:.2f} |")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
