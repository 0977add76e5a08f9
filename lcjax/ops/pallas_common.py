"""Layout, BlockSpecs and tile loading shared by the Pallas attention kernels (forward and backward).

Kernel layout: q, out [B, H, Tq, D]; k, v [B, K, Tk, D], each padded to whole blocks. Per-row
float32 values (lse, Delta) are [B, H, Tq, LANES], and query positions/segment ids
[B, Tq, LANES], broadcast over the 128 TPU lanes; key positions/segment ids are
[B, SUBLANES, Tk]. So every block's last two dims are (8, 128)-aligned or whole, as Mosaic
requires, and a query id column [bq, 1] meets a key id row [1, bk] by broadcasting.
A scalar-prefetched plan (`tiles.fetch_plan`, flattened) tells each grid step its tile's status
and which block to load, so skipped tiles cost neither compute nor a new DMA.
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcjax.ops import tiles

LANES, SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static sizes of one call: batch, q heads, kv heads, head dim, block counts and sizes."""
  B: int
  H: int
  K: int
  D: int
  nq: int
  nk: int
  bq: int
  bk: int

  @property
  def G(self):
    return self.H // self.K


class Specs:
  """BlockSpecs of the operands, given index maps grid -> (b, h, q block) and (b, kv head, kv block)."""

  def __init__(self, lay: Layout, q_index, kv_index):
    bq, bk, D = lay.bq, lay.bk, lay.D
    self.q = pl.BlockSpec((None, None, bq, D), lambda *g: (*q_index(*g), 0))
    self.q_row = pl.BlockSpec((None, None, bq, LANES), lambda *g: (*q_index(*g), 0))
    self.kv = pl.BlockSpec((None, None, bk, D), lambda *g: (*kv_index(*g), 0))
    q_ids = pl.BlockSpec((None, bq, LANES), lambda *g: (q_index(*g)[0], q_index(*g)[2], 0))
    kv_ids = pl.BlockSpec((None, SUBLANES, bk), lambda *g: (kv_index(*g)[0], 0, kv_index(*g)[2]))
    self.ids = [q_ids, kv_ids]

  @classmethod
  def by_q_block(cls, lay: Layout) -> "Specs":
    """Specs for grid (b, h, q block, kv block) with the kv block read from the plan (fwd, dQ)."""
    G, nq, nk = lay.G, lay.nq, lay.nk
    return cls(lay, lambda b, h, i, j, plan: (b, h, i),
               lambda b, h, i, j, plan: (b, lax.div(h, G), block_of(plan[(b * nq + i) * nk + j])))

  def id_specs(self, segments: bool):
    return self.ids * (2 if segments else 1)


def id_arrays(qpos, kpos, qseg, kseg):
  """Positions (and segment ids) [B, T] padded -> the lane/sublane-broadcast kernel operands."""
  def q_side(x):
    return jnp.broadcast_to(x[:, :, None], x.shape + (LANES,))

  def kv_side(x):
    return jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1]))

  ids = (q_side(qpos), kv_side(kpos))
  return ids if qseg is None else ids + (q_side(qseg), kv_side(kseg))


def split_refs(spec: tiles.Spec, refs):
  """(qpos, kpos, qseg, kseg) refs, and the rest (outputs, scratch)."""
  n = 4 if spec.segments else 2
  ids = tuple(refs[:n]) + (None, None) * (not spec.segments)
  return ids, refs[n:]


def load_tile(spec: tiles.Spec, q_ref, k_ref, id_refs, col0, masked: bool):
  """Scores [bq, bk] float32, tanh(s / softcap) or None, and the mask (None when not masked)."""
  s, t = tiles.tile_scores(spec, q_ref[...], k_ref[...])
  if not masked:
    return s, t, None
  qpos_ref, kpos_ref, qseg_ref, kseg_ref = id_refs
  segs = (qseg_ref[:, :1], kseg_ref[:1, :]) if spec.segments else (None, None)
  return s, t, tiles.tile_mask(spec, qpos_ref[:, :1], kpos_ref[:1, :], *segs, col0)


def block_of(code):
  """The block to load, from a plan entry (`tiles.fetch_plan`); lax.div lowers where // does not."""
  return lax.div(code, 4)


def by_status(code, body):
  """Runs body(masked=False) on FULL tiles and body(masked=True) on PARTIAL ones; SKIP runs nothing."""
  status = lax.rem(code, 4)
  pl.when(status == tiles.FULL)(lambda: body(False))
  pl.when(status == tiles.PARTIAL)(lambda: body(True))


def rows(x_BHT):
  """[B, H, T] float32 -> [B, H, T, LANES] lane-broadcast, as the kernels read per-row values."""
  return jnp.broadcast_to(x_BHT[..., None], x_BHT.shape + (LANES,))


def call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, semantics,
         interpret: bool):
  """pallas_call with the plan as the one scalar-prefetch operand (the first kernel argument)."""
  grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                           out_specs=out_specs, scratch_shapes=scratch)
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret,
                        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def vmem(*shape):
  return pltpu.VMEM(shape, jnp.float32)


def sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)
