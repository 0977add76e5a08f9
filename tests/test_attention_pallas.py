"""Pallas kernels: TPU interpret mode, lowering to Mosaic, block plans.

Accuracy against the reference is in test_attention_kernels.py.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attention_cases import Case, blocked, check_f32, make_inputs
from lcjax.ops import pallas_common, tiles
from lcjax.ops.pallas_attention import pallas_attention


def test_tpu_interpret_mode(monkeypatch):
  """TPU interpret mode simulates VMEM and DMAs (uninitialised memory is NaN): same answers, with
  each kernel run as 3 calls (9 plan entries each) writing into outputs aliased through them."""
  monkeypatch.setattr(pallas_common, "PLAN_BUDGET_BYTES", 4 * 9)
  case = Case(Tq=100, Tk=130, causal=True, segments=True, empty_rows=True, q_offset=10)
  check_f32(blocked("pallas", tiles.BlockSizes(32, 64), interpret=pltpu.InterpretParams()), case)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_tpu(dtype):
  """Forward and backward kernels lower to Mosaic for TPU (checked on CPU, no TPU needed)."""
  B, T, H, K, D = 1, 1000, 4, 2, 128
  q = jax.ShapeDtypeStruct((B, T, H, D), dtype)
  kv = jax.ShapeDtypeStruct((B, T, K, D), dtype)
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def grads(q, k, v, pos, seg):
    def loss(q, k, v):
      out, lse = pallas_attention(
          q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
          causal=True, sliding_window=300, softcap=20.0, scale=0.1, interpret=False,
          block_sizes=tiles.BlockSizes.default("pallas", "tpu"))
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  lowered = jax.jit(grads).trace(q, kv, kv, ids, ids).lower(lowering_platforms=("tpu",))
  calls = [line for line in lowered.as_text().splitlines() if "@tpu_custom_call(" in line]
  rows = []  # per call: lse/Delta [1, H, 1, T] and ids [1, 1, T], never [.., T, 128] in HBM
  for call in calls:
    operands = call.rsplit(" : (", 1)[1].split(") ->")[0]
    shapes = [tuple(map(int, m.split("x"))) for m in re.findall(r"tensor<([\dx]+)x[bfi]", operands)]
    rows.append(sum(s[-2:] == (1, 1024) for s in shapes))
    rest = [s for s in shapes if len(s) > 1 and s[-2:] != (1, 1024)]
    assert all(len(s) == 4 and s[-2:] == (1024, D) for s in rest), operands  # q, k, v, out, dO..
  assert sorted(rows) == [5, 6, 6], rows  # forward: 4 ids, lse; dK/dV and dQ: lse, Delta, 4 ids


def test_tpu_blocks_must_be_lane_multiples():
  """Row blocks (1, n) need n % 128 == 0 unless one block holds the whole sequence."""
  q = jnp.zeros((1, 300, 2, 128))
  pos = jnp.arange(300)[None]
  kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=None, kv_segment_ids=None,
            causal=True, sliding_window=None, softcap=None, scale=1.0, interpret=False)
  with pytest.raises(ValueError, match=r"block_q to be a multiple of 128.*block_q=64 over 5"):
    pallas_attention(q, q, q, block_sizes=tiles.BlockSizes(64, 512), **kw)
  with pytest.raises(ValueError, match=r"block_kv to be a multiple of 128.*block_kv=200 over 2"):
    pallas_attention(q, q, q, block_sizes=tiles.BlockSizes(512, 200), **kw)


def test_plan_skips_and_reuses_blocks():
  """Causal plan: tiles above the diagonal are SKIP and load the last live kv block again."""
  spec = tiles.Spec(causal=True, sliding_window=None, softcap=None, scale=1.0, segments=False,
                    kv_len=128)
  pos = jnp.arange(128, dtype=jnp.int32)[None]
  status = tiles.block_status(spec, pos, pos, None, None, 32, 32)[0]
  expected = np.where(np.arange(4)[:, None] > np.arange(4), tiles.FULL, tiles.SKIP)
  np.fill_diagonal(expected, tiles.PARTIAL)
  np.testing.assert_array_equal(status, expected)
  plan = np.asarray(tiles.fetch_plan(status[None], axis=2)[0])
  np.testing.assert_array_equal(plan % 4, expected)
  np.testing.assert_array_equal(plan // 4, np.minimum(np.arange(4), np.arange(4)[:, None]))


@pytest.mark.parametrize("outer", ["q", "kv"])
def test_row_plan_slabs_are_rows_of_the_whole_plan(outer):
  """Slabs of grid rows from any start (across batch rows too), built from block summaries, equal
  those rows of the whole [B, nq, nk] plan (transposed for dK/dV), zigzag positions and segments."""
  case = Case(Tq=130, Tk=130, B=3, causal=True, window=100, segments=True, zigzag=(2, 0, 1))
  _, kw = make_inputs(case)
  spec = tiles.Spec(causal=True, sliding_window=100, softcap=None, scale=1.0, segments=True,
                    kv_len=130)
  bq, bk = 16, 24  # 130 divides by neither: edge-padded ids, a padded last kv block
  ids = [tiles.pad_seq(jnp.asarray(kw[n]), -(-130 // b) * b, 1, "edge") for n, b in (
      ("q_positions", bq), ("kv_positions", bk), ("q_segment_ids", bq), ("kv_segment_ids", bk))]
  n_rows = 3 * (-(-130 // bq) if outer == "q" else -(-130 // bk))  # B * (blocks of the outer side)
  slabs = [(0, 1), (4, 7), (n_rows - 5, 5)]  # (start, rows): the first, across b = 0 | 1, the last

  @jax.jit
  def plans(ids):
    status = tiles.block_status(spec, *ids, bq, bk)  # [3, 9, 6]
    status = status.transpose(0, 2, 1) if outer == "kv" else status
    sums = tiles.block_summaries(spec, *ids, bq, bk)
    return (tiles.fetch_plan(status, axis=2).reshape(-1, status.shape[2]),
            [tiles.row_plan(spec, *sums, jnp.int32(start), rows, bk, outer)
             for start, rows in slabs])

  whole, got = plans(ids)
  assert whole.shape[0] == n_rows
  assert {tiles.SKIP, tiles.PARTIAL, tiles.FULL} <= set(np.unique(np.asarray(whole) % 4))
  for (start, rows), slab in zip(slabs, got):
    np.testing.assert_array_equal(slab, whole[start:start + rows])


def test_block_sizes():
  assert tiles.BlockSizes(512, 512).fit(77, 1000) == tiles.BlockSizes(80, 512)
  assert tiles.BlockSizes.default("pallas", "tpu").block_kv % 128 == 0
  with pytest.raises(ValueError, match="block sizes must be >= 1"):
    tiles.BlockSizes(0, 128)
