"""The tiny byte-level model trained with USP sequence parallelism on 8 CPU devices:
data 2 x ring 2 x ulysses 2, zigzag layout, 1024-token sequences.

Shows the whole sequence-parallel path in training: the data layer stores tokens (and their
targets, positions, segments and loss mask) in zigzag order, the model's attention runs Ulysses
all-to-all inside a ring of K/V rotation, and losses equal those of plain data parallelism on
the same global batches (tests/test_sequence_parallel_model.py checks this to fp32 rounding).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m lcjax.main --config=experiments/usp_cpu.py --workdir=runs/usp_cpu

Other splits: --config.mesh.ring=4 --config.mesh.ulysses=1 (pure ring), --config.sp.strategy=ulysses,
--config.sp.strategy=allgather; `scripts/bench_sequence_parallel.py` compares them.
"""
from experiments import tiny_cpu


def get_config():
  c = tiny_cpu.get_config()
  c.train.steps = 100
  c.train.batch_size = 2
  c.train.seq_len = 1024
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.train.log_every = 10
  c.checkpoint.every = 50
  c.mesh.update(data=2, fsdp=1, ring=2, ulysses=2)
  c.sp.strategy = "usp"
  c.sp.layout = "zigzag"
  return c
