"""Dense attention that implements lcjax's masking semantics exactly: the ground truth.

Materialises the [B, H, Tq, Tk] score matrix, so it is for tests and short sequences only.
Computes in float32 (or float64 when given float64 inputs and x64 is on); `compute_dtype`
overrides that, e.g. bfloat16 for the "plain bf16 implementation" that bf16 tests measure against.
"""
import jax
import jax.numpy as jnp


def allowed_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, *, causal,
                 sliding_window):
  """[B, Tq, Tk] boolean: may query i attend key j (DESIGN.md masking semantics)."""
  qp, kp = q_positions[:, :, None], kv_positions[:, None, :]
  mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if causal:
    mask &= kp <= qp
  if sliding_window is not None:
    mask &= (qp - kp) < sliding_window
  return mask


def reference_attention(q_BTHD, k_BTKD, v_BTKD, *, causal=False, q_segment_ids=None,
                        kv_segment_ids=None, q_positions=None, kv_positions=None,
                        sliding_window=None, softcap=None, scale=None, return_lse=False,
                        compute_dtype=None):
  """Dense softmax attention; arguments as `ops.attention`, already validated and filled in."""
  B, Tq, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  compute = compute_dtype or (jnp.float64 if q_BTHD.dtype == jnp.float64 else jnp.float32)
  scale = D ** -0.5 if scale is None else scale
  q = q_BTHD.astype(compute).reshape(B, Tq, K, H // K, D)
  s_BKGQT = jnp.einsum("bqkgd,btkd->bkgqt", q, k_BTKD.astype(compute)) * scale
  if softcap is not None:
    s_BKGQT = softcap * jnp.tanh(s_BKGQT / softcap)
  mask_BQT = allowed_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                          causal=causal, sliding_window=sliding_window)
  mask = mask_BQT[:, None, None]
  s_BKGQT = jnp.where(mask, s_BKGQT, -jnp.inf)
  m = jnp.max(s_BKGQT, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(s_BKGQT - m_safe), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  denom_safe = jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgqt,btkd->bqkgd", p / denom_safe, v_BTKD.astype(compute))
  out_BTHD = out.reshape(B, Tq, H, D).astype(q_BTHD.dtype)
  if not return_lse:
    return out_BTHD
  lse = jnp.where(denom[..., 0] > 0, jnp.log(denom_safe[..., 0]) + m_safe[..., 0], -jnp.inf)
  lse_BHT = lse.reshape(B, H, Tq)
  return out_BTHD, lse_BHT.astype(jnp.promote_types(compute, jnp.float32))
