"""Tile math and block plans shared by the blockwise XLA path and the Pallas kernels.

FlashAttention-2 (Dao 2023, arXiv 2307.08691) cuts Q into row blocks and K/V into column
blocks. The forward pass keeps per query row a running max m, sum l and accumulator (Alg. 1):

  m' = max(m, rowmax(S)),  P = exp(S - m'),  l' = e^(m - m') l + rowsum(P),
  acc' = e^(m - m') acc + P V;   at the end O = acc / l,  LSE = m + log l  (natural log).

The backward pass recomputes P = exp(S - LSE) tile by tile (Alg. 2) with
Delta = rowsum(dO * O) - dLSE, where dLSE is the cotangent of the LSE output (dLSE/dS = P):

  dV += P^T dO,  dP = dO V^T,  dS = P (dP - Delta),  dQ += dS K,  dK += dS^T Q.

Masked scores are -inf and every exp is taken against a finite stand-in for a -inf max, so a
row with no allowed key gives O = 0, LSE = -inf and zero gradients, never NaN.

The functions on tiles take 2-D arrays ([bq, D], [bk, D], [bq, bk]) and use only ops that
Mosaic lowers, so the Pallas kernels call them on loaded refs and the XLA path vmaps them
over batch and heads. A block plan says per (batch row, q block, kv block) whether the tile is
fully masked (SKIP), partly masked (PARTIAL) or fully visible (FULL), from per-block min/max
of positions and segment ids (`block_summaries`, O(T / block) numbers); SKIP and FULL are
claimed only when they hold for every pair. The Pallas kernels take the plan a slab of grid rows
at a time (`row_plan`), so no [nq, nk] array is ever needed whole.
"""
import dataclasses
import functools

import jax.numpy as jnp
from jax import lax

SKIP, PARTIAL, FULL = 0, 1, 2
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: A B^T
_NN = (((1,), (0,)), ((), ()))  # A B


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static options of one attention call (hashable: jit and custom_vjp take it as static)."""
  causal: bool
  sliding_window: int | None
  softcap: float | None
  scale: float
  segments: bool  # q/kv segment ids are given
  kv_len: int  # true Tk; columns at or past it are padding


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes [block_q, block_kv]; `default` gives the tested choice per kernel and backend."""
  block_q: int
  block_kv: int

  def __post_init__(self):
    if self.block_q < 1 or self.block_kv < 1:
      raise ValueError(f"block sizes must be >= 1; got {self}")

  @classmethod
  def default(cls, kernel: str, backend: str) -> "BlockSizes":
    """kernel "xla" | "pallas"; backend "cpu" | "gpu" | "tpu", the platform compiled for."""
    table = {("xla", "cpu"): (512, 512), ("xla", "gpu"): (512, 512), ("xla", "tpu"): (512, 1024),
             ("pallas", "tpu"): (512, 512), ("pallas", "cpu"): (128, 128),
             ("pallas", "gpu"): (128, 128)}
    return cls(*table.get((kernel, backend), table[(kernel, "cpu")]))

  def fit(self, Tq: int, Tk: int) -> "BlockSizes":
    """Clamps each block to the sequence rounded up to 8 (a TPU sublane), so short inputs pad little."""
    return BlockSizes(min(self.block_q, _round_up(Tq, 8)), min(self.block_kv, _round_up(Tk, 8)))


def _round_up(n, m):
  return -(-n // m) * m


def pad_seq(x, length, axis, mode="constant"):
  """Pads `axis` of x to `length`; "edge" repeats the last entry (keeps block min/max tight)."""
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, mode=mode)


def mm(a, b, *, trans_a=False, trans_b=False, out_dtype=jnp.float32):
  """a @ b (optionally transposed) accumulated in out_dtype; transposes as Mosaic lowers them."""
  if trans_a:
    a = a.T
  return lax.dot_general(a, b, _NT if trans_b else _NN, preferred_element_type=out_dtype)


def tile_scores(spec: Spec, q_QD, k_KD, acc_dtype=jnp.float32):
  """Scaled, soft-capped scores [bq, bk] and tanh(s / softcap) (None without softcap)."""
  s = mm(q_QD, k_KD, trans_b=True, out_dtype=acc_dtype) * spec.scale
  if spec.softcap is None:
    return s, None
  t = jnp.tanh(s / spec.softcap)
  return spec.softcap * t, t


