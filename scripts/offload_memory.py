"""Where the optimizer state lives, as the target's compiler sees it: Llama3-8B with MsT and remat
full, one sequence per chip, optimizer offload off / host update / device lane, per length:

  python scripts/offload_memory.py tpu:v5p:2x2x1 4 8192,65536

Prints the compiler's peak and the device and host parts of memory_analysis() (GiB per device).
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import importlib.util  # noqa: E402
import jax  # noqa: E402
from lcjax import fit, targets  # noqa: E402
from lcjax import parts as parts_lib  # noqa: E402
from lcjax import program as program_lib  # noqa: E402
from lcjax.train import prepare  # noqa: E402

GiB = 2**30


def main(target_name, chips, lengths):
  spec = importlib.util.spec_from_file_location("llama3_8b", "experiments/llama3_8b.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for T in lengths:
    for mode in ("", "host", "device"):
      config = fit.with_overrides(module.get_config(), {
          "mesh.fsdp": chips, "mesh.data": 1, "train.batch_size": chips, "train.seq_len": T,
          "model.mlp_chunks": 4, "model.loss_chunks": 32, "model.remat": "full",
          "optim.offload": bool(mode), "optim.update_on": mode or "auto"})
      prepared = prepare(config, with_data=False, devices=targets.parse(target_name).devices())
      with jax.set_mesh(prepared.mesh):
        program = program_lib.build(prepared, aot=True)
        batch = parts_lib.abstract_batch(chips, T, program.batch_sharding)
        a = program.compile(batch)[1].memory_analysis()
      print(f"{target_name} T={T} offload={mode or 'off'}: peak "
            f"{a.peak_memory_in_bytes / GiB:.2f} | device arg {a.argument_size_in_bytes / GiB:.2f} "
            f"out {a.output_size_in_bytes / GiB:.2f} alias {a.alias_size_in_bytes / GiB:.2f} temp "
            f"{a.temp_size_in_bytes / GiB:.2f} | host arg {a.host_argument_size_in_bytes / GiB:.2f}"
            f" out {a.host_output_size_in_bytes / GiB:.2f} temp "
            f"{a.host_temp_size_in_bytes / GiB:.2f}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")])
