"""Llama 3.1 8B shapes with FSDP over 8 accelerators: for memory planning, not for CPU training.

Used by `scripts/fit.py` and `experiments/mst_memory.py`, which compile the training step
ahead of time with abstract inputs (nothing is allocated), so they run on a CPU:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python scripts/fit.py --config=experiments/llama3_8b.py --memory_gb=80

On 8 real 80 GB GPUs, `python -m lcjax.main --config=experiments/llama3_8b.py --workdir=DIR
--config.data.source=jsonl --config.data.paths=...` trains it (with a local Llama 3 tokenizer.json).
"""
from lcjax.config import base_config


def get_config():
  c = base_config()
  c.train.batch_size = 8          # one sequence per device
  c.train.seq_len = 8192
  c.train.lr = 3e-4
  c.train.warmup_steps = 2000
  c.train.steps = 100_000
  c.mesh.data = 1
  c.mesh.fsdp = 8
  c.model.num_layers = 32
  c.model.embed_dim = 4096
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 14336
  c.model.vocab_size = 128256
  c.model.rope_theta = 500000.0
  c.model.rope_scaling = 8.0
  c.model.rope_original_len = 8192
  c.model.tie_embeddings = False
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  return c
