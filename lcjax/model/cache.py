"""The model with a KV cache: prefill a prompt, then one token per step.

The cache of a level is a pair (k, v) of [L, B, S, K, D] arrays (L the level's stacked blocks,
S the cache length), scanned with the blocks as their parameters are, so a DiPaCo path's levels
each carry their own stack. Slot s of a row holds the key and value of that row's position s.

Prefill runs the training forward (the same blocks, `ops.attention` kernels, MsT chunks) over a
[B, S] window: prompt tokens, then padding in their own segment. Padding slots sit at positions
past the prompt, so the causal mask hides them from every later query until a decoded token
overwrites them. A decode step writes each row's new key and value at its position and attends
over the whole cache with the masking semantics of DESIGN.md (causal by position, the sliding
window), so its logits equal a full forward over the prefix.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from lcjax import ops


def _scan_level(level, body, x, xs=()):
  """lax.scan of body(block, x, *per_layer) over a level's stacked blocks (and `xs`, stacked
  alike); returns (x, stacked outputs)."""
  graphdef, stacked = nnx.split(level.blocks)

  def step(x, layer):
    params, per_layer = layer[0], layer[1:]
    return body(nnx.merge(graphdef, params), x, *per_layer)

  return jax.lax.scan(step, x, (stacked, *xs))


def _last_logits(model, x_BTE, index_B):
  """Logits [B, V] float32 of token index_B of each row, as the model's forward computes them."""
  h_BE = jnp.take_along_axis(x_BTE, index_B[:, None, None], axis=1)[:, 0]
  return model.final_norm(h_BE).astype(jnp.float32) @ model.head_weight_EV()


def prefill(model, tokens_BS, lengths_B):
  """(logits [B, V] after each row's first lengths_B tokens, cache): a list per level of
  (k, v) [L, B, S, K, D]. Rows hold lengths_B prompt tokens, then anything (padding)."""
  B, S = tokens_BS.shape
  positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  segments_BS = (positions_BS < lengths_B[:, None]).astype(jnp.int32)
  x_BSE, cache = model.embed(tokens_BS), []
  for level in model.levels:
    x_BSE, kv = _scan_level(level, lambda block, x: block.prefill(x, positions_BS, segments_BS),
                            x_BSE)
    cache.append(kv)
  return _last_logits(model, x_BSE, lengths_B - 1), cache


def _block_decode(block, x_B1E, pos_B, k_BSKD, v_BSKD):
  """One token per row through a block: its key and value written at slot pos_B, its query
  attending slots <= pos_B (within the window)."""
  attn, cfg = block.attn, block.attn.cfg
  q_B1HD, k_B1KD, v_B1KD = attn.qkv(block.attn_norm(x_B1E), pos_B[:, None])
  rows = jnp.arange(x_B1E.shape[0])
  k_BSKD = k_BSKD.at[rows, pos_B].set(k_B1KD[:, 0])
  v_BSKD = v_BSKD.at[rows, pos_B].set(v_B1KD[:, 0])
  B, S = k_BSKD.shape[:2]
  # One query per row: the dense scores are [B, H, 1, S], nothing a blockwise kernel would
  # tile, and the reference implements the masking semantics the kernels are tested against.
  out_B1HD = ops.attention(
      q_B1HD, k_BSKD, v_BSKD, causal=True, q_positions=pos_B[:, None],
      kv_positions=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
      sliding_window=cfg.sliding_window or None, implementation="reference")
  x_B1E = x_B1E + attn.project_out(out_B1HD)
  # MsT chunking splits tokens; one token needs none.
  x_B1E = x_B1E + block.mlp(block.mlp_norm(x_B1E))
  return x_B1E, (k_BSKD, v_BSKD)


def decode(model, tokens_B, pos_B, cache):
  """(logits [B, V] of the token after tokens_B, cache with tokens_B's keys and values at
  slots pos_B): one decode step."""
  x_B1E, new_cache = model.embed(tokens_B[:, None]), []
  for level, (k, v) in zip(model.levels, cache):
    x_B1E, kv = _scan_level(level, lambda block, x, k, v: _block_decode(block, x, pos_B, k, v),
                            x_B1E, (k, v))
    new_cache.append(kv)
  return _last_logits(model, x_B1E, jnp.zeros_like(pos_B)), new_cache


def cache_shape(model_cfg, batch_size: int, length: int) -> tuple:
  """Shape of each of a level's k and v: [L, B, S, K, D]."""
  return (model_cfg.layers_per_level, batch_size, length, model_cfg.num_kv_heads,
          model_cfg.head_dim)


CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")  # logical names (mesh.py)
