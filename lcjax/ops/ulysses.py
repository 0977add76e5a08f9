"""DeepSpeed-Ulysses collectives (arXiv 2309.14509): a sequence split becomes a head split.

Each function runs inside `jax.shard_map` with `axes` manual; `axes` is one mesh axis name or a
tuple of them (ring-major when the tuple is ("ring", "ulysses")). Attention is exact per head, so
after `scatter_heads` every device attends over the whole (sub)sequence for H/u of the heads, and
`gather_heads` brings the output back to the sequence split. Communication per device and call:
(u-1)/u of the local tensor, independent of the number of devices when heads allow it.
"""
import math

import jax


def kv_head_repeats(num_heads: int, num_kv_heads: int, degree: int) -> int:
  """Smallest factor f such that Hkv * f heads split evenly over `degree` devices (GQA-safe).

  f = degree / gcd(Hkv, degree). It divides the group size Hq / Hkv whenever Hq % degree == 0,
  so repeating each KV head f times keeps query head h mapped to its own KV head.
  """
  if num_heads % degree:
    raise ValueError(
        f"query heads ({num_heads}) must be divisible by the Ulysses degree ({degree}); choose a "
        f"mesh.ulysses that divides num_heads, or move devices to mesh.ring (strategy 'usp' or "
        f"'ring')")
  f = degree // math.gcd(num_kv_heads, degree)
  assert (num_heads // num_kv_heads) % f == 0, (num_heads, num_kv_heads, degree)
  return f


def scatter_heads(x_BTHD, axes):
  """[B, T/u, H, D] sharded on sequence -> [B, T, H/u, D] sharded on heads (all-to-all over `axes`)."""
  return jax.lax.all_to_all(x_BTHD, axes, split_axis=2, concat_axis=1, tiled=True)


def gather_heads(x_BTHD, axes):
  """[B, T, H/u, D] sharded on heads -> [B, T/u, H, D] sharded on sequence (all-to-all over `axes`)."""
  return jax.lax.all_to_all(x_BTHD, axes, split_axis=1, concat_axis=2, tiled=True)


def gather_heads_lse(lse_BHT, axes):
  """lse [B, H/u, T] sharded on heads -> [B, H, T/u] sharded on sequence (all-to-all over `axes`)."""
  return jax.lax.all_to_all(lse_BHT, axes, split_axis=2, concat_axis=1, tiled=True)


def gather_sequence(x_BT, axes):
  """Per-token ids [B, T/u] -> [B, T]: every device gets the whole (sub)sequence (all-gather)."""
  return jax.lax.all_gather(x_BT, axes, axis=1, tiled=True)
