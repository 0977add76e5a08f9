"""Grouped-query self-attention with RoPE over packed documents; calls `ops.attention`."""
import jax
import jax.numpy as jnp
from flax import nnx

from lcjax import ops
from lcjax.model.config import ModelConfig
from lcjax.model.layers import Param, _init, apply_rope, rope_attention_factor, rope_frequencies


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    E, H, K, D = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.wq = Param(_init(rngs, (E, H, D), (0,)), logical_axes=("embed", "heads", "head_dim"))
    self.wk = Param(_init(rngs, (E, K, D), (0,)), logical_axes=("embed", "kv_heads", "head_dim"))
    self.wv = Param(_init(rngs, (E, K, D), (0,)), logical_axes=("embed", "kv_heads", "head_dim"))
    if cfg.attention_bias:  # Qwen2: q, k and v projections carry biases
      self.bq = Param(jnp.zeros((H, D), jnp.float32), logical_axes=("heads", "head_dim"))
      self.bk = Param(jnp.zeros((K, D), jnp.float32), logical_axes=("kv_heads", "head_dim"))
      self.bv = Param(jnp.zeros((K, D), jnp.float32), logical_axes=("kv_heads", "head_dim"))
    self.wo = Param(_init(rngs, (H, D, E), (0, 1), 1 / (2 * cfg.num_layers) ** 0.5),
                        logical_axes=("heads", "head_dim", "embed"))
    self.cfg = cfg

  def qkv(self, x_BTE, positions_BT):
    """q [B, T, H, D], k and v [B, T, K, D] of the tokens at positions_BT: projected, biased
    and rotated. Training and the KV-cache decoder (model/cache.py) share it."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    inv_freq = rope_frequencies(cfg)
    q_BTHD = jnp.einsum("bte,ehd->bthd", x_BTE, self.wq[...].astype(dt))
    k_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, self.wk[...].astype(dt))
    v_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, self.wv[...].astype(dt))
    if cfg.attention_bias:
      q_BTHD, k_BTKD, v_BTKD = (x + b[...].astype(dt) for x, b in
                                ((q_BTHD, self.bq), (k_BTKD, self.bk), (v_BTKD, self.bv)))
    factor = rope_attention_factor(cfg)
    q_BTHD = apply_rope(q_BTHD, positions_BT, inv_freq, factor)
    k_BTKD = apply_rope(k_BTKD, positions_BT, inv_freq, factor)
    return q_BTHD, k_BTKD, v_BTKD

  def project_out(self, out_BTHD):
    return jnp.einsum("bthd,hde->bte", out_BTHD, self.wo[...].astype(self.cfg.compute_dtype))

  def __call__(self, x_BTE, positions_BT, segment_ids_BT):
    return self.attend(x_BTE, positions_BT, segment_ids_BT)[0]

  def attend(self, x_BTE, positions_BT, segment_ids_BT):
    """(output [B, T, E], (k, v) [B, T, K, D]): the keys and values are what a KV cache keeps."""
    cfg = self.cfg
    q_BTHD, k_BTKD, v_BTKD = self.qkv(x_BTE, positions_BT)
    masking = dict(causal=True, sliding_window=cfg.sliding_window or None,
                   implementation=cfg.attention)
    if cfg.document_mask:  # each packed document attends only to itself, causal by its positions
      masking.update(q_segment_ids=segment_ids_BT, kv_segment_ids=segment_ids_BT,
                     q_positions=positions_BT, kv_positions=positions_BT)
    if cfg.sp_strategy:  # tokens arrive in the sequence layout, sharded over (ring, ulysses)
      out_BTHD = ops.sequence_parallel_attention(
          q_BTHD, k_BTKD, v_BTKD, mesh=jax.sharding.get_abstract_mesh(),
          strategy=cfg.sp_strategy, layout=cfg.sp_layout, **masking)
    else:
      out_BTHD = ops.attention(q_BTHD, k_BTKD, v_BTKD, **masking)
    return self.project_out(out_BTHD), (k_BTKD, v_BTKD)
