# Prints memory_analysis() of the Llama3-8B step (MsT, remat full, optimizer offload with the host
# update) for a v5p target; run with XLA_FLAGS=--xla_dump_to=DIR to get libtpu's buffer assignment
# (DIR/*memory-usage-report.txt). Used for docs/targets.md; argv[1] is tokens per sequence.
import os, sys
os.environ["JAX_PLATFORMS"]="cpu"
os.environ["XLA_FLAGS"]="--xla_dump_to=/tmp/xdump --xla_dump_hlo_module_re=.*update.*"
sys.path.insert(0, "/work/main")
from ml_collections import config_flags
from lcjax import fit, targets, plan
import importlib.util
spec = importlib.util.spec_from_file_location("c", "experiments/llama3_8b.py"); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
cfg = m.get_config()
mc = plan.model_config(cfg)
cand = plan.Candidate(ring=1, ulysses=1, fsdp=4, mst=True, remat="full", offload=True)
cfg = fit.with_overrides(cfg, {**cand.overrides(mc), "train.batch_size": 4})
T = int(sys.argv[1])
import jax
mem = None
from lcjax.train import prepare
from lcjax import program as program_lib, parts as parts_lib
prepared = prepare(fit.with_overrides(cfg, {"train.seq_len": T}), with_data=False, devices=targets.parse("tpu:v5p:2x2x1").devices())
with jax.set_mesh(prepared.mesh):
  program = program_lib.build(prepared, aot=True)
  batch = parts_lib.abstract_batch(4, T, program.batch_sharding)
  _, compiled = program.compile(batch)
  m = compiled.memory_analysis()
  G=2**30
  print("peak", m.peak_memory_in_bytes/G, "arg", m.argument_size_in_bytes/G, "temp", m.temp_size_in_bytes/G, "out", m.output_size_in_bytes/G, "alias", m.alias_size_in_bytes/G,
        "host_arg", m.host_argument_size_in_bytes/G, "host_out", m.host_output_size_in_bytes/G, "host_temp", m.host_temp_size_in_bytes/G, "host_alias", m.host_alias_size_in_bytes/G)
