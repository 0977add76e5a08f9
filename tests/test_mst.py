"""MsT: chunked MLP and chunked LM-head loss are exact, never hold [T, V] logits, and save memory."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.model import ModelConfig, create, mst

CFG = ModelConfig(vocab_size=640, num_layers=2, num_levels=1, embed_dim=32, num_heads=4,
                  num_kv_heads=2, head_dim=8, mlp_dim=48, attention="reference")


def _batch(B, T, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((B, T), np.int32)
  mask[0, T - 5:] = 0        # padding at the end of a row
  mask[1, :3] = 0            # and masked tokens elsewhere
  return dict(inputs=jnp.asarray(rng.integers(0, 259, (B, T)), jnp.int32),
              targets=jnp.asarray(rng.integers(0, 259, (B, T)), jnp.int32),
              positions=jnp.asarray(np.broadcast_to(np.arange(T), (B, T)), jnp.int32),
              segment_ids=jnp.asarray(mask), loss_mask=jnp.asarray(mask))


def _loss_and_grads(cfg, batch, seed=0):
  graphdef, params = nnx.split(create(cfg, seed), nnx.Param)

  def loss(p):
    objective, _, count = nnx.merge(graphdef, p).loss_sums(batch)
    return objective / count

  return jax.jit(jax.value_and_grad(loss))(params)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("T, mlp_chunks, loss_chunks, z_loss, tie", [
    (13, 3, 5, 0.0, True),     # neither divides T
    (12, 4, 3, 1e-3, True),    # both divide T; z-loss on
    (13, 13, 2, 0.0, False),   # one token per MLP chunk; untied head
    (12, 1, 12, 1e-4, False),
])
def test_chunked_loss_and_gradients_are_exact(T, mlp_chunks, loss_chunks, z_loss, tie):
  base = dataclasses.replace(CFG, z_loss=z_loss, tie_embeddings=tie)
  batch = _batch(3, T)
  ref_loss, ref_grads = _loss_and_grads(base, batch)
  loss, grads = _loss_and_grads(
      dataclasses.replace(base, mlp_chunks=mlp_chunks, loss_chunks=loss_chunks), batch)
  assert _rel(loss, ref_loss) < 1e-6
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    assert _rel(g, r) < 1e-6, jax.tree_util.keystr(path)


def test_loss_is_the_mean_over_valid_tokens_whatever_the_chunking():
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=(2, 11, 16)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 40, (2, 11)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (2, 11)), jnp.int32)
  logits = np.asarray(h, np.float64) @ np.asarray(head, np.float64)
  log_z = np.log(np.exp(logits).sum(-1))
  nll = log_z - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  expected = (nll * np.asarray(mask)).sum()
  for chunks in (1, 2, 4, 11):
    _, ce, count = mst.loss_sums(h, head, targets, mask, num_chunks=chunks)
    assert count == np.asarray(mask).sum()
    assert float(ce) == pytest.approx(expected, rel=1e-6)


def _compiled_grad(cfg, B, T):
  graphdef, params = nnx.split(nnx.eval_shape(lambda: create(cfg, 0)), nnx.Param)
  batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32)
           for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}

  def loss(p, b):
    objective, _, count = nnx.merge(graphdef, p).loss_sums(b)
    return objective / count

  return jax.jit(jax.grad(loss)).lower(params, batch).compile()


def test_no_logits_sized_tensor_with_loss_chunking():
  B, T, V = 2, 96, CFG.vocab_size
  cfg = dataclasses.replace(CFG, loss_chunks=8)
  shapes = re.findall(r"\[([0-9,]+)\]", _compiled_grad(cfg, B, T).as_text())
  dims = [tuple(int(d) for d in s.split(",")) for s in shapes]
  assert not [d for d in dims if V in d and T in d], "a [.., T, .., V] tensor exists"
  plain = [tuple(int(x) for x in s.split(",")) for s in
           re.findall(r"\[([0-9,]+)\]", _compiled_grad(CFG, B, T).as_text())]
  assert [d for d in plain if V in d and T in d], "the check must see logits without chunking"


@pytest.mark.parametrize("key, dominant", [("loss_chunks", dict(vocab_size=8192, mlp_dim=64)),
                                           ("mlp_chunks", dict(mlp_dim=2048, vocab_size=256))])
def test_temp_memory_decreases_with_more_chunks(key, dominant):
  # the chunked tensor must dominate memory (O(T) attention, a large V or F) for this to show
  cfg = dataclasses.replace(CFG, num_layers=1, attention="xla", **dominant)
  temps = [_compiled_grad(dataclasses.replace(cfg, **{key: m}), 2, 256).memory_analysis()
           .temp_size_in_bytes for m in (1, 4, 16)]
  assert temps[0] > temps[1] > temps[2], temps


def _grad_jaxpr(cfg, batch):
  graphdef, params = nnx.split(create(cfg, 0), nnx.Param)

  def loss(p):
    objective, _, count = nnx.merge(graphdef, p).loss_sums(batch)
    return objective / count

  return str(jax.make_jaxpr(jax.grad(loss))(params))


def test_offload_policy_puts_layer_inputs_in_host_memory():
  B, T = 2, 8
  batch = _batch(B, T)
  cfg = dataclasses.replace(CFG, num_layers=3)
  offloaded = _grad_jaxpr(dataclasses.replace(cfg, remat="offload"), batch)
  # the scan over blocks keeps its 3 layer inputs [L, B, T, E] in host memory
  assert re.search(rf"f32<host>\[3,{B},{T},{cfg.embed_dim}\]", offloaded), offloaded[:2000]
  for remat in ("none", "full"):
    assert "<host>" not in _grad_jaxpr(dataclasses.replace(cfg, remat=remat), batch)


@pytest.mark.parametrize("chunks, message", [(0, "positive integer"), (-2, "positive integer"),
                                             (14, "exceeds the 13 tokens")])
def test_invalid_chunk_counts(chunks, message):
  h = jnp.zeros((1, 13, 4))
  with pytest.raises(ValueError, match=message):
    mst.loss_sums(h, jnp.zeros((4, 8)), jnp.zeros((1, 13), jnp.int32),
                  jnp.ones((1, 13), jnp.int32), num_chunks=chunks)
  with pytest.raises(ValueError, match=message):
    mst.chunked_mlp(lambda x: x, h, chunks)
