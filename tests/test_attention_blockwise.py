"""Blockwise XLA attention: O(T) memory, checked on the compiled program.

Accuracy against the reference is in test_attention_kernels.py.
"""
import re

import jax
import jax.numpy as jnp
import pytest

from lcjax import ops


def _seq_by_seq_shapes(hlo_text, T):
  """Array shapes in HLO text with two or more dims of at least T / 4 (a [Tq, Tk]-like tensor)."""
  shapes = re.findall(r"\b(?:f|bf|s|u|pred)\d*\[([\d,]+)\]", hlo_text)
  dims = [[int(d) for d in s.split(",") if d] for s in shapes]
  return [d for d in dims if sum(x >= T // 4 for x in d) >= 2]


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_no_sequence_by_sequence_tensor(implementation):
  """Compiled forward + backward at 16K (GQA, causal, documents, window): xla holds O(T) memory,
  the reference the [Tq, Tk] scores."""
  B, T, H, K, D = 1, 16384, 4, 2, 16
  q = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
  kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.float32)
  seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def fwd_bwd(q, k, v, seg, dout, dlse):
    f = lambda q, k, v: ops.attention(q, k, v, causal=True, q_segment_ids=seg,
                                      kv_segment_ids=seg, sliding_window=4096, return_lse=True,
                                      implementation=implementation)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp((dout, dlse))

  dlse = jax.ShapeDtypeStruct((B, H, T), jnp.float32)
  compiled = jax.jit(fwd_bwd).lower(q, kv, kv, seg, q, dlse).compile()
  big = _seq_by_seq_shapes(compiled.as_text(), T)
  temp = compiled.memory_analysis().temp_size_in_bytes
  if implementation == "reference":  # the detector does see a dense program
    assert big and temp >= H * T * T * 4
  else:
    assert not big, big[:5]
    assert temp < 64 * 2**20, temp


def _scanned_grad_temp(T, remat):
  """Compiled temp bytes of the gradient through a 2-layer lax.scan of causal, document-masked
  xla attention (H=2, K=1, D=16), as the model's scan over stacked layers runs it."""
  B, H, K, D = 1, 2, 1, 16
  h = jax.ShapeDtypeStruct((B, T, H * D), jnp.float32)
  w = jax.ShapeDtypeStruct((2, H * D, H * D), jnp.float32)
  seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def loss(h, w, seg):
    def layer(h, w):
      q = (h @ w).reshape(B, T, H, D)
      kv = q[:, :, :K]
      out = ops.attention(q, kv, kv, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                          implementation="xla")
      return h + out.reshape(B, T, H * D), None
    if remat:
      layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(layer, h, w)[0].sum()

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return grad.lower(h, w, seg).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat", [False, True])
def test_grad_inside_scan_stays_linear(remat):
  """Inside a scan, scan's partial eval must not hoist per-tile masks out of the forward
  (positions are loop-invariant, q is not): that stacked [nq, nk, ..., bq, bk] residuals."""
  T = 4096
  small, large = _scanned_grad_temp(T, remat), _scanned_grad_temp(2 * T, remat)
  assert large < 2.5 * small, (small, large)
  assert large < (2 * T) ** 2, large  # a quarter of one [2T, 2T] f32 score matrix
