"""Blockwise XLA attention (`implementation="xla"`) against the float64 reference; O(T) memory."""
import re

import jax
import jax.numpy as jnp
import pytest

from attention_cases import Case, check_bf16, check_f32, semantic_cases
from lcjax import ops
from lcjax.ops.blockwise import blockwise_attention
from lcjax.ops.tiles import BlockSizes

SMALL = BlockSizes(32, 48)  # several blocks at these lengths, neither dividing them


def _attend(blocks):
  def attend(q, k, v, kw):
    return blockwise_attention(q, k, v, block_sizes=blocks, **_all_args(kw, q.shape[-1]))
  return attend


def _all_args(kw, D):
  kw = {"q_segment_ids": None, "kv_segment_ids": None, **kw}
  return dict(kw, scale=D ** -0.5 if kw["scale"] is None else kw["scale"])


@pytest.mark.parametrize("case", semantic_cases(), ids=lambda c: c.id)
def test_matches_reference_f32(case):
  check_f32(_attend(SMALL), case)


@pytest.mark.parametrize("D", [8, 16, 32, 64, 128])
def test_head_dims(D):
  check_f32(_attend(SMALL), Case(Tq=77, Tk=77, H=3, K=1, D=D, causal=True))


@pytest.mark.parametrize("case", [
    Case(Tq=130, Tk=130, causal=True, segments=True, softcap=5.0),
    Case(Tq=77, Tk=200, H=6, K=1, causal=True, window=50, q_offset=-60, segments=True,
         empty_rows=True)], ids=lambda c: c.id)
def test_bf16_relative_to_plain_bf16(case):
  check_bf16(_attend(SMALL), case)
