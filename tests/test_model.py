"""Model: shapes, causality, parameter count, GQA equivalence, RoPE scaling, remat."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.model import ModelConfig, create
from lcjax.model import layers

CFG = ModelConfig(vocab_size=128, num_layers=2, num_levels=2, embed_dim=32, num_heads=4,
                  num_kv_heads=2, head_dim=8, mlp_dim=48)


def _batch(B, T, seed=0, vocab=128):
  rng = np.random.default_rng(seed)
  pos = np.broadcast_to(np.arange(T), (B, T))
  return dict(inputs=jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
              targets=jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
              positions=jnp.asarray(pos, jnp.int32), segment_ids=jnp.ones((B, T), jnp.int32),
              loss_mask=jnp.ones((B, T), jnp.int32))


@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_param_count(tie):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  model = create(cfg, 0)
  b = _batch(2, 11)
  logits = model(b["inputs"], b["positions"], b["segment_ids"])
  assert logits.shape == (2, 11, cfg.vocab_size) and logits.dtype == jnp.float32
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == cfg.param_count()


def test_causality_of_the_loss_gradient():
  """d loss(position t) / d input embedding at s is zero for every s > t."""
  model = create(CFG, 1)
  b = _batch(1, 9)
  t = 4
  emb = model.embed(b["inputs"])

  def loss_at_t(emb_BTE):
    x = emb_BTE
    for level in model.levels:
      x = level(x, b["positions"], b["segment_ids"])
    logits = model.final_norm(x) @ model.head_weight_EV()
    return jax.nn.logsumexp(logits[0, t]) - logits[0, t, b["targets"][0, t]]

  g = jax.grad(loss_at_t)(emb)
  per_position = jnp.abs(g[0]).sum(-1)
  assert jnp.all(per_position[t + 1:] == 0)
  assert jnp.all(per_position[:t + 1] > 0)


def test_segments_isolate_documents():
  """Tokens of one packed document do not influence another document's logits."""
  model = create(CFG, 2)
  b = _batch(1, 10)
  seg = jnp.array([[1] * 6 + [2] * 4])
  pos = jnp.array([list(range(6)) + list(range(4))])
  base = model(b["inputs"], pos, seg)
  changed = b["inputs"].at[0, :6].set((b["inputs"][0, :6] + 7) % CFG.vocab_size)
  out = model(changed, pos, seg)
  np.testing.assert_array_equal(np.asarray(out[0, 6:]), np.asarray(base[0, 6:]))
  # and the second document alone gives the same logits as inside the pack
  alone = model(b["inputs"][:, 6:], pos[:, 6:], jnp.ones((1, 4), jnp.int32))
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(base[0, 6:]), rtol=2e-5, atol=2e-5)


def test_gqa_equals_mha_with_repeated_kv():
  gqa = create(CFG, 3)
  mha_cfg = dataclasses.replace(CFG, num_kv_heads=CFG.num_heads)
  mha = create(mha_cfg, 3)
  state = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
  rep = CFG.num_heads // CFG.num_kv_heads
  for level in state["levels"].values():
    for name in ("wk", "wv"):  # [L, E, K, D] -> [L, E, H, D]: head h uses kv head h // rep
      level["blocks"]["attn"][name] = jnp.repeat(level["blocks"]["attn"][name], rep, axis=2)
  nnx.update(mha, state)
  b = _batch(2, 13)
  np.testing.assert_allclose(np.asarray(mha(b["inputs"], b["positions"], b["segment_ids"])),
                             np.asarray(gqa(b["inputs"], b["positions"], b["segment_ids"])),
                             rtol=1e-5, atol=1e-5)


def test_rope_is_relative():
  """Scores depend on positions only through their difference."""
  cfg = dataclasses.replace(CFG, rope_theta=500.0)
  inv = layers.rope_frequencies(cfg)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

  def score(pq, pk):
    return float(jnp.sum(layers.apply_rope(q, jnp.array([[pq]]), inv) *
                         layers.apply_rope(k, jnp.array([[pk]]), inv)))

  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)


def test_llama3_rope_scaling_bands():
  cfg = dataclasses.replace(CFG, head_dim=64, rope_theta=500000.0, rope_scaling=8.0,
                            rope_original_len=8192)
  plain = layers.rope_frequencies(dataclasses.replace(cfg, rope_scaling=0.0))
  scaled = layers.rope_frequencies(cfg)
  wavelen = 2 * np.pi / np.asarray(plain)
  high = wavelen < 8192 / 4   # short wavelengths are kept
  low = wavelen > 8192 / 1    # long wavelengths are divided by the factor
  np.testing.assert_allclose(np.asarray(scaled)[high], np.asarray(plain)[high], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(scaled)[low], np.asarray(plain)[low] / 8, rtol=1e-6)
  mid = ~(high | low)
  assert np.all(np.asarray(scaled)[mid] < np.asarray(plain)[mid])
  assert np.all(np.asarray(scaled)[mid] > np.asarray(plain)[mid] / 8)


@pytest.mark.parametrize("remat", ["full", "dots", "offload"])
def test_remat_policies_give_identical_gradients(remat):
  b = _batch(2, 12)

  def grads(cfg):
    graphdef, params = nnx.split(create(cfg, 4), nnx.Param)
    def loss(p):
      s, _, c = nnx.merge(graphdef, p).loss_sums(b)
      return s / c
    return jax.jit(jax.grad(loss))(params)

  ref, got = grads(CFG), grads(dataclasses.replace(CFG, remat=remat))
  for a, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  model = create(cfg, 0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  b = _batch(1, 8)
  s, _, c = model.loss_sums(b)
  assert s.dtype == jnp.float32 and jnp.isfinite(s) and c == 8
