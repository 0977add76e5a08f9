"""FlashAttention-2 backward as two Pallas TPU kernels (interpret mode on CPU): dK/dV, then dQ.

Both recompute P = exp(S - LSE) per tile from the forward's natural-log LSE and use
Delta = rowsum(dO * O) - dLSE (Alg. 2 of arXiv 2307.08691, plus the LSE's own cotangent).

- dK/dV: grid (B * kv blocks, K, G, q blocks); the last two axes are sequential reductions, so
  the G query heads that share a kv head accumulate into one float32 dK/dV scratch (GQA
  without repeating K/V or summing afterwards). It works on the transposed tile
  S^T = K Q^T [bk, bq]: dV += P^T dO and dK += dS^T Q are then plain matmuls, and the
  per-query rows (LSE, Delta, positions, segment ids; [.., 1, Tq] in HBM) broadcast over the
  tile's sublanes as loaded, so a q block step transposes nothing.
- dQ: grid (B * q blocks, H, kv blocks), a float32 dQ scratch accumulated over kv blocks; the
  q block's LSE, Delta and ids become VMEM columns [bq, LANES] once, at its first kv block.

Each runs as a loop of calls over slabs of its first grid axis, each with its slab of the plan;
tiles the plan marks SKIP are neither computed nor loaded anew (see `pallas_common`).
"""
import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl

from lcjax.ops import pallas_common as pc
from lcjax.ops import tiles


def _dkv_kernel(start_ref, plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                spec, lay):
  id_refs, (dk_ref, dv_ref, dk_scr, dv_scr, *kv_cols) = pc.split_refs(spec, refs)
  c, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  j = pc.row_of(start_ref, c, lay.nk)[1]

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)
    pc.fill_columns(id_refs, kv_cols, "kv")

  def update(masked):  # on the transposed tile [bk, bq]: the query rows broadcast as they are
    s, t, mask = pc.load_tile(spec, k_ref, q_ref, pc.tile_ids(id_refs, kv_cols, "kv"),
                              j * lay.bk, masked, transposed=True)
    p, ds = tiles.tile_p_ds(s, t, mask, lse_ref[...], delta_ref[...], do_ref[...], v_ref[...],
                            transposed=True)
    dv_scr[...] += tiles.mm(p.astype(do_ref.dtype), do_ref[...])
    dk_scr[...] += tiles.mm(ds.astype(q_ref.dtype), q_ref[...])

  pc.by_status(plan_ref[c * lay.nq + i], update)

  @pl.when((g == lay.G - 1) & (i == lay.nq - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(start_ref, plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               spec, lay):
  del start_ref
  id_refs, (dq_ref, dq_scr, lse_scr, delta_scr, *q_cols) = pc.split_refs(spec, refs)
  c, j = pl.program_id(0), pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    lse_scr[...] = pc.to_column(lse_ref[...])
    delta_scr[...] = pc.to_column(delta_ref[...])
    pc.fill_columns(id_refs, q_cols, "q")

  def update(masked):
    s, t, mask = pc.load_tile(spec, q_ref, k_ref, pc.tile_ids(id_refs, q_cols, "q"),
                              j * lay.bk, masked)
    _, ds = tiles.tile_p_ds(s, t, mask, lse_scr[:, :1], delta_scr[:, :1], do_ref[...],
                            v_ref[...])
    dq_scr[...] += tiles.mm(ds.astype(k_ref.dtype), k_ref[...])

  pc.by_status(plan_ref[c * lay.nk + j], update)

  @pl.when(j == lay.nk - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * spec.scale).astype(dq_ref.dtype)


def flash_backward(spec, lay, interpret, q, k, v, dout, lse_rows, delta_rows, ids, sums):
  """Kernel-layout residuals and cotangents -> (dq, dk, dv) in the input dtypes.

  lse_rows, delta_rows: [B, H, 1, Tq] float32 from `tiles.backward_row_terms` (lse +inf on
  empty rows); sums: the block summaries of `tiles.block_summaries`.
  """
  G, nq, nk = lay.G, lay.nq, lay.nk
  operands = (q, k, v, dout, lse_rows, delta_rows, *ids)

  def in_specs(s):
    return [s.q, s.kv, s.kv, s.q, s.q_row, s.q_row, *s.id_specs(spec.segments)]

  def q_index(c, kh, g, i, start, plan):
    return pc.row_of(start, c, nk)[0], kh * G + g, pc.block_of(plan[c * nq + i])

  def kv_index(c, kh, g, i, start, plan):
    b, j = pc.row_of(start, c, nk)
    return b, kh, j

  dkv = pc.Specs(lay, q_index, kv_index)
  dk, dv = pc.call_by_rows(
      functools.partial(_dkv_kernel, spec=spec, lay=lay),
      functools.partial(tiles.row_plan, spec, *sums, bk=lay.bk, outer="kv"),
      lay=lay, rows=lay.B * nk, cols=nq, inner=(lay.K, G, nq), operands=operands,
      in_specs=in_specs(dkv), out_specs=[dkv.kv, dkv.kv],
      out_shape=[pc.sds(k.shape, k.dtype), pc.sds(v.shape, v.dtype)],
      scratch=[pc.vmem(lay.bk, lay.D), pc.vmem(lay.bk, lay.D), *pc.id_columns(spec, lay.bk)],
      semantics=("parallel", "parallel", "arbitrary", "arbitrary"), interpret=interpret)

  dq_specs = pc.Specs.by_q_block(lay)
  (dq,) = pc.call_by_rows(
      functools.partial(_dq_kernel, spec=spec, lay=lay),
      functools.partial(tiles.row_plan, spec, *sums, bk=lay.bk, outer="q"),
      lay=lay, rows=lay.B * nq, cols=nk, inner=(lay.H, nk), operands=operands,
      in_specs=in_specs(dq_specs), out_specs=[dq_specs.q], out_shape=[pc.sds(q.shape, q.dtype)],
      scratch=[pc.vmem(lay.bq, lay.D), pc.vmem(lay.bq, pc.LANES), pc.vmem(lay.bq, pc.LANES),
               *pc.id_columns(spec, lay.bq)], semantics=("parallel", "parallel", "arbitrary"),
      interpret=interpret)
  return dq, dk, dv
