"""FlashAttention-2 as a Pallas kernel pair for TPU (Mosaic), tested on CPU in interpret mode.

Forward (this module): grid (B * q blocks, H, kv blocks), the kv axis innermost and sequential,
run as a loop of calls over slabs of rows so the plan in SMEM stays bounded (`pallas_common`);
VMEM scratch holds the running max, sum and float32 accumulator of FlashAttention-2's Alg. 1
(`tiles`), the output and the natural-log LSE are written after the last kv block. Backward
(`pallas_attention_bwd`): a dK/dV kernel and a dQ kernel that recompute P from the LSE (Alg. 2).
`jax.custom_vjp` ties them together; gradients flow through both out and lse.

What lives in HBM (see `pallas_common`): q, k, v, out in [B, heads, T, D]; the LSE, saved from
forward to backward, and Delta as rows [B, H, 1, Tq] f32; positions and segment ids as rows
[B, 1, T] int32. Rows cost 4 bytes a token; the lane-broadcast [.., T, 128] form that VMEM tiles
want would cost 512, which at 256K tokens per chip is GiBs per layer. The kernels transpose rows
to columns and back in VMEM, once per block.

K/V heads are indexed as h // G (GQA/MQA, never repeated). Per-block min/max of positions and
segment ids give each tile a status (SKIP / PARTIAL / FULL, `tiles.block_status`); SKIP tiles
are not computed and reload the previous block, FULL tiles skip the mask. Beyond the plan
budget of one grid row (`pallas_common`), the sequences are cut into pieces merged by LSE.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lcjax.ops import pallas_attention_bwd as bwd
from lcjax.ops import pallas_common as pc
from lcjax.ops import tiles


def _fwd_kernel(start_ref, plan_ref, q_ref, k_ref, v_ref, *refs, spec, lay):
  del start_ref
  id_refs, (o_ref, lse_ref, m_scr, l_scr, acc_scr, *q_cols) = pc.split_refs(spec, refs)
  c, j = pl.program_id(0), pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    pc.fill_columns(id_refs, q_cols, "q")

  def update(masked):
    s, _, mask = pc.load_tile(spec, q_ref, k_ref, pc.tile_ids(id_refs, q_cols, "q"),
                              j * lay.bk, masked)
    m, l, acc = tiles.online_softmax_update(s, mask, v_ref[...], m_scr[:, :1], l_scr[:, :1],
                                            acc_scr[...])
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    acc_scr[...] = acc

  pc.by_status(plan_ref[c * lay.nk + j], update)

  @pl.when(j == lay.nk - 1)
  def _finish():
    out, lse = tiles.finalize(m_scr[:, :1], l_scr[:, :1], acc_scr[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = pc.to_row(lse)


def flash_forward(spec, lay, interpret, q, k, v, ids, sums):
  """Kernel-layout inputs -> (out [B, H, Tq, D] in q.dtype, lse [B, H, Tq] float32).

  sums: the (q, kv) block summaries of `tiles.block_summaries`.
  """
  specs = pc.Specs.by_q_block(lay)
  out, lse = pc.call_by_rows(
      functools.partial(_fwd_kernel, spec=spec, lay=lay),
      functools.partial(tiles.row_plan, spec, *sums, bk=lay.bk, outer="q"),
      lay=lay, rows=lay.B * lay.nq, cols=lay.nk, inner=(lay.H, lay.nk), operands=(q, k, v, *ids),
      in_specs=[specs.q, specs.kv, specs.kv, *specs.id_specs(spec.segments)],
      out_specs=[specs.q, specs.q_row],
      out_shape=[pc.sds(q.shape, q.dtype), pc.sds(q.shape[:2] + (1, q.shape[2]), jnp.float32)],
      scratch=[pc.vmem(lay.bq, pc.LANES), pc.vmem(lay.bq, pc.LANES), pc.vmem(lay.bq, lay.D),
               *pc.id_columns(spec, lay.bq)],
      semantics=("parallel", "parallel", "arbitrary"), interpret=interpret)
  return out, lse[:, :, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(spec, lay, interpret, q, k, v, ids, sums):
  return flash_forward(spec, lay, interpret, q, k, v, ids, sums)


def _flash_fwd(spec, lay, interpret, q, k, v, ids, sums):
  out, lse = flash_forward(spec, lay, interpret, q, k, v, ids, sums)
  return (out, lse), (q, k, v, ids, sums, out, lse)


def _flash_bwd(spec, lay, interpret, res, cotangents):
  q, k, v, ids, sums, out, lse = res
  dout, dlse = cotangents
  lse_bwd, delta = tiles.backward_row_terms(out, dout, lse, dlse)
  dq, dk, dv = bwd.flash_backward(spec, lay, interpret, q, k, v, dout, lse_bwd[:, :, None],
                                  delta[:, :, None], ids, sums)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _merge(parts):
  """(out, lse) pairs of the same queries over disjoint keys -> (out float32, lse) over them all."""
  lse_PBHT = jnp.stack([lse for _, lse in parts])
  top = lax.stop_gradient(jnp.max(lse_PBHT, axis=0))  # any shift is exact; this one avoids overflow
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w_PBHT = jnp.exp(lse_PBHT - top)  # 0 where a part has no allowed key
  total = jnp.sum(w_PBHT, axis=0)
  seen = total > 0
  lse = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
  w_PBHT = w_PBHT / jnp.where(seen, total, 1.0)
  out = sum(o.astype(jnp.float32) * w.transpose(0, 2, 1)[..., None]
            for (o, _), w in zip(parts, w_PBHT))
  return out, lse


def _in_pieces(q_len, kv_len, q, k, v, *, q_positions, kv_positions, q_segment_ids,
               kv_segment_ids, **kw):
  """pallas_attention over pieces of at most q_len queries and kv_len keys: LSE-merged over the
  kv pieces, concatenated over the q pieces. Only for rows of more blocks than one call's plan."""
  def pieces(x, n, T):
    return [None if x is None else x[:, s:s + n] for s in range(0, T, n)]

  Tq, Tk = q.shape[1], k.shape[1]
  ks = list(zip(*(pieces(x, kv_len, Tk) for x in (k, v, kv_positions, kv_segment_ids))))
  outs, lses = [], []
  for qp, qpos, qseg in zip(*(pieces(x, q_len, Tq) for x in (q, q_positions, q_segment_ids))):
    out, lse = _merge([pallas_attention(qp, kp, vp, q_positions=qpos, kv_positions=kpos,
                                        q_segment_ids=qseg, kv_segment_ids=kseg, **kw)
                       for kp, vp, kpos, kseg in ks])
    outs.append(out.astype(q.dtype))
    lses.append(lse)
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


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
  most = pc.plan_entries()
  lay = pc.Layout(B=B, H=H, K=K, D=D, nq=-(-Tq // bq), nk=-(-Tk // bk), bq=bq, bk=bk,
                  plan_entries=most)
  if not interpret:
    pc.check_blocks(lay)
  options = dict(causal=causal, sliding_window=sliding_window, softcap=softcap, scale=scale,
                 interpret=interpret, block_sizes=blocks)
  if max(lay.nq, lay.nk) > most:  # a grid row alone would overflow one call's plan
    return _in_pieces(most * bq, most * bk, q_BTHD, k_BTKD, v_BTKD, q_positions=q_positions,
                      kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids, **options)
  segments = q_segment_ids is not None
  spec = tiles.Spec(causal=causal, sliding_window=sliding_window, softcap=softcap, scale=scale,
                    segments=segments, kv_len=Tk)

  def ids(x_BT, n, b):  # int32, edge-padded so block ranges stay tight
    return None if x_BT is None else tiles.pad_seq(x_BT.astype(jnp.int32), n * b, 1, "edge")

  qpos, qseg = ids(q_positions, lay.nq, bq), ids(q_segment_ids, lay.nq, bq)
  kpos, kseg = ids(kv_positions, lay.nk, bk), ids(kv_segment_ids, lay.nk, bk)
  sums = tiles.block_summaries(spec, qpos, kpos, qseg, kseg, bq, bk)
  q = tiles.pad_seq(q_BTHD.transpose(0, 2, 1, 3), lay.nq * bq, 2)
  k, v = (tiles.pad_seq(x.transpose(0, 2, 1, 3), lay.nk * bk, 2) for x in (k_BTKD, v_BTKD))
  out, lse = _flash(spec, lay, interpret, q, k, v, pc.id_arrays(qpos, kpos, qseg, kseg), sums)
  return out[:, :, :Tq].transpose(0, 2, 1, 3), lse[:, :, :Tq]
