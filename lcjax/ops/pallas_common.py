"""Layout, BlockSpecs, tile loading and the chunked grid shared by the Pallas attention kernels.

Kernel layout: q, out [B, H, Tq, D]; k, v [B, K, Tk, D], each padded to whole blocks. Per-row
float32 values (lse, Delta) are [B, H, 1, Tq] and positions/segment ids [B, 1, T], one row of
lanes per head or batch row: XLA tiles such arrays (1, 128) in HBM, so they hold 4 bytes a token
and no more. (Broadcast over the 128 lanes, [.., T, 128], each f32 array is 4 GiB for Llama3-8B
at 262144 tokens a chip, and the v5p compile of its attention fwd + bwd held 19.7 GiB of
temporaries, 6.1 GiB with rows.) Their blocks are (1, bq) and (1, bk), so a kernel block is a
multiple of 128 or the whole sequence (`check_blocks`). The kernels turn a row into the form
their tile needs inside VMEM:

- forward and dQ (tile S [bq, bk]): per-query values are columns [bq, 1]; the first kv step of
  each q block transposes the q block's rows into [bq, LANES] VMEM scratch (`to_column`), and
  the forward transposes its LSE column back into a row once per q block (`to_row`);
- dK/dV: computes the transposed tile S^T [bk, bq] (`tiles.tile_p_ds(transposed=True)`), so the
  query rows (lse, Delta, ids) broadcast over its sublanes as they come from HBM, and only the
  key ids go into column scratch, once per kv block.

Each transpose moves one [LANES, n] array through the XLU per block and head, not per tile, and
no pass outside the kernels broadcasts or transposes these arrays in HBM.

A scalar-prefetched plan (`tiles.fetch_plan`) tells each grid step its tile's status and which
block to load, so skipped tiles cost neither compute nor a new DMA. Scalar prefetch lives in
SMEM, 1 MiB on v5p as its compiler reports, shared with Mosaic's own scalars and spills; a whole
[B, nq, nk] plan is 1 MiB at 262144 tokens with 512-blocks (B = 1), and that compile fails
("Ran out of memory in memory space smem"). So each kernel runs its grid (rows, ...) as a loop
of pallas_calls (`call_by_rows`), each over C consecutive rows (forward and dQ: rows b * nq + i,
dK/dV: rows b * nk + j, so batch rows share the budget too) with its own [C, n] slab of the plan,
built from O(T / block) block summaries (`tiles.row_plan`). The budget is PLAN_BUDGET_BYTES =
128 KiB of plan per call (32768 tiles; an eighth of SMEM, leaving the rest to Mosaic): 64 rows per
call at 262144 tokens, 16 at 1048576. A single row longer than the budget (over 32768 blocks, 16M
tokens with 512-blocks) is cut into pieces merged by their LSE (`pallas_attention`). Each call
writes its rows' blocks into outputs passed aliased through the loop, so the loop copies nothing.
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcjax.ops import tiles

LANES, SUBLANES = 128, 8
# SMEM bytes of plan per pallas_call (module docstring); read when a call is traced, so tests
# may set it small to force many calls.
PLAN_BUDGET_BYTES = 128 * 1024


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
  plan_entries: int  # most int32 plan entries (tiles) one pallas_call holds

  @property
  def G(self):
    return self.H // self.K


def plan_entries() -> int:
  """Plan entries per pallas_call under the current PLAN_BUDGET_BYTES."""
  return max(1, PLAN_BUDGET_BYTES // 4)


class Specs:
  """BlockSpecs of the operands, given index maps (*grid, start_ref, plan_ref) -> (b, h, q block)
  and -> (b, kv head, kv block)."""

  def __init__(self, lay: Layout, q_index, kv_index):
    bq, bk, D = lay.bq, lay.bk, lay.D
    self.q = pl.BlockSpec((None, None, bq, D), lambda *g: (*q_index(*g), 0))
    self.kv = pl.BlockSpec((None, None, bk, D), lambda *g: (*kv_index(*g), 0))

    def row(index):  # (b, h, block) -> (b, h, 0, block) of a [B, H, 1, T] array
      return lambda *g: (*index(*g)[:2], 0, index(*g)[2])
    self.q_row = pl.BlockSpec((None, None, 1, bq), row(q_index))

    def ids(index, n):  # (b, _, block) -> (b, 0, block) of a [B, 1, T] array
      return pl.BlockSpec((None, 1, n), lambda *g: (index(*g)[0], 0, index(*g)[2]))
    self.ids = [ids(q_index, bq), ids(kv_index, bk)]

  @classmethod
  def by_q_block(cls, lay: Layout) -> "Specs":
    """Specs for grid (row b * nq + i, h, kv block j), the kv block read from the plan (fwd, dQ)."""
    G, nq, nk = lay.G, lay.nq, lay.nk

    def q_index(c, h, j, start, plan):
      b, i = row_of(start, c, nq)
      return b, h, i

    def kv_index(c, h, j, start, plan):
      return row_of(start, c, nq)[0], lax.div(h, G), block_of(plan[c * nk + j])
    return cls(lay, q_index, kv_index)

  def id_specs(self, segments: bool):
    return self.ids * (2 if segments else 1)


def check_blocks(lay: Layout):
  """Mosaic needs a (1, n) row block's n to be a multiple of 128 or the whole (padded) row."""
  for name, n, b in (("block_q", lay.nq, lay.bq), ("block_kv", lay.nk, lay.bk)):
    if n > 1 and b % LANES:
      raise ValueError(f"Pallas TPU attention needs {name} to be a multiple of {LANES} when the "
                       f"sequence spans several blocks; got {name}={b} over {n} blocks: pass "
                       f"block sizes that are multiples of {LANES} (the default is 512)")


