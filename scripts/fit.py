"""Longest sequence whose training step fits a per-device memory budget, for each
(MsT off/on) x remat policy. Compiles ahead of time from abstract shapes: nothing is allocated,
so real model shapes are planned on a CPU (with fake devices for the config's mesh):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python scripts/fit.py --config=experiments/llama3_8b.py --memory_gb=80

Memory analysis is the compiling backend's: plan on the target backend where one is at hand.
The `offload` policy saves device memory only on backends with a separate host memory (not CPU).
"""
import jax
from absl import app, flags
from ml_collections import config_flags

from lcjax import fit

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_MEMORY_GB = flags.DEFINE_float("memory_gb", 80.0, "per-device memory budget in GiB")
_GRANULARITY = flags.DEFINE_integer("granularity", 1024, "sequence lengths are multiples of this")
_MAX_LEN = flags.DEFINE_integer("max_len", 1 << 22, "longest sequence to consider")
_REMAT = flags.DEFINE_list("remat", None, "remat policies to try (default: all the backend can "
                           "measure: none, full, dots, and offload off CPU)")
flags.mark_flag_as_required("config")


def main(argv):
  del argv
  policies = _REMAT.value or (["none", "full", "dots"] +
                              ([] if jax.default_backend() == "cpu" else ["offload"]))
  budget = int(_MEMORY_GB.value * 2**30)
  print(f"budget {_MEMORY_GB.value:g} GiB per device; backend {jax.default_backend()}, "
        f"{jax.device_count()} devices; MsT chunks {fit.mst_chunks(_CONFIG.value.model)}")
  rows = fit.fit_table(_CONFIG.value, budget, policies, granularity=_GRANULARITY.value,
                       max_len=_MAX_LEN.value,
                       on_probe=lambda m: print(f"  probe T={m.seq_len}: {m.total / 2**30:.2f} GiB",
                                                flush=True))
  print("\n| MsT | remat | longest sequence | memory (GiB) |\n|---|---|---|---|")
  for r in rows:
    print(f"| {'on' if r['mst'] else 'off'} | {r['remat']} | {r['seq_len']} | {r['memory_gb']:.1f} |")


if __name__ == "__main__":
  app.run(main)
