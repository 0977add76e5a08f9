"""FlashAttention-2 as a Pallas kernel pair for TPU (Mosaic), tested on CPU in interpret mode.

Forward (this module): grid (B, H, q blocks, kv blocks), the kv axis innermost and sequential;
VMEM scratch holds the running max, sum and float32 accumulator of FlashAttention-2's Alg. 1
(`tiles`), the output and the natural-log LSE are written after the last kv block. Backward
(`pallas_attention_bwd`): a dK/dV kernel and a dQ kernel that recompute P from the LSE (Alg. 2).
`jax.custom_vjp` ties them together; gradients flow through both out and lse.

K/V heads are indexed as h // G (GQA/MQA, never repeated). Per-block min/max of positions and
segment ids give each tile a status (SKIP / PARTIAL / FULL, `tiles.block_status`); SKIP tiles
are not computed and reload the previous block, FULL tiles skip the mask.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lcjax.ops import pallas_attention_bwd as bwd
from lcjax.ops import pallas_common as pc
from lcjax.ops import tiles


def _fwd_kernel(plan_ref, q_ref, k_ref, v_ref, *refs, spec, lay):
  id_refs, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = pc.split_refs(spec, refs)
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def update(masked):
    s, _, mask = pc.load_tile(spec, q_ref, k_ref, id_refs, j * lay.bk, masked)
    m, l, acc = tiles.online_softmax_update(s, mask, v_ref[...], m_scr[:, :1], l_scr[:, :1],
                                            acc_scr[...])
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    acc_scr[...] = acc

  pc.by_status(plan_ref[(b * lay.nq + i) * lay.nk + j], update)

  @pl.when(j == lay.nk - 1)
  def _finish():
    out, lse = tiles.finalize(m_scr[:, :1], l_scr[:, :1], acc_scr[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def flash_forward(spec, lay, interpret, q, k, v, ids, kv_plan):
  """Kernel-layout inputs -> (out [B, H, Tq, D] in q.dtype, lse [B, H, Tq] float32)."""
  specs = pc.Specs.by_q_block(lay)
  out, lse = pc.call(
      functools.partial(_fwd_kernel, spec=spec, lay=lay), grid=(lay.B, lay.H, lay.nq, lay.nk),
      in_specs=[specs.q, specs.kv, specs.kv, *specs.id_specs(spec.segments)],
      out_specs=[specs.q, specs.q_row],
      out_shape=[pc.sds(q.shape, q.dtype), pc.sds(q.shape[:3] + (pc.LANES,), jnp.float32)],
      scratch=[pc.vmem(lay.bq, pc.LANES), pc.vmem(lay.bq, pc.LANES), pc.vmem(lay.bq, lay.D)],
      semantics=("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret)(kv_plan, q, k, v, *ids)
  return out, lse[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(spec, lay, interpret, q, k, v, ids, kv_plan, q_plan):
  return flash_forward(spec, lay, interpret, q, k, v, ids, kv_plan)


def _flash_fwd(spec, lay, interpret, q, k, v, ids, kv_plan, q_plan):
  out, lse = flash_forward(spec, lay, interpret, q, k, v, ids, kv_plan)
  return (out, lse), (q, k, v, ids, kv_plan, q_plan, out, lse)


def _flash_bwd(spec, lay, interpret, res, cotangents):
  q, k, v, ids, kv_plan, q_plan, out, lse = res
  dout, dlse = cotangents
  lse_bwd, delta = tiles.backward_row_terms(out, dout, lse, dlse)
  dq, dk, dv = bwd.flash_backward(spec, lay, interpret, q, k, v, dout, pc.rows(lse_bwd),
                                  pc.rows(delta), ids, kv_plan, q_plan)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q_BTHD, k_BTKD, v_BTKD, *, q_positions, kv_positions, q_segment_ids,
                     kv_segment_ids, causal, sliding_window, softcap, scale, interpret: bool,
                     block_sizes: tiles.BlockSizes | None = None):
  """Arguments as `ops.attention` (validated, positions filled); returns (out_BTHD, lse_BHT f32)."""
  B, Tq, H, D = q_BTHD.shape
  Tk, K = k_BTKD.shape[1], k_BTKD.shape[2]
  # not interpreted, this is a Mosaic TPU kernel whatever the host: TPU tiles
  blocks = (block_sizes or tiles.BlockSizes.default("pallas", "cpu" if interpret else "tpu")
            ).fit(Tq, Tk)
  bq, bk = blocks.block_q, blocks.block_kv
  lay = pc.Layout(B=B, H=H, K=K, D=D, nq=-(-Tq // bq), nk=-(-Tk // bk), bq=bq, bk=bk)
  segments = q_segment_ids is not None
  spec = tiles.Spec(causal=causal, sliding_window=sliding_window, softcap=softcap, scale=scale,
                    segments=segments, kv_len=Tk)

  def ids(x_BT, n, b):  # int32, edge-padded so block ranges stay tight
    return None if x_BT is None else tiles.pad_seq(x_BT.astype(jnp.int32), n * b, 1, "edge")

  qpos, qseg = ids(q_positions, lay.nq, bq), ids(q_segment_ids, lay.nq, bq)
  kpos, kseg = ids(kv_positions, lay.nk, bk), ids(kv_segment_ids, lay.nk, bk)
  status = tiles.block_status(spec, qpos, kpos, qseg, kseg, bq, bk)
  kv_plan = tiles.fetch_plan(status, axis=2).reshape(-1)
  q_plan = tiles.fetch_plan(status.transpose(0, 2, 1), axis=2).reshape(-1)
  q = tiles.pad_seq(q_BTHD.transpose(0, 2, 1, 3), lay.nq * bq, 2)
  k, v = (tiles.pad_seq(x.transpose(0, 2, 1, 3), lay.nk * bk, 2) for x in (k_BTKD, v_BTKD))
  out, lse = _flash(spec, lay, interpret, q, k, v, pc.id_arrays(qpos, kpos, qseg, kseg),
                    kv_plan, q_plan)
  return out[:, :, :Tq].transpose(0, 2, 1, 3), lse[:, :, :Tq]
