"""Ring attention (arXiv 2310.01889) with LSE merges in float32 and its own backward ring.

Runs inside `jax.shard_map` with the ring axes manual. Every member holds one chunk of queries
and starts with the matching chunk of keys/values; K/V blocks (with their positions and segment
ids) travel around the ring by `ppermute`, one hop per step, and each member merges its partial
results through the log-sum-exp (blockwise softmax, FlashAttention-2 eq. for O and LSE):
  lse = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.

Each chunk is one or two halves that are contiguous ranges of global token indices (the layout,
`layouts.ring_block_starts`). A (query half, key half) pair that is fully masked by causality or
the sliding window is skipped with `lax.cond`, from the layout alone: no data-dependent
reduction, so no extra collective. This assumes what the data layer guarantees: inside one
segment, positions grow by at least one per token along the global sequence (global positions,
or positions restarting at each document marked by segment ids). The masks themselves always
use the real positions and segment ids. Every member issues the same collectives in the same
order; the next `ppermute` is issued before the local compute so that XLA can overlap them.

The backward pass (`custom_vjp`) runs a second ring: K/V travel again, and their gradients
travel with them in float32 and come home after a full turn. A block's gradients come from the
VJP of the local primitive `ops.attention` (recomputing the block's out_j, lse_j), fed the
block's share of the merged cotangents:
  d out_j = w_j d out,   d lse_j = w_j (rowsum((out_j - out) d out) + d lse),   w_j = exp(lse_j - lse),
which is the chain rule through the merge above.

With implementation "cudnn" (index masks only, `cudnn_attention.py`) a block pair's mask comes
from the layout: causal on the diagonal (equal starts), none below it (pairs above are skipped),
no windows. Its backward feeds cuDNN's backward kernel the merged out and lse instead
(`cudnn_attention.block_grads`: the same gradients without recomputing the block's forward).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcjax.ops import cudnn_attention
from lcjax.ops.attention import attention


@dataclasses.dataclass(frozen=True)
class RingSpec:
  """Static description of one ring; hashable so it can be a `custom_vjp` nondiff argument."""
  axes: tuple[str, ...]  # manual mesh axes of the ring, ring-major
  starts: tuple[tuple[int, ...], ...]  # global start of each half of each member's chunk
  half_len: int  # tokens per half
  causal: bool = False
  sliding_window: int | None = None
  softcap: float | None = None
  scale: float | None = None
  implementation: str = "auto"

  @property
  def size(self) -> int:
    return len(self.starts)

  @property
  def halves(self) -> int:
    return len(self.starts[0])


def _split(x, n, axis=1):
  return [x] if n == 1 else jnp.split(x, n, axis=axis)


def _split_meta(meta, n):
  pos, seg = meta
  return [(p, s) for p, s in zip(_split(pos, n), [None] * n if seg is None else _split(seg, n))]


def _may_attend(spec: RingSpec, q_start, kv_start):
  """Scalar bool: may any query of the half at q_start attend any key of the half at kv_start."""
  last = spec.half_len - 1
  ok = None
  if spec.causal:
    ok = kv_start <= q_start + last
  if spec.sliding_window is not None:
    in_window = q_start - (kv_start + last) < spec.sliding_window
    ok = in_window if ok is None else ok & in_window
  return ok


def _scale(spec: RingSpec, q):
  return q.shape[-1] ** -0.5 if spec.scale is None else spec.scale


def _cudnn_block(spec: RingSpec, fn, diagonal, *args):
  """fn(*args, causal=...) with the cuDNN mask of a block pair: causal on the diagonal."""
  if not spec.causal:
    return fn(*args, causal=False)
  return lax.cond(diagonal, functools.partial(fn, causal=True),
                  functools.partial(fn, causal=False), *args)


def _attend(spec: RingSpec, q, k, v, q_meta, kv_meta, diagonal):
  """The local primitive on one block pair: out (float32) and lse."""
  if spec.implementation == "cudnn":
    fn = functools.partial(cudnn_attention.block_forward, scale=_scale(spec, q))
    return _cudnn_block(spec, fn, diagonal, q, k, v)
  out, lse = attention(q, k, v, causal=spec.causal, q_positions=q_meta[0], kv_positions=kv_meta[0],
                       q_segment_ids=q_meta[1], kv_segment_ids=kv_meta[1],
                       sliding_window=spec.sliding_window, softcap=spec.softcap, scale=spec.scale,
                       return_lse=True, implementation=spec.implementation)
  return out.astype(jnp.float32), lse.astype(jnp.float32)


def _nothing(q):
  """(out, lse) of a block with no allowed key: zeros and -inf, sharded like q."""
  lse = jnp.full_like(jnp.swapaxes(q[..., 0], 1, 2), -jnp.inf, dtype=jnp.float32)
  return jnp.zeros_like(q, dtype=jnp.float32), lse


def _lse_weights(lse_BHT, total_BHT):
  """exp(lse - total) as [B, T, H, 1], 0 where the block has no allowed key."""
  w = jnp.where(jnp.isfinite(lse_BHT), jnp.exp(lse_BHT - total_BHT), 0.0)
  return jnp.swapaxes(w, 1, 2)[..., None], w


def _merge(a, b):
  """Merges two partial (out float32, lse) results of the same queries over disjoint keys."""
  (out_a, lse_a), (out_b, lse_b) = a, b
  m = jnp.maximum(lse_a, lse_b)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  s = jnp.exp(lse_a - m) + jnp.exp(lse_b - m)
  lse = jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)
  wa, _ = _lse_weights(lse_a, lse)
  wb, _ = _lse_weights(lse_b, lse)
  return out_a * wa + out_b * wb, lse


def _rotate(tree, spec: RingSpec):
  """Sends every leaf to the next ring member: member i -> i + 1 (mod size)."""
  perm = [(i, (i + 1) % spec.size) for i in range(spec.size)]
  return lax.ppermute(tree, spec.axes, perm)


# K/V and their ids travel packed, two collectives per hop. The forward packs them as
# [B, T, 2K, D] and [B, T, m], the backward as [2, B, T, K, D] and [m, B, T]: with the same
# shapes XLA would merge (CSE) the backward ring's rotations with the forward's and keep every
# rotated block alive from the forward pass to the backward pass, O(S) memory instead of O(S/r).
def _ids(meta):
  return [x.astype(jnp.int32) for x in meta if x is not None]


def _pack_fwd(k, v, meta):
  return jnp.concatenate([k, v], axis=2), jnp.stack(_ids(meta), -1)


def _unpack_fwd(kv, ids, n):
  k, v = jnp.split(kv, 2, axis=2)
  metas = _split_meta((ids[..., 0], ids[..., 1] if ids.shape[-1] > 1 else None), n)
  return _split(k, n), _split(v, n), metas


def _pack_bwd(k, v, meta):
  return jnp.stack([k, v]), jnp.stack(_ids(meta))


def _unpack_bwd(kv, ids, n):
  metas = _split_meta((ids[0], ids[1] if ids.shape[0] > 1 else None), n)
  return _split(kv[0], n), _split(kv[1], n), metas


def _starts(spec: RingSpec, member):
  """Global start of each half held by `member` (a traced index)."""
  return jnp.asarray(np.asarray(spec.starts, np.int32))[member]


def _pairs(spec: RingSpec, me, step):
  """(i, j, may-attend predicate or None, on-the-diagonal predicate) for the block pairs of ring
  step `step`."""
  q_starts = _starts(spec, me)
  kv_starts = _starts(spec, (me - step) % spec.size)  # whose K/V we hold at this step
  return [(i, j, _may_attend(spec, q_starts[i], kv_starts[j]), q_starts[i] == kv_starts[j])
          for i in range(spec.halves) for j in range(spec.halves)]


def _ring_loop(spec: RingSpec, step_fn, kv, carry):
  """Runs step_fn(step, kv, carry) -> carry for every ring step, K/V rotating in between.

  The rotation for step s + 1 is issued before the compute of step s so that XLA can overlap
  them; the last step is peeled off so that no rotation is wasted.
  """
  def body(step, state):
    kv, carry = state
    kv_next = _rotate(kv, spec)
    return kv_next, step_fn(step, kv, carry)

  kv, carry = lax.fori_loop(0, spec.size - 1, body, (kv, carry))
  return step_fn(spec.size - 1, kv, carry)


def _ring_forward(spec: RingSpec, q, k, v, q_meta, kv_meta):
  n = spec.halves
  me = lax.axis_index(spec.axes)
  qs, q_metas = _split(q, n), _split_meta(q_meta, n)

  def attend_and_merge(acc, *args):
    return _merge(acc, _attend(spec, *args))

  def step_fn(step, kv, acc):
    ks, vs, kv_metas = _unpack_fwd(*kv, n)
    acc = list(acc)
    for i, j, ok, diagonal in _pairs(spec, me, step):
      args = (acc[i], qs[i], ks[j], vs[j], q_metas[i], kv_metas[j], diagonal)
      acc[i] = attend_and_merge(*args) if ok is None else \
          lax.cond(ok, attend_and_merge, lambda acc, *_: acc, *args)
    return tuple(acc)

  acc = _ring_loop(spec, step_fn, _pack_fwd(k, v, kv_meta), tuple(_nothing(x) for x in qs))
  out = jnp.concatenate([a[0] for a in acc], axis=1).astype(q.dtype)
  lse = jnp.concatenate([a[1] for a in acc], axis=2)
  return out, lse


def _block_grads(spec: RingSpec, q, k, v, q_meta, kv_meta, out, lse, dout, dlse, diagonal):
  """(dq, dk, dv) float32 of one block pair's share of the merged result (chain rule in the module doc)."""
  if spec.implementation == "cudnn":
    fn = functools.partial(cudnn_attention.block_grads, scale=_scale(spec, q))
    return _cudnn_block(spec, fn, diagonal, q, k, v, out, lse, dout, dlse)
  fn = lambda q, k, v: attention(
      q, k, v, causal=spec.causal, q_positions=q_meta[0], kv_positions=kv_meta[0],
      q_segment_ids=q_meta[1], kv_segment_ids=kv_meta[1], sliding_window=spec.sliding_window,
      softcap=spec.softcap, scale=spec.scale, return_lse=True, implementation=spec.implementation)
  (out_j, lse_j), vjp = jax.vjp(fn, q, k, v)
  w_BTH1, w_BHT = _lse_weights(lse_j.astype(jnp.float32), lse)
  dout32 = dout.astype(jnp.float32)
  dout_j = (w_BTH1 * dout32).astype(out_j.dtype)
  corr_BHT = jnp.swapaxes(jnp.sum((out_j.astype(jnp.float32) - out) * dout32, -1), 1, 2)
  dlse_j = (w_BHT * (corr_BHT + dlse)).astype(lse_j.dtype)
  return tuple(g.astype(jnp.float32) for g in vjp((dout_j, dlse_j)))


