"""Mini-Sequence Transformer (MsT, arXiv 2407.15892): per-token work over mini-sequences.

The MLP and the LM head + cross-entropy act on each token independently, so any partition of
the tokens into chunks gives the same result. Each chunk runs under `jax.checkpoint`, so the
backward pass recomputes one chunk's [B, T/M, F] hidden or [B, T/M, V] logits at a time instead
of keeping them for all T tokens.

Chunks are strided: chunk m holds tokens t with t % M == m. With the sequence sharded over
devices in contiguous blocks, a strided chunk takes the same number of tokens from every block,
so chunking needs no communication. T need not divide by M: the tail is padded with zeros (for
the MLP) or masked tokens (for the loss), which contribute nothing.
"""
import functools

import jax
import jax.numpy as jnp


def validate_chunks(num_chunks: int, seq_len: int, name: str):
  if not isinstance(num_chunks, int) or num_chunks < 1:
    raise ValueError(f"{name} must be a positive integer (1 = off); got {num_chunks!r}")
  if num_chunks > seq_len:
    raise ValueError(f"{name} ({num_chunks}) exceeds the {seq_len} tokens of a sequence; "
                     f"use at most {seq_len}")


def _to_chunks(x, num_chunks, pad_value=0):
  """[B, T, ...] -> [M, B, ceil(T/M), ...]: chunk m holds tokens m, m+M, m+2M, ..."""
  B, T = x.shape[:2]
  per_chunk = -(-T // num_chunks)
  pad = per_chunk * num_chunks - T
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
  x = x.reshape(B, per_chunk, num_chunks, *x.shape[2:])
  return jnp.moveaxis(x, 2, 0)


def _from_chunks(x, seq_len):
  """Inverse of _to_chunks: [M, B, C, ...] -> [B, T, ...]."""
  M, B, C = x.shape[:3]
  x = jnp.moveaxis(x, 0, 2).reshape(B, C * M, *x.shape[3:])
  return x[:, :seq_len]


def chunked_mlp(mlp, x_BTE, num_chunks: int):
  """mlp(x) with only one mini-sequence's [B, T/M, F] hidden alive in forward and backward."""
  validate_chunks(num_chunks, x_BTE.shape[1], "model.mlp_chunks")
  if num_chunks == 1:
    return mlp(x_BTE)
  chunks = _to_chunks(x_BTE, num_chunks)
  out = jax.lax.map(jax.checkpoint(mlp, prevent_cse=False), chunks)
  return _from_chunks(out, x_BTE.shape[1])


def _token_terms(h_BTE, head_EV, targets_BT):
  """(log Z, cross-entropy) per token [B, T]; logits in float32."""
  logits_BTV = h_BTE.astype(jnp.float32) @ head_EV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return log_z_BT, log_z_BT - target_logit_BT


def _loss_sums(h_BTE, head_EV, targets_BT, mask_BT, z_loss):
  """(cross-entropy sum, z-loss sum, token count) over masked tokens; logits in float32."""
  log_z_BT, ce_BT = _token_terms(h_BTE, head_EV, targets_BT)
  mask = mask_BT.astype(jnp.float32)
  z_sum = jnp.sum(log_z_BT ** 2 * mask) if z_loss else jnp.zeros((), jnp.float32)
  return jnp.sum(ce_BT * mask), z_sum, jnp.sum(mask)


def token_losses(h_BTE, head_EV, targets_BT, *, num_chunks: int = 1):
  """Cross-entropy of every token [B, T], float32 (evaluation: no gradient), computed one
  mini-sequence's [B, T/M, V] logits at a time."""
  validate_chunks(num_chunks, h_BTE.shape[1], "model.loss_chunks")
  chunks = (_to_chunks(h_BTE, num_chunks), _to_chunks(targets_BT, num_chunks))
  ce = jax.lax.map(lambda c: _token_terms(c[0], head_EV, c[1])[1], chunks)
  return _from_chunks(ce, h_BTE.shape[1])


def loss_sums(h_BTE, head_EV, targets_BT, mask_BT, *, num_chunks: int = 1, z_loss: float = 0.0):
  """Next-token loss as (objective sum, cross-entropy sum, token count), float32.

  objective = cross-entropy + z_loss * log(Z)^2, summed over masked tokens. Sums (not means)
  so that the caller divides once by the global token count, whatever the chunking. With
  num_chunks > 1 no [B, T, V] logits exist in forward or backward: a checkpointed scan over
  mini-sequences accumulates the sums, and the head's gradient accumulates across chunks.
  """
  validate_chunks(num_chunks, h_BTE.shape[1], "model.loss_chunks")
  if num_chunks == 1:
    ce, z, count = _loss_sums(h_BTE, head_EV, targets_BT, mask_BT, z_loss)
    return ce + z_loss * z, ce, count

  @functools.partial(jax.checkpoint, prevent_cse=False)  # scan already keeps CSE out
  def body(totals, chunk):
    h, targets, mask = chunk
    return jax.tree.map(jnp.add, totals, _loss_sums(h, head_EV, targets, mask, z_loss)), None

  zero = jnp.zeros((), jnp.float32)
  chunks = (_to_chunks(h_BTE, num_chunks), _to_chunks(targets_BT, num_chunks),
            _to_chunks(mask_BT, num_chunks))
  (ce, z, count), _ = jax.lax.scan(body, (zero, zero, zero), chunks)
  return ce + z_loss * z, ce, count
