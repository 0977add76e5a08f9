"""Blockwise XLA and Pallas (interpret mode) attention against the float64 reference.

Small blocks (32 x 48) so that every length here spans several blocks that divide none of them.
"""
import pytest

from attention_cases import Case, blocked, check_bf16, check_f32, semantic_cases
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
