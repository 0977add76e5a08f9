"""The outer gradient's all-reduce over the islands, sent compressed.

Formats: float32 (exact), bfloat16 (a cast), int8 and int4 (symmetric, round to nearest, one
float32 scale per tensor: its absolute maximum over 127 or 7; int4 packs two values per byte).

`weighted_sum` is a reduce-scatter followed by an all-gather, the two halves of a ring
all-reduce, each in the compressed format: every island cuts its weighted tensor into R chunks
and sends chunk j to island j (all_to_all); island j dequantises the R chunks it received and
sums them in float32, quantises that partial sum (one scale per chunk) and all-gathers it. One
island sends 2 (R-1) chunks, i.e. 2 (R-1)/R times the compressed tensor, the volume of a ring
all-reduce; each element's error is at most half a quantisation step of each phase.
"""
import math

import jax
import jax.numpy as jnp

from lcjax.config import COMPRESSION_FORMATS as FORMATS

_LEVELS = {"int8": 127, "int4": 7}
_BITS = {"float32": 32, "bfloat16": 16, "int8": 8, "int4": 4}


def quantize(x, fmt):
  """(payload, scale) of a float32 array; for int4 the last dimension must be even."""
  if fmt == "float32":
    return x, jnp.ones((), jnp.float32)
  if fmt == "bfloat16":
    return x.astype(jnp.bfloat16), jnp.ones((), jnp.float32)
  level = _LEVELS[fmt]
  peak = jnp.max(jnp.abs(x))
  scale = jnp.where(peak > 0, peak / level, 1.0).astype(jnp.float32)
  q = jnp.clip(jnp.round(x / scale), -level, level).astype(jnp.int8)
  if fmt == "int4":  # two's-complement nibbles, the even element in the low half of the byte
    nibbles = q.reshape(q.shape[:-1] + (-1, 2)).astype(jnp.uint8) & 0xF
    q = nibbles[..., 0] | (nibbles[..., 1] << 4)
  return q, scale


def dequantize(q, scale, fmt):
  """float32 values of a payload; `scale` broadcasts against it (one per tensor or per row)."""
  if fmt in ("float32", "bfloat16"):
    return q.astype(jnp.float32)
  if fmt == "int4":
    nibbles = jnp.stack([q & 0xF, q >> 4], axis=-1).astype(jnp.int8)
    q = jnp.where(nibbles > 7, nibbles - 16, nibbles).reshape(q.shape[:-1] + (-1,))
  return q.astype(jnp.float32) * scale


def _chunk_elements(size, replicas):
  """Elements per island's chunk: the tensor padded to a multiple of 2R (int4 pairs)."""
  return math.ceil(size / (2 * replicas)) * 2


def weighted_sum(x, weight, fmt, axis, replicas):
  """sum_r weight_r x_r over the islands on mesh axis `axis` (inside a shard_map over it), as
  float32 of x's shape, exchanged in `fmt` (module docstring)."""
  shape, size = x.shape, x.size
  m = _chunk_elements(size, replicas)
  flat = (x.astype(jnp.float32) * weight).reshape(-1)
  rows = jnp.pad(flat, (0, m * replicas - size)).reshape(replicas, m)
  q, scale = quantize(rows, fmt)
  received = jax.lax.all_to_all(q, axis, 0, 0, tiled=True)  # row i: island i's chunk for me
  scales = jax.lax.all_gather(scale, axis)
  partial = jnp.sum(dequantize(received, scales[:, None], fmt), axis=0)
  q, scale = quantize(partial, fmt)
  gathered = jax.lax.all_gather(q, axis)
  scales = jax.lax.all_gather(scale, axis)
  total = dequantize(gathered, scales[:, None], fmt).reshape(-1)
  return total[:size].reshape(shape)


def bytes_sent(sizes, fmt, replicas) -> int:
  """Bytes one island sends in `weighted_sum` over tensors of the given element counts."""
  scale_bytes = 4 if fmt in _LEVELS else 0
  per_chunk = [_chunk_elements(n, replicas) * _BITS[fmt] // 8 + scale_bytes for n in sizes]
  return 2 * (replicas - 1) * sum(per_chunk)


def ring_all_reduce_bytes(sizes, replicas, bytes_per_element=4) -> int:
  """Bytes one participant sends in a ring all-reduce of these tensors (data parallelism's
  gradient exchange over the same islands)."""
  return sum(2 * (replicas - 1) * math.ceil(n / replicas) * bytes_per_element for n in sizes)
