"""FlashAttention-2 backward as two Pallas TPU kernels (interpret mode on CPU): dK/dV, then dQ.

Both recompute P = exp(S - LSE) per tile from the forward's natural-log LSE and use
Delta = rowsum(dO * O) - dLSE (Alg. 2 of arXiv 2307.08691, plus the LSE's own cotangent).

- dK/dV: grid (B * kv blocks, K, G, q blocks); the last two axes are sequential reductions, so
  the G query heads that share a kv head accumulate into one float32 dK/dV scratch (GQA
  without repeating K/V or summing afterwards).
- dQ: grid (B * q blocks, H, kv blocks), a float32 dQ scratch accumulated over kv blocks.

Each runs as a loop of calls over slabs of its first grid axis, each with its slab of the plan;
tiles the plan marks SKIP are neither computed nor loaded anew (see `pallas_common`).
"""
import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl

from lcjax.ops import pallas_common as pc
from lcjax.ops import tiles


def _grad_tile(spec, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, id_refs, col0, masked):
  """P and dS of one tile (dS w.r.t. the scaled scores; spec.scale is applied at the end)."""
  s, t, mask = pc.load_tile(spec, q_ref, k_ref, id_refs, col0, masked)
  return tiles.tile_p_ds(s, t, mask, lse_ref[:, :1], delta_ref[:, :1], do_ref[...], v_ref[...])


def _dkv_kernel(start_ref, plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                spec, lay):
  id_refs, (dk_ref, dv_ref, dk_scr, dv_scr) = pc.split_refs(spec, refs)
  c, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  j = pc.row_of(start_ref, c, lay.nk)[1]

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def update(masked):
    p, ds = _grad_tile(spec, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, id_refs,
                       j * lay.bk, masked)
    dv_scr[...] += tiles.mm(p.astype(do_ref.dtype), do_ref[...], trans_a=True)
    dk_scr[...] += tiles.mm(ds.astype(q_ref.dtype), q_ref[...], trans_a=True)

  pc.by_status(plan_ref[c * lay.nq + i], update)

  @pl.when((g == lay.G - 1) & (i == lay.nq - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(start_ref, plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               spec, lay):
  del start_ref
  id_refs, (dq_ref, dq_scr) = pc.split_refs(spec, refs)
  c, j = pl.program_id(0), pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def update(masked):
    _, ds = _grad_tile(spec, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, id_refs,
                       j * lay.bk, masked)
    dq_scr[...] += tiles.mm(ds.astype(k_ref.dtype), k_ref[...])

  pc.by_status(plan_ref[c * lay.nk + j], update)

  @pl.when(j == lay.nk - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * spec.scale).astype(dq_ref.dtype)


def flash_backward(spec, lay, interpret, q, k, v, dout, lse_rows, delta_rows, ids, sums):
  """Kernel-layout residuals and cotangents -> (dq, dk, dv) in the input dtypes.

  lse_rows, delta_rows: [B, H, Tq, LANES] float32 from `tiles.backward_row_terms` (lse +inf on
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
      scratch=[pc.vmem(lay.bk, lay.D), pc.vmem(lay.bk, lay.D)],
      semantics=("parallel", "parallel", "arbitrary", "arbitrary"), interpret=interpret)

  dq_specs = pc.Specs.by_q_block(lay)
  (dq,) = pc.call_by_rows(
      functools.partial(_dq_kernel, spec=spec, lay=lay),
      functools.partial(tiles.row_plan, spec, *sums, bk=lay.bk, outer="q"),
      lay=lay, rows=lay.B * nq, cols=nk, inner=(lay.H, nk), operands=operands,
      in_specs=in_specs(dq_specs), out_specs=[dq_specs.q], out_shape=[pc.sds(q.shape, q.dtype)],
      scratch=[pc.vmem(lay.bq, lay.D)], semantics=("parallel", "parallel", "arbitrary"),
      interpret=interpret)
  return dq, dk, dv
