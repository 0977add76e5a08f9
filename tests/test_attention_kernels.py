"""Blockwise XLA and Pallas (interpret mode) attention against the float64 reference.

Small blocks (32 x 48) so that every length here spans several blocks that divide none of them.
"""
import pytest

from attention_cases import Case, blocked, check_bf16, check_f32, semantic_cases
from lcjax.ops import pallas_common
from lcjax.ops.tiles import BlockSizes

SMALL = BlockSizes(32, 48)
KERNELS = ["xla", "pallas"]


@pytest.mark.parametrize("case", semantic_cases(), ids=lambda c: c.id)
@pytest.mark.parametrize("implementation", KERNELS)
def test_matches_reference_f32(implementation, case):
  check_f32(blocked(implementation, SMALL), case)


@pytest.mark.parametrize("D", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("implementation", KERNELS)
def test_head_dims(implementation, D):
  check_f32(blocked(implementation, SMALL), Case(Tq=77, Tk=77, H=3, K=1, D=D, causal=True))


@pytest.mark.parametrize("case", [
    Case(Tq=130, Tk=130, causal=True, segments=True, softcap=5.0),
    Case(Tq=77, Tk=200, H=6, K=1, causal=True, window=50, q_offset=-60, segments=True,
         empty_rows=True)], ids=lambda c: c.id)
@pytest.mark.parametrize("implementation", KERNELS)
def test_bf16_relative_to_plain_bf16(implementation, case):
  check_bf16(blocked(implementation, SMALL), case)


@pytest.mark.parametrize("implementation", KERNELS)
def test_default_blocks(implementation):
  """The backend's default blocks, larger than some of these inputs."""
  check_f32(blocked(implementation), Case(Tq=200, Tk=300, causal=True, window=120, q_offset=100))


# (plan entries per call, case, (q piece, kv piece) pairs): budgets so small that each kernel
# runs as several calls (slabs of grid rows that cross batch rows, a last call overlapping the
# one before), or that one grid row exceeds a call and the sequences go in LSE-merged pieces
CHUNKED = [
    (20, Case(Tq=130, Tk=130, H=6, K=2, causal=True, segments=True, empty_rows=True), 1),
    (10, Case(Tq=77, Tk=200, H=6, K=1, causal=True, window=37, softcap=5.0, q_offset=53), 1),
    (12, Case(Tq=130, Tk=130, H=6, K=2, causal=True, segments=True, zigzag=(2, 1, 0)), 1),
    (2, Case(Tq=77, Tk=130, H=3, K=1, window=37, q_offset=53, segments=True, empty_rows=True), 4),
]


@pytest.mark.parametrize("entries, case, pieces", CHUNKED, ids=lambda x: getattr(x, "id", x))
def test_chunked_grid_matches_reference(monkeypatch, entries, case, pieces):
  """Every row of every slab lands where it belongs: a slab written one row off, or a plan slab
  not matching its rows, changes out, lse and the gradients."""
  monkeypatch.setattr(pallas_common, "PLAN_BUDGET_BYTES", 4 * entries)
  slabs = []  # (rows, rows per call) of each kernel run
  real = pallas_common.call_by_rows

  def spy(kernel, plan, *, lay, rows, cols, **kw):
    slabs.append((rows, min(rows, lay.plan_entries // cols)))
    return real(kernel, plan, lay=lay, rows=rows, cols=cols, **kw)

  monkeypatch.setattr(pallas_common, "call_by_rows", spy)
  check_f32(blocked("pallas", SMALL), case)
  assert len(slabs) == 3 * pieces, slabs  # forward, dK/dV, dQ per piece
  assert any(rows > per_call for rows, per_call in slabs), slabs
  assert pieces > 1 or any(rows % per_call for rows, per_call in slabs), slabs  # an overlap
