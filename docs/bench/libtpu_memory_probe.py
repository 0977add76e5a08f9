"""memory_analysis() of the Llama3-8B step (MsT, remat full, optimizer offload with the host
update, one sequence per chip, fsdp over all chips) for a v5p target, with libtpu's own buffer
assignment dumped beside it (DUMP_DIR/*memory-usage-report.txt: "Memory Space: default" is HBM):

  python docs/bench/libtpu_memory_probe.py tpu:v5p:2x2x2 262144 /tmp/xdump

The figures of docs/targets.md's "A figure above the HBM" table.
"""
import os
import sys

target_name, seq_len, dump_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_dump_to={dump_dir} --xla_dump_hlo_module_re=.*update.*"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402

from lcjax import fit, plan, targets  # noqa: E402
from lcjax import parts as parts_lib  # noqa: E402
from lcjax import program as program_lib  # noqa: E402
from lcjax.train import prepare  # noqa: E402
from experiments import llama3_8b  # noqa: E402

target = targets.parse(target_name)
config = llama3_8b.get_config()
candidate = plan.Candidate(ring=1, ulysses=1, fsdp=target.chips, mst=True, remat="full",
                           offload=True)
config = fit.with_overrides(config, {**candidate.overrides(plan.model_config(config)),
                                     "train.batch_size": target.chips, "train.seq_len": seq_len})
prepared = prepare(config, with_data=False, devices=target.devices())
with jax.set_mesh(prepared.mesh):
  program = program_lib.build(prepared, aot=True)
  batch = parts_lib.abstract_batch(target.chips, seq_len, program.batch_sharding)
  mem = program.compile(batch)[1].memory_analysis()
G = 2 ** 30
print(f"{target.name} T={seq_len}: peak {mem.peak_memory_in_bytes / G:.2f} GiB, arguments "
      f"{mem.argument_size_in_bytes / G:.2f}, temp {mem.temp_size_in_bytes / G:.2f}, outputs "
      f"{mem.output_size_in_bytes / G:.2f}, alias {mem.alias_size_in_bytes / G:.2f}, host "
      f"arguments {mem.host_argument_size_in_bytes / G:.2f}, host outputs "
      f"{mem.host_output_size_in_bytes / G:.2f}")
