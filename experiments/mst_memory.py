"""MsT memory curves: compiled temp memory of a training step against sequence length, with and
without mini-sequences, for the tiny model with a 32K vocabulary and for Llama3-8B shapes, and
the longest sequence whose step fits 80 GiB per device. Writes docs/mst_memory.{json,png}.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/mst_memory.py

Runs on a CPU (ahead-of-time compiles from abstract shapes; nothing is allocated): about 8
minutes on a 2-core machine. Both models use the meshes of their configs (8 devices, one
sequence per device); memory is per device, from the CPU compiler's buffer assignment.
"""
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import llama3_8b, tiny_cpu  # noqa: E402
from lcjax import fit  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
GiB = 2**30


def models():
  tiny = tiny_cpu.get_config()
  tiny.model.vocab_size = 32768
  tiny.model.remat = "full"
  return {"tiny (3.2M + 32K vocab)": (tiny, [1024 * 2**i for i in range(0, 8)]),
          "Llama3-8B (fsdp 8)": (llama3_8b.get_config(), [1024 * 2**i for i in range(0, 8)])}


def with_mst(config, on):
  chunks = fit.mst_chunks(config.model) if on else {"mlp_chunks": 1, "loss_chunks": 1}
  return fit.with_overrides(config, {f"model.{k}": v for k, v in chunks.items()})


def main():
  results = {}
  for name, (config, lengths) in models().items():
    entry = results[name] = {"mst_chunks": fit.mst_chunks(config.model), "remat": config.model.remat,
                             "curve": {}, "longest_80gib": {}}
    for on in (False, True):
      label = "MsT" if on else "plain"
      curve = entry["curve"][label] = []
      for seq_len in lengths:
        start = time.time()
        mem = fit.step_memory(with_mst(config, on), seq_len)
        curve.append({"seq_len": seq_len, "temp_gib": mem.temp / GiB, "total_gib": mem.total / GiB})
        print(f"{name} {label} T={seq_len}: temp {mem.temp / GiB:.3f} GiB, total "
              f"{mem.total / GiB:.3f} GiB ({time.time() - start:.0f} s)", flush=True)
    if not name.startswith("Llama"):
      continue  # the tiny model fits far beyond 128K either way; the curve is the result
    for on in (False, True):
      for remat in ("none", "full"):
        label = f"{'MsT' if on else 'plain'}, remat {remat}"
        seq_len, mem = fit.longest_fitting(fit.with_overrides(with_mst(config, on), {"model.remat": remat}),
                                           80 * GiB)
        entry["longest_80gib"][label] = seq_len
        print(f"{name} longest under 80 GiB, {label}: {seq_len}", flush=True)
  DOCS.mkdir(exist_ok=True)
  (DOCS / "mst_memory.json").write_text(json.dumps(results, indent=1))
  plot(results)


def plot(results):
  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
  for ax, (name, entry) in zip(axes, results.items()):
    for label, curve in entry["curve"].items():
      ax.loglog([p["seq_len"] for p in curve], [p["temp_gib"] for p in curve], "o-", label=label)
    ax.set_title(f"{name}, remat {entry['remat']}")
    ax.set_xlabel("sequence length (tokens per device)")
    ax.set_ylabel("compiled temp memory per device (GiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(DOCS / "mst_memory.png", dpi=120)


if __name__ == "__main__":
  main()
