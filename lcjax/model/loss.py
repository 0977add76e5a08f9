"""Next-token cross-entropy over loss-masked tokens, returned as (sum, count) so that any
split of the batch (devices, chunks, accumulation) is normalised by the global token count."""
import jax
import jax.numpy as jnp


def next_token_loss_sums(h_BTE, head_EV, targets_BT, mask_BT):
  logits_BTV = h_BTE.astype(jnp.float32) @ head_EV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  mask = mask_BT.astype(jnp.float32)
  return jnp.sum((log_z_BT - target_logit_BT) * mask), jnp.sum(mask)