def _ring_backward(spec: RingSpec, res, cotangents):
  q, k, v, q_meta, kv_meta, out, lse = res
  dout, dlse = cotangents
  n = spec.halves
  me = lax.axis_index(spec.axes)
  qs, q_metas = _split(q, n), _split_meta(q_meta, n)
  outs, lses = _split(out.astype(jnp.float32), n), _split(lse, n, axis=2)
  douts, dlses = _split(dout, n), _split(dlse.astype(jnp.float32), n, axis=2)

  def grads_and_add(acc, *args):
    return tuple(a + g for a, g in zip(acc, _block_grads(spec, *args)))

  def step_fn(step, kv, carry):
    dq, dkv = carry
    ks, vs, kv_metas = _unpack_bwd(*kv, n)
    dq, dk, dv = list(dq), _split(dkv[0], n), _split(dkv[1], n)
    for i, j, ok, diagonal in _pairs(spec, me, step):
      args = ((dq[i], dk[j], dv[j]), qs[i], ks[j], vs[j], q_metas[i], kv_metas[j], outs[i],
              lses[i], douts[i], dlses[i], diagonal)
      dq[i], dk[j], dv[j] = grads_and_add(*args) if ok is None else \
          lax.cond(ok, grads_and_add, lambda acc, *_: acc, *args)
    # the gradients of the block held this step travel on with it; after `size` hops they are home
    dkv = jnp.stack([jnp.concatenate(dk, 1), jnp.concatenate(dv, 1)])
    return tuple(dq), _rotate(dkv, spec)

  dq0 = tuple(jnp.zeros_like(x, dtype=jnp.float32) for x in qs)
  dkv0 = jnp.zeros_like(jnp.stack([k, v]), dtype=jnp.float32)
  dq, dkv = _ring_loop(spec, step_fn, _pack_bwd(k, v, kv_meta), (dq0, dkv0))
  dq = jnp.concatenate(dq, axis=1).astype(q.dtype)
  return dq, dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(spec, q, k, v, q_meta, kv_meta):
  return _ring_forward(spec, q, k, v, q_meta, kv_meta)


def _ring_fwd(spec, q, k, v, q_meta, kv_meta):
  out, lse = _ring_forward(spec, q, k, v, q_meta, kv_meta)
  return (out, lse), (q, k, v, q_meta, kv_meta, out, lse)


_ring.defvjp(_ring_fwd, _ring_backward)


def ring_attention(q_BTHD, k_BTKD, v_BTKD, q_meta, kv_meta, spec: RingSpec):
  """Attention of the local query chunk over the whole ring; inside shard_map over `spec.axes`.

  q [B, T, H, D]; k, v [B, T, K, D] (this member's chunk, halves in `spec.starts` order);
  q_meta, kv_meta: (positions [B, T] int32, segment ids [B, T] int32 or None), global positions.
  Returns out [B, T, H, D] in q.dtype and lse [B, H, T] float32. Differentiable in q, k, v.
  """
  return _ring(spec, q_BTHD, k_BTKD, v_BTKD, q_meta, kv_meta)
