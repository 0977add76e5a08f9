"""Blockwise online-softmax attention in plain JAX: O(T) memory on any backend (`implementation="xla"`).

FlashAttention-2's recurrences (see `tiles`) as two nested scans: forward over q blocks, then
over kv blocks; backward over kv blocks, then over q blocks, recomputing P from the saved
natural-log LSE (`custom_vjp`), so only q, k, v, out and lse are kept for the backward pass and
no [Tq, Tk] array exists per head. A tile that the block plan marks SKIP for every batch row
costs nothing (`lax.switch`); a FULL tile skips the mask. The tile math is vmapped over batch,
kv heads and the G = Hq / Hkv query heads that share a kv head, so K/V are never repeated.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.ops import manual, tiles
from lcjax.ops.tiles import FULL, PARTIAL, SKIP

# vmap axes of the tile functions' arguments:
# (q, k, v, qpos, kpos, qseg, kseg, col0, *per-row state); None = shared.
_ROWS = (0, None, None, None, None, None, None, None)  # over G: q heads sharing one kv head
_HEADS = (0, 0, 0, None, None, None, None, None)  # over K: kv heads
_BATCH = (0, 0, 0, 0, 0, 0, 0, None)  # over B


def _vmap_bkg(f, n_state):
  """vmaps a 2-D tile function over [B, K, G] (state arguments batched like q)."""
  for axes in (_ROWS, _HEADS, _BATCH):
    f = jax.vmap(f, in_axes=axes + (0,) * n_state)
  return f


def _fwd_tile(spec, masked, q, k, v, qpos, kpos, qseg, kseg, col0, m, l, acc):
  s, _ = tiles.tile_scores(spec, q, k, acc.dtype)
  mask = tiles.tile_mask(spec, qpos, kpos, qseg, kseg, col0) if masked else None
  return tiles.online_softmax_update(s, mask, v, m, l, acc)


def _bwd_tile(spec, masked, q, k, v, qpos, kpos, qseg, kseg, col0, do, lse, delta):
  """(dq [bq, D], dk [bk, D], dv [bk, D]) of one tile, unscaled by spec.scale for dq and dk."""
  s, t = tiles.tile_scores(spec, q, k, lse.dtype)
  mask = tiles.tile_mask(spec, qpos, kpos, qseg, kseg, col0) if masked else None
  p, ds = tiles.tile_p_ds(s, t, mask, lse, delta, do, v)
  dv = tiles.mm(p.astype(do.dtype), do, trans_a=True, out_dtype=lse.dtype)
  dk = tiles.mm(ds.astype(q.dtype), q, trans_a=True, out_dtype=lse.dtype)
  dq = tiles.mm(ds.astype(k.dtype), k, out_dtype=lse.dtype)
  return dq, dk, dv


def _batch_status(status_BIJ):
  """[nq, nk] status valid for the whole batch: SKIP/FULL only where every row agrees."""
  return jnp.where(jnp.all(status_BIJ == SKIP, 0), SKIP,
                   jnp.where(jnp.all(status_BIJ == FULL, 0), FULL, PARTIAL))


# The fwd of a custom_vjp is traced inline into the caller's linearization. Under an outer
# lax.scan, scan's loop-invariant hoisting then partially evaluates these loops with positions,
# segment ids and plan known but q, k, v not, and keeps every tile's mask and -inf fill as
# residuals stacked over [nq, nk]: O(T^2). Under checkpoint, partial evaluation keeps nothing
# from in here; the residuals are the ones the custom_vjp names.
@functools.partial(jax.checkpoint, static_argnums=(0,), prevent_cse=False)
def _forward(spec, qb, kb, vb, qposb, kposb, qsegb, ksegb, status_IJ):
  """Blocked inputs -> out [nq, B, K, G, bq, D] (q dtype), lse [nq, B, K, G, bq] (accumulation dtype)."""
  acc_dtype = jnp.promote_types(qb.dtype, jnp.float32)
  nk, bk = kb.shape[0], kb.shape[3]
  run = {masked: _vmap_bkg(functools.partial(_fwd_tile, spec, masked), 3)
         for masked in (False, True)}

  def q_block(xs):
    q, qpos, qseg, status_J = xs
    state = (jnp.full(q.shape[:-1] + (1,), -jnp.inf, acc_dtype),
             jnp.zeros(q.shape[:-1] + (1,), acc_dtype), jnp.zeros(q.shape, acc_dtype))

    def kv_step(state, xs):
      k, v, kpos, kseg, st, j = xs
      args = (q, k, v, qpos, kpos, qseg, kseg, j * bk)
      return lax.switch(st, [lambda s: s, lambda s: run[True](*args, *s),
                             lambda s: run[False](*args, *s)], state), None

    state, _ = lax.scan(kv_step, state, (kb, vb, kposb, ksegb, status_J, jnp.arange(nk)))
    out, lse = jax.vmap(jax.vmap(jax.vmap(tiles.finalize)))(*state)
    return out.astype(qb.dtype), lse[..., 0]

  return lax.map(q_block, (qb, qposb, qsegb, status_IJ))


def _backward(spec, res, dout, dlse):
  qb, kb, vb, qposb, kposb, qsegb, ksegb, status_IJ, ob, lseb = res
  acc_dtype = lseb.dtype
  nk, bk = kb.shape[0], kb.shape[3]
  lse_bwd, delta = tiles.backward_row_terms(ob, dout, lseb, dlse)
  run = {masked: _vmap_bkg(functools.partial(_bwd_tile, spec, masked), 3)
         for masked in (False, True)}

  def kv_block(dq, xs):
    k, v, kpos, kseg, status_I, j = xs

    def q_step(dkv, xs):
      q, do, lse, dlt, qpos, qseg, st = xs
      args = (q, k, v, qpos, kpos, qseg, kseg, j * bk, do, lse[..., None], dlt[..., None])

      def tile(masked):
        dq_i, dk_g, dv_g = run[masked](*args)  # dk, dv per query head: sum each kv head's group
        return dq_i, (dkv[0] + dk_g.sum(2), dkv[1] + dv_g.sum(2))

      def skip():
        return jnp.zeros(q.shape, acc_dtype), dkv

      dq_i, dkv = lax.switch(st, [skip, lambda: tile(True), lambda: tile(False)])
      return dkv, dq_i

    zeros = jnp.zeros(k.shape, acc_dtype)
    (dk, dv), dq_parts = lax.scan(q_step, (zeros, zeros),
                                  (qb, dout, lse_bwd, delta, qposb, qsegb, status_I))
    return dq + dq_parts, ((dk * spec.scale).astype(kb.dtype), dv.astype(vb.dtype))

  dq, (dkb, dvb) = lax.scan(kv_block, jnp.zeros(qb.shape, acc_dtype),
                            (kb, vb, kposb, ksegb, status_IJ.T, jnp.arange(nk)))
  return (dq * spec.scale).astype(qb.dtype), dkb, dvb


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec, qb, kb, vb, qposb, kposb, qsegb, ksegb, status_IJ):
  return _forward(spec, qb, kb, vb, qposb, kposb, qsegb, ksegb, status_IJ)


def _attend_fwd(spec, qb, kb, vb, qposb, kposb, qsegb, ksegb, status_IJ):
  ob, lseb = _forward(spec, qb, kb, vb, qposb, kposb, qsegb, ksegb, status_IJ)
  return (ob, lseb), (qb, kb, vb, qposb, kposb, qsegb, ksegb, status_IJ, ob, lseb)


def _attend_bwd(spec, res, cotangents):
  dq, dk, dv = _backward(spec, res, *cotangents)
  return (dq, dk, dv) + (None,) * 5


_attend.defvjp(_attend_fwd, _attend_bwd)


def blockwise_attention(q_BTHD, k_BTKD, v_BTKD, *, q_positions, kv_positions, q_segment_ids,
                        kv_segment_ids, causal, sliding_window, softcap, scale,
                        block_sizes: tiles.BlockSizes | None = None):
  """Arguments as `ops.attention` (validated, positions filled); returns (out_BTHD, lse_BHT f32)."""
  B, Tq, H, D = q_BTHD.shape
  Tk, K = k_BTKD.shape[1], k_BTKD.shape[2]
  G = H // K
  blocks = (block_sizes or tiles.BlockSizes.default("xla", manual.platform())).fit(Tq, Tk)
  bq, bk = blocks.block_q, blocks.block_kv
  nq, nk = -(-Tq // bq), -(-Tk // bk)
  segments = q_segment_ids is not None
  spec = tiles.Spec(causal=causal, sliding_window=sliding_window, softcap=softcap, scale=scale,
                    segments=segments, kv_len=Tk)

  def ids(x_BT, n, b):  # int32, edge-padded so block ranges stay tight
    return tiles.pad_seq(x_BT.astype(jnp.int32), n * b, 1, "edge")

  qpos, kpos = ids(q_positions, nq, bq), ids(kv_positions, nk, bk)
  qseg = ids(q_segment_ids, nq, bq) if segments else None
  kseg = ids(kv_segment_ids, nk, bk) if segments else None
  status = _batch_status(tiles.block_status(spec, qpos, kpos, qseg, kseg, bq, bk))

  def rows(x_BT, n, b, col):  # [B, n*b] -> [n, B, b, 1] (q side) or [n, B, 1, b] (kv side)
    x = x_BT.reshape(B, n, b).transpose(1, 0, 2)
    return x[..., None, :] if col else x[..., None]

  qb = tiles.pad_seq(q_BTHD, nq * bq, 1).reshape(B, nq, bq, K, G, D).transpose(1, 0, 3, 4, 2, 5)
  kb, vb = (tiles.pad_seq(x, nk * bk, 1).reshape(B, nk, bk, K, D).transpose(1, 0, 3, 2, 4)
            for x in (k_BTKD, v_BTKD))
  ob, lseb = _attend(spec, qb, kb, vb, rows(qpos, nq, bq, False), rows(kpos, nk, bk, True),
                     rows(qseg, nq, bq, False) if segments else None,
                     rows(kseg, nk, bk, True) if segments else None, status)
  out_BTHD = ob.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, H, D)[:, :Tq]
  lse_BHT = lseb.transpose(1, 2, 3, 0, 4).reshape(B, H, nq * bq)[:, :, :Tq]
  return out_BTHD, lse_BHT.astype(jnp.promote_types(lse_BHT.dtype, jnp.float32))