def id_arrays(qpos, kpos, qseg, kseg):
  """Positions (and segment ids) [B, T] padded -> the [B, 1, T] kernel operands."""
  return tuple(x[:, None] for x in (qpos, kpos, qseg, kseg) if x is not None)


def split_refs(spec: tiles.Spec, refs):
  """(qpos, kpos, qseg, kseg) refs, and the rest (outputs, scratch)."""
  n = 4 if spec.segments else 2
  ids = tuple(refs[:n]) + (None, None) * (not spec.segments)
  return ids, refs[n:]


def id_columns(spec: tiles.Spec, n: int):
  """VMEM scratch for one side's positions (and segment ids) as columns [n, LANES]."""
  return [pltpu.VMEM((n, LANES), jnp.int32)] * (2 if spec.segments else 1)


def to_column(x_1N):
  """[1, n] -> [n, LANES], row i holding x[i] in every lane: one transpose, in VMEM."""
  return jnp.broadcast_to(x_1N, (LANES, x_1N.shape[1])).T


def to_row(x_N1):
  """[n, 1] -> [1, n]: the inverse of `to_column`."""
  return jnp.broadcast_to(x_N1, (x_N1.shape[0], LANES)).T[:1]


def fill_columns(id_refs, col_refs, side: str):
  """Writes the `side` ("q" or "kv") ids' row blocks [1, n] into their column scratch."""
  mine = [r for r in (id_refs[0::2] if side == "q" else id_refs[1::2]) if r is not None]
  for row_ref, col_ref in zip(mine, col_refs, strict=True):
    col_ref[...] = to_column(row_ref[...])


def tile_ids(id_refs, col_refs, side: str):
  """() -> (qpos, kpos, qseg, kseg) as they broadcast against the tile: the `side` ids from their
  column scratch [n, 1], the other side's as their row blocks [1, n]."""
  def read():
    cols, out = iter(col_refs), []
    for n, ref in enumerate(id_refs):  # (qpos, kpos, qseg, kseg): the q side at even n
      if ref is None:
        out.append(None)
      elif (n % 2 == 0) == (side == "q"):
        out.append(next(cols)[:, :1])
      else:
        out.append(ref[...])
    return tuple(out)
  return read


def load_tile(spec: tiles.Spec, a_ref, b_ref, ids, col0, masked: bool, transposed=False):
  """Scores float32, tanh(s / softcap) or None, and the mask (None when not masked).

  a, b = q, k: S [bq, bk]; transposed: a, b = k, q and S^T [bk, bq]. ids: `tile_ids`, read
  only for a masked tile.
  """
  s, t = tiles.tile_scores(spec, a_ref[...], b_ref[...])
  if not masked:
    return s, t, None
  return s, t, tiles.tile_mask(spec, *ids(), col0, kv_axis=0 if transposed else 1)


def row_of(start_ref, c, n):
  """(batch row, block) of grid row c of a call from row start_ref[0]; n blocks a batch row."""
  r = start_ref[0] + c
  return lax.div(r, n), lax.rem(r, n)


def block_of(code):
  """The block to load, from a plan entry (`tiles.fetch_plan`); lax.div lowers where // does not."""
  return lax.div(code, 4)


def by_status(code, body):
  """Runs body(masked=False) on FULL tiles and body(masked=True) on PARTIAL ones; SKIP runs nothing."""
  status = lax.rem(code, 4)
  pl.when(status == tiles.FULL)(lambda: body(False))
  pl.when(status == tiles.PARTIAL)(lambda: body(True))


def call_by_rows(kernel, plan, *, lay: Layout, rows: int, cols: int, inner, operands, in_specs,
                 out_specs, out_shape, scratch, semantics, interpret: bool):
  """Runs `kernel` over the grid (rows, *inner) as a loop of pallas_calls of C rows each.

  C = plan_entries // cols (all rows when fewer). plan(start, C) gives the int32 [C, cols] plan of
  rows start .. start + C - 1; kernels and index maps receive (start [1], plan flattened) as their
  first two (scalar prefetch) arguments. The outputs start as zeros and pass aliased through
  every call, each call writing only its rows' blocks; the last call starts at rows - C and redoes
  the rows it shares with the one before it (the same tiles in the same order, the same values).
  """
  C = min(rows, lay.plan_entries // cols)
  assert C >= 1, (lay, cols)  # pallas_attention cuts longer rows into pieces
  n_in, n_out = len(operands), len(out_shape)

  def body_kernel(start_ref, plan_ref, *refs):  # drops the aliased output inputs (left in HBM)
    kernel(start_ref, plan_ref, *refs[:n_in], *refs[n_in + n_out:])

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(C, *inner), out_specs=out_specs, scratch_shapes=scratch,
      in_specs=[*in_specs, *[pl.BlockSpec(memory_space=pl.ANY)] * n_out])
  step = pl.pallas_call(body_kernel, grid_spec=grid_spec, out_shape=out_shape,
                        input_output_aliases={2 + n_in + o: o for o in range(n_out)},
                        interpret=interpret,
                        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))

  def body(n, outs):
    start = jnp.minimum(n * C, rows - C)
    return tuple(step(start[None], plan(start, C).reshape(-1), *operands, *outs))

  zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in out_shape)
  return lax.fori_loop(0, -(-rows // C), body, zeros)


def vmem(*shape):
  return pltpu.VMEM(shape, jnp.float32)


def sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)
