"""FlashAttention-2 backward as two Pallas TPU kernels (interpret mode on CPU): dK/dV, then dQ.

Both recompute P = exp(S - LSE) per tile from the forward's natural-log LSE and use
Delta = rowsum(dO * O) - dLSE (Alg. 2 of arXiv 2307.08691, plus the LSE's own cotangent).

- dK/dV: grid (B, K, kv blocks, G, q blocks); the last two axes are sequential reductions, so
  the G query heads that share a kv head accumulate into one float32 dK/dV scratch (GQA
  without repeating K/V or summing afterwards).
- dQ: grid (B, H, q blocks, kv blocks), a float32 dQ scratch accumulated over kv blocks.

Tiles the plan marks SKIP are neither computed nor loaded anew (see `pallas_common`).
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


def _dkv_kernel(plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec, lay):
  id_refs, (dk_ref, dv_ref, dk_scr, dv_scr) = pc.split_refs(spec, refs)
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def update(masked):
    p, ds = _grad_tile(spec, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, id_refs,
                       j * lay.bk, masked)
    dv_scr[...] += tiles.mm(p.astype(do_ref.dtype), do_ref[...], trans_a=True)
    dk_scr[...] += tiles.mm(ds.astype(q_ref.dtype), q_ref[...], trans_a=True)

  pc.by_status(plan_ref[(b * lay.nk + j) * lay.nq + i], update)

  @pl.when((g == lay.G - 1) & (i == lay.nq - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec, lay):
  id_refs, (dq_ref, dq_scr) = pc.split_refs(spec, refs)
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def update(masked):
    _, ds = _grad_tile(spec, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, id_refs,
                       j * lay.bk, masked)
    dq_scr[...] += tiles.mm(ds.astype(k_ref.dtype), k_ref[...])

  pc.by_status(plan_ref[(b * lay.nq + i) * lay.nk + j], update)

  @pl.when(j == lay.nk - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * spec.scale).astype(dq_ref.dtype)


def flash_backward(spec, lay, interpret, q, k, v, dout, lse_rows, delta_rows, ids, kv_plan,
                   q_plan):
  """Kernel-layout residuals and cotangents -> (dq, dk, dv) in the input dtypes.

  lse_rows, delta_rows: [B, H, Tq, LANES] float32 from `tiles.backward_row_terms` (lse +inf on
  empty rows).
  """
  G, nq, nk = lay.G, lay.nq, lay.nk
  operands = (q, k, v, dout, lse_rows, delta_rows, *ids)

  def in_specs(s):
    return [s.q, s.kv, s.kv, s.q, s.q_row, s.q_row, *s.id_specs(spec.segments)]

  def q_index(b, kh, j, g, i, plan):
    return b, kh * G + g, pc.block_of(plan[(b * nk + j) * nq + i])

  dkv = pc.Specs(lay, q_index, lambda b, kh, j, g, i, plan: (b, kh, j))
  dk, dv = pc.call(
      functools.partial(_dkv_kernel, spec=spec, lay=lay), grid=(lay.B, lay.K, nk, G, nq),
      in_specs=in_specs(dkv), out_specs=[dkv.kv, dkv.kv],
      out_shape=[pc.sds(k.shape, k.dtype), pc.sds(v.shape, v.dtype)],
      scratch=[pc.vmem(lay.bk, lay.D), pc.vmem(lay.bk, lay.D)],
      semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
      interpret=interpret)(q_plan, *operands)

  dq_specs = pc.Specs.by_q_block(lay)
  dq = pc.call(
      functools.partial(_dq_kernel, spec=spec, lay=lay), grid=(lay.B, lay.H, nq, nk),
      in_specs=in_specs(dq_specs), out_specs=dq_specs.q, out_shape=pc.sds(q.shape, q.dtype),
      scratch=[pc.vmem(lay.bq, lay.D)],
      semantics=("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret)(kv_plan, *operands)
  return dq, dk, dv
