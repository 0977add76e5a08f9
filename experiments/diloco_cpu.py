"""DiLoCo on 8 CPU devices: 4 islands (mesh.replica=4) of 2 data-parallel devices each, a
byte-level Llama on this Python's standard library; every island runs 50 AdamW steps on its
quarter of the global batch, then the islands sync once (Nesterov SGD, lr 0.7, momentum 0.9, on
the token-weighted average of their pseudo-gradients).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m lcjax.main --config=experiments/diloco_cpu.py --workdir=runs/diloco_cpu

Measured (2026-11-22, 2-core CPU machine, other jobs running; docs/diloco.md): 300 steps take
about 70-90 s; at 1000 steps (--config.train.steps=1000) the shared parameters reach a held-out
loss of 1.675 at H=50, against 1.216 for data parallelism on the same tokens, with 1/50 of its
bytes; started from the data-parallel run's step-500 checkpoint (--config.outer.init_from=DIR
--config.outer.init_step=500) it ends at 1.228, 1.0% above, its DiLoCo half sending 1/50 of the
bytes. Expect the eval loss to stay at its initial value until the first sync (step 50).

Variants: --config.outer.inner_steps=10, --config.outer.compression=int4,
--config.outer.drop_replicas=1@2 (island 1 lost at the second sync), --config.mesh.ring=2
--config.mesh.data=1 (ring attention inside every island). `scripts/compare_diloco.py` runs the
comparison with data parallelism at equal tokens (docs/diloco.md holds its measured figures).
"""
from lcjax.config import base_config


def get_config():
  c = base_config()
  c.train.steps = 300
  c.train.batch_size = 32         # global: 8 sequences per island
  c.train.seq_len = 128
  c.train.lr = 3e-3
  c.train.warmup_steps = 30
  c.train.eval_every = 50
  c.train.eval_batches = 8
  c.train.log_every = 10
  c.train.sample_prompt = ""
  c.checkpoint.every = 100
  c.mesh.update(replica=4, data=2)
  c.model.update(num_layers=2, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
                 mlp_dim=384)
  c.outer.update(kind="diloco", inner_steps=50, optimizer="sgd", lr=0.7, momentum=0.9,
                 nesterov=True, compression="float32")
  return c