def tile_mask(spec: Spec, qpos, kpos, qseg, kseg, col0, kv_axis: int = 1):
  """bool tile: may query i attend key j (DESIGN.md semantics, padded keys excluded), or None.

  The query ids and key ids broadcast together to the tile: [bq, 1] and [1, bk] for S [bq, bk]
  (kv_axis 1), or [1, bq] and [bk, 1] for the transposed tile S^T [bk, bq] (kv_axis 0).
  """
  shape = (qpos.shape[0], kpos.shape[1]) if kv_axis == 1 else (kpos.shape[0], qpos.shape[1])
  conds = []
  if spec.causal:
    conds.append(kpos <= qpos)
  if spec.sliding_window is not None:
    conds.append(qpos - kpos < spec.sliding_window)
  if spec.segments:
    conds.append(qseg == kseg)
  if spec.kv_len % shape[kv_axis]:
    cols = col0 + lax.broadcasted_iota(jnp.int32, shape, kv_axis)
    conds.append(cols < spec.kv_len)
  if not conds:
    return None
  return functools.reduce(jnp.logical_and, [jnp.broadcast_to(c, shape) for c in conds])


def online_softmax_update(s_QK, mask_QK, v_KD, m_Q1, l_Q1, acc_QD):
  """One kv tile of the forward recurrence; returns the new (m, l, acc)."""
  if mask_QK is not None:
    s_QK = jnp.where(mask_QK, s_QK, -jnp.inf)
  m_new = jnp.maximum(m_Q1, jnp.max(s_QK, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p_QK = jnp.exp(s_QK - m_safe)
  alpha = jnp.exp(m_Q1 - m_safe)
  l_new = alpha * l_Q1 + jnp.sum(p_QK, axis=1, keepdims=True)
  acc_new = alpha * acc_QD + mm(p_QK.astype(v_KD.dtype), v_KD, out_dtype=acc_QD.dtype)
  return m_new, l_new, acc_new


def finalize(m_Q1, l_Q1, acc_QD):
  """(out [bq, D], lse [bq, 1]) from the running state; rows that saw no key get 0 and -inf."""
  seen = l_Q1 > 0
  l_safe = jnp.where(seen, l_Q1, 1.0)
  return acc_QD / l_safe, jnp.where(seen, m_Q1 + jnp.log(l_safe), -jnp.inf)


def tile_p_ds(s_QK, t_QK, mask_QK, lse_Q1, delta_Q1, do_QD, v_KD, transposed=False):
  """Recomputed probabilities P and dS [bq, bk] w.r.t. the scaled, uncapped scores.

  lse must be +inf (not -inf) on empty rows, which makes P exactly 0 there without a branch.
  transposed: s, t, mask are the transposed tile [bk, bq], lse and delta rows [1, bq]; returns
  P^T and dS^T, so that dV += P^T dO and dK += dS^T Q need no transpose.
  """
  if mask_QK is not None:
    s_QK = jnp.where(mask_QK, s_QK, -jnp.inf)
  p_QK = jnp.exp(s_QK - lse_Q1)
  dp_QK = (mm(v_KD, do_QD, trans_b=True, out_dtype=lse_Q1.dtype) if transposed else
           mm(do_QD, v_KD, trans_b=True, out_dtype=lse_Q1.dtype))
  ds_QK = p_QK * (dp_QK - delta_Q1)
  if t_QK is not None:
    ds_QK = ds_QK * (1.0 - t_QK * t_QK)
  return p_QK, ds_QK


def backward_row_terms(out, dout, lse, dlse, axis=-1):
  """(lse for the backward, Delta) per row: empty rows get lse +inf and Delta 0, so no NaN enters.

  out/dout carry D on `axis`; lse/dlse have the same shape without it. Delta = rowsum(dO*O) - dLSE.
  """
  empty = lse == -jnp.inf
  delta = jnp.sum(dout.astype(lse.dtype) * out.astype(lse.dtype), axis=axis) - dlse
  return jnp.where(empty, jnp.inf, lse), jnp.where(empty, 0.0, delta)


def block_summaries(spec: Spec, qpos_BT, kpos_BT, qseg_BT, kseg_BT, bq: int, bk: int):
  """int32 [B, nq, 4] and [B, nk, 4]: per block (min pos, max pos, min seg, max seg).

  Inputs padded (edge mode) to multiples of bq and bk; the segment slots are 0 without segments.
  These O(T / block) numbers give any tile's status (`tile_status`).
  """
  def ranges(x_BT, b):
    x = x_BT.reshape(x_BT.shape[0], -1, b)
    return x.min(-1), x.max(-1)

  def summary(pos_BT, seg_BT, b):
    pos = ranges(pos_BT, b)
    seg = ranges(seg_BT, b) if spec.segments else (jnp.zeros_like(pos[0]),) * 2
    return jnp.stack([*pos, *seg], -1)
  return summary(qpos_BT, qseg_BT, bq), summary(kpos_BT, kseg_BT, bk)


def tile_status(spec: Spec, q_sum, kv_sum, kv_block, bk: int):
  """int32 SKIP/PARTIAL/FULL of the tiles whose block summaries q_sum, kv_sum [..., 4] broadcast
  together; kv_block (broadcast alike) is each tile's kv block index, bk the kv block size."""
  qlo, qhi, sqlo, sqhi = (q_sum[..., n] for n in range(4))
  klo, khi, sklo, skhi = (kv_sum[..., n] for n in range(4))
  shape = jnp.broadcast_shapes(qlo.shape, klo.shape, jnp.shape(kv_block))
  skip, full = jnp.zeros(shape, bool), jnp.ones(shape, bool)
  if spec.causal:
    skip |= klo > qhi
    full &= khi <= qlo
  if spec.sliding_window is not None:
    skip |= qlo - khi >= spec.sliding_window
    full &= qhi - klo < spec.sliding_window
  if spec.segments:
    skip |= (skhi < sqlo) | (sklo > sqhi)
    full &= (sqlo == sqhi) & (sklo == skhi) & (sqlo == sklo)
  if spec.kv_len % bk:  # the last kv block holds padding columns
    full &= kv_block < spec.kv_len // bk
  return jnp.where(skip, SKIP, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def block_status(spec: Spec, qpos_BT, kpos_BT, qseg_BT, kseg_BT, bq: int, bk: int):
  """int32 [B, nq, nk] SKIP/PARTIAL/FULL; inputs padded (edge mode) to multiples of bq and bk."""
  q_sum, kv_sum = block_summaries(spec, qpos_BT, kpos_BT, qseg_BT, kseg_BT, bq, bk)
  nk = kv_sum.shape[1]
  return tile_status(spec, q_sum[:, :, None], kv_sum[:, None], jnp.arange(nk), bk)


def row_plan(spec: Spec, q_sum, kv_sum, start, rows: int, bk: int, outer: str):
  """`fetch_plan` of `rows` grid rows from flat row `start`: int32 [rows, n].

  outer "q": row b * nq + i is q block i of batch row b against the n = nk kv blocks (forward,
  dQ); outer "kv": row b * nk + j is kv block j against the n = nq q blocks (dK/dV). Costs
  O(rows * n), whatever the number of rows in all.
  """
  own, other = (q_sum, kv_sum) if outer == "q" else (kv_sum, q_sum)
  B, n_own, _ = own.shape
  r = start + jnp.arange(rows, dtype=jnp.int32)
  mine = lax.dynamic_slice_in_dim(own.reshape(B * n_own, 4), start, rows)[:, None]
  theirs = jnp.take(other, lax.div(r, n_own), axis=0)  # [rows, n, 4]: the row's batch row
  if outer == "q":
    status = tile_status(spec, mine, theirs, jnp.arange(kv_sum.shape[1]), bk)
  else:
    status = tile_status(spec, theirs, mine, lax.rem(r, n_own)[:, None], bk)
  return fetch_plan(status, axis=1)


def fetch_plan(status, axis: int):
  """Plan entries 4 * (block to load) + status; a skipped tile loads a neighbouring live block.

  Along `axis`, a skipped block points at the last live block before it, or (when none) the
  first live one after it, so the pipeline sees an unchanged block index and skips the copy.
  """
  n = status.shape[axis]
  idx = lax.broadcasted_iota(jnp.int32, status.shape, axis)
  live = status != SKIP
  before = lax.cummax(jnp.where(live, idx, -1), axis=axis)
  after = lax.cummin(jnp.where(live, idx, n), axis=axis, reverse=True)
  fetch = jnp.where(before >= 0, before, jnp.where(after < n, after, 0))
  return fetch * 4 + status
