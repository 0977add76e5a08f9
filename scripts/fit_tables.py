"""The fit tables of docs/targets.md: for one compile target, the longest power-of-two sequence
(8K to 1M tokens) whose training step fits the target's memory, for each combination of lcjax's
techniques, one sequence per chip and one sequence spread over all chips:

  python scripts/fit_tables.py --config=experiments/llama3_8b.py --target=tpu:v5p:2x2x1 \
    --out=docs/bench/fit_v5p_2x2x1.jsonl

Each compile prints one line (length, combination, the compiler's peak or its out-of-memory
message); the JSONL gets one record per compile and one per combination with the answer.
"""
import json
import math
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_TARGET = flags.DEFINE_string("target", None, "compile target (tpu:v5p:2x2x1, gpu:h100:8, ...)")
_OUT = flags.DEFINE_string("out", None, "JSONL file to append the records to")
_COMBOS = flags.DEFINE_list("combos", None, "names of the combinations to measure (default: all)")
_MIN_LOG2 = flags.DEFINE_integer("min_log2", 13, "shortest length: 2**min_log2 tokens")
_MAX_LOG2 = flags.DEFINE_integer("max_log2", 20, "longest length: 2**max_log2 tokens")
flags.mark_flags_as_required(["config", "target", "out"])

# name -> (one sequence over all chips?, MsT, remat, optimizer offload: "" off, else where the
# update runs: "host" keeps the state in host memory throughout, "device" streams it through)
COMBOS = {
    "remat_full": (False, False, "full", ""),
    "mst_remat_full": (False, True, "full", ""),
    "mst_remat_offload": (False, True, "offload", ""),
    "mst_remat_full_opt_offload": (False, True, "full", "host"),
    "mst_remat_full_opt_offload_device_lane": (False, True, "full", "device"),
    "mst_remat_offload_opt_offload": (False, True, "offload", "host"),
    "usp_mst_remat_full": (True, True, "full", ""),
    "usp_mst_remat_offload_opt_offload": (True, True, "offload", "host"),
}


def overrides(name, chips, model_config):
  """The --config overrides of combination `name` on `chips` chips (a planner candidate's)."""
  from lcjax import plan
  spread, mst, remat, offload = COMBOS[name]
  ulysses = math.gcd(chips, model_config.num_kv_heads) if spread else 1
  candidate = plan.Candidate(ring=chips // ulysses if spread else 1, ulysses=ulysses,
                             fsdp=1 if spread else chips, mst=mst, remat=remat,
                             offload=bool(offload))
  return {**candidate.overrides(model_config), "optim.update_on": offload or "auto",
          "train.batch_size": 1 if spread else chips}


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices: no accelerator wanted
  from lcjax import fit, plan, targets
  target = targets.parse(_TARGET.value)
  budget = target.hbm_bytes_per_device
  model_config = plan.model_config(_CONFIG.value)
  names = _COMBOS.value or list(COMBOS)
  lengths = [2 ** e for e in range(_MIN_LOG2.value, _MAX_LOG2.value + 1)]
  with open(_OUT.value, "a") as out:
    def record(**r):
      out.write(json.dumps({"target": target.name, **r}) + "\n")
      out.flush()

    for name in names:
      config = fit.with_overrides(_CONFIG.value, overrides(name, target.chips, model_config))
      measured = {}

      def fits(i):
        start = time.time()
        m, crash = fit.step_memory_isolated(config, lengths[i], target.name)
        measured[i] = m
        print(f"{target.name} {name} T={lengths[i]}: {m.describe() if m else crash} "
              f"({time.time() - start:.0f} s)", flush=True)
        record(combo=name, seq_len=lengths[i], bytes=m.total if m else None,
               exhausted=m.exhausted if m else crash, fits=bool(m and m.fits(budget)),
               compile_s=round(time.time() - start, 1))
        return bool(m and m.fits(budget))

      lo, hi = -1, len(lengths)  # lengths[lo] fits (-1: none known), lengths[hi] does not
      while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
          lo = mid
        else:
          hi = mid
      best = lengths[lo] if lo >= 0 else 0
      record(combo=name, longest=best, bytes=measured[lo].total if lo >= 0 else None,
             next_bytes=getattr(measured.get(hi), "total", None),
             budget=budget, overrides=overrides(name, target.chips, model_config))
      print(f"==> {target.name} {name}: longest {best} tokens", flush=True)


if __name__ == "__main__":
  app.run(main)
