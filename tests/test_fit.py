"""Fit finder: compiled step memory grows with T, and the search finds the longest fitting length
(checked against measuring every candidate length)."""
import jax

from lcjax import config as config_lib
from lcjax import fit


def _config():
  c = config_lib.base_config()
  c.train.batch_size = 1
  c.mesh.update(data=1)
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16,
                 mlp_dim=64, vocab_size=2048, attention="xla")
  return c


def test_longest_fitting_matches_exhaustive_measurement():
  c = _config()
  device = jax.devices()[:1]
  g = 64
  measured = {u: fit.step_memory(c, u * g, devices=device).total for u in range(1, 13)}
  assert all(measured[u] < measured[u + 1] for u in range(1, 12)), measured
  budget = (measured[7] + measured[8]) // 2  # lengths up to 7*g fit, 8*g does not
  seq_len, mem = fit.longest_fitting(c, budget, granularity=g, max_len=12 * g, devices=device)
  assert seq_len == 7 * g and mem.total == measured[7]


def test_mst_chunk_rule():
  c = _config()
  c.model.update(embed_dim=4096, mlp_dim=14336, vocab_size=128256)
  assert fit.mst_chunks(c.model) == {"mlp_chunks": 4, "loss_chunks": 32}
