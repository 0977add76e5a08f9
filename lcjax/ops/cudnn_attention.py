"""cuDNN's fused flash attention as an lcjax kernel: the masks it takes, its LSE, exact gradients.

jax 0.10.2 reaches cuDNN's fused attention (custom calls `__cudnn$fmhaSoftmax` and
`__cudnn$fmhaSoftmaxBackward`) through `jax._src.cudnn.fused_attention_stablehlo`, the module
behind `jax.nn.dot_product_attention(implementation="cudnn")`. Its masks are by token index:
  no mask; causal, key j <= query i (top-left aligned); a causal window w, i - w < j <= i;
  GQA/MQA without repeating K/V.
lcjax's semantics (DESIGN.md) map onto these when positions are the token indices (the
defaults) and there are no segment ids. The rest is refused by `check` with one line naming the
fix: softcap (no such option), segment ids (jax packs documents for cuDNN only as offset tables
with a static maximum count per row, traced only on a Hopper host and with kv offsets scaled by
the query head count, wrong for GQA, in 0.10.2 and 0.11.0), explicit positions, a window without
causality (cuDNN's window is causal), float32 (cuDNN takes bf16/fp16), head dims that are not a
multiple of 8 or exceed 128 (256 on Hopper), and devices that are not GPUs.

LSE. `jax.nn.dot_product_attention(..., return_residual=True)` casts cuDNN's softmax statistics
to the output dtype (bf16: too coarse for ring merges) and its backward drops their cotangent.
The statistics themselves are float32 lse [B, H, T], the natural log of the sum of exp of the
scaled scores, as `fused_attention_stablehlo.dot_product_attention(return_residual=True)` returns
them. This module calls that for the forward pass and has its own `custom_vjp`, whose backward
calls cuDNN's backward kernel (the private `_dot_product_attention_bwd_p_wrapper`) with the saved
out and lse. The kernel computes dS = P (dP - D) with D = rowsum(dO * O) (FlashAttention-2,
Alg. 2); an lse cotangent g adds P g, that is D -> D - g. The kernel reads D only through O and
dO, so g enters through EXTRA more head-dim columns, O' = [O, -g_hi, -g_lo, 0..] and
dO' = [dO, 1, 1, 0..] (g split into two bf16 parts), with q, k, v zero-padded so that the scores
and dP do not change; the extra columns of the gradients are dropped. Without an lse cotangent
(a symbolic zero: the caller did not use the lse) the kernel runs on the plain head dim.

`block_grads` is the same kernel fed a ring's merged out and lse instead of the block's own: the
exact gradients of one block pair of ring attention without recomputing its forward pass
(FlashAttention-2's backward over key blocks, as ring-flash-attention does it).
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as fas
from jax.custom_derivatives import SymbolicZero

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
PLATFORMS = ("gpu",)
EXTRA = 8  # head-dim columns that carry an lse cotangent into the backward kernel
MAX_HEAD_DIM, MAX_HEAD_DIM_HOPPER = 128, 256
_HOPPER_OR_LATER = re.compile(r"\b(G?H\d{2,3}|G?B\d{3})\b")  # H100, H200, GH200, H20, B200, ...


def check_platform(platform: str) -> None:
  if platform not in PLATFORMS:
    raise ValueError(f"implementation='cudnn' needs a GPU: this program is compiled for "
                     f"{platform!r} devices; compile for a GPU target (--target=gpu:h100:8) or "
                     f"use implementation='xla'")


def device_kind() -> str:
  """The device kind of the mesh set by `jax.set_mesh` (else of the local devices)."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_mesh.abstract_device
  return jax.devices()[0].device_kind if device is None else device.device_kind


def max_head_dim(kind: str | None = None) -> int:
  """cuDNN's largest head dim on devices of `kind` (default: those compiled for)."""
  hopper = _HOPPER_OR_LATER.search(device_kind() if kind is None else kind)
  return MAX_HEAD_DIM_HOPPER if hopper else MAX_HEAD_DIM


def check_ids(*, segments: bool, positions: bool) -> None:
  """Refuses segment ids and explicit positions (cuDNN masks by token index)."""
  if segments:
    raise ValueError("implementation='cudnn' takes no segment ids (jax 0.10.2 packs documents "
                     "for cuDNN only as offset tables with a static count, on a Hopper host, "
                     "wrong for GQA); drop them (model.document_mask=False) or use "
                     "implementation='xla'")
  if positions:
    raise ValueError("implementation='cudnn' masks by token index and takes no positions; pass "
                     "q_positions=kv_positions=None (0..T-1) or use implementation='xla'")


def check(head_dim: int, dtype, *, causal: bool, sliding_window, softcap, segments: bool,
          positions: bool, extra_columns: int = 0) -> None:
  """Raises a one-line ValueError for what cuDNN's attention cannot do (see the module doc)."""
  if softcap is not None:
    raise ValueError("implementation='cudnn' has no softcap (cuDNN's attention in jax takes no "
                     "logit soft-capping); set softcap=None or use implementation='xla'")
  check_ids(segments=segments, positions=positions)
  if sliding_window is not None and not causal:
    raise ValueError(f"cuDNN's sliding window is causal (keys i - w < j <= i); with "
                     f"sliding_window={sliding_window} set causal=True, or use "
                     f"implementation='xla'")
  if jnp.dtype(dtype) not in DTYPES:
    raise ValueError(f"implementation='cudnn' takes bfloat16 or float16 q/k/v, got {dtype}; "
                     f"cast them (model.dtype='bfloat16') or use implementation='xla'")
  limit = max_head_dim() - extra_columns
  if head_dim % 8 or head_dim > limit:
    raise ValueError(f"implementation='cudnn' needs a head dim that is a multiple of 8 and at "
                     f"most {limit} on {device_kind()}, got {head_dim}; change model.head_dim "
                     f"or use implementation='xla'")


def check_sequence_parallel(strategy: str, head_dim: int, dtype, *, ring: bool, causal: bool,
                            sliding_window, softcap, segments: bool, positions: bool) -> None:
  """`check`, and the sequence-parallel cases the cuDNN kernel cannot serve; `ring`: whether a
  ring runs (its backward passes an lse cotangent, EXTRA more head-dim columns)."""
  check(head_dim, dtype, causal=causal, sliding_window=sliding_window, softcap=softcap,
        segments=segments, positions=positions, extra_columns=EXTRA if ring else 0)
  if strategy in ("allgather", "auto"):
    what = "may choose all-gather, which" if strategy == "auto" else "all-gather"
    raise ValueError(f"sp.strategy={strategy!r} with implementation='cudnn': {what} attends "
                     f"local queries at a global offset, which cuDNN's index masks cannot "
                     f"express; choose strategy 'usp', 'ulysses' or 'ring'")
  if ring and sliding_window is not None:
    raise ValueError("ring attention with implementation='cudnn' cannot window its off-diagonal "
                     "blocks (cuDNN's window is anchored at each block's diagonal); use "
                     "strategy 'ulysses', no sliding window, or implementation='xla'")


@dataclasses.dataclass(frozen=True)
class _Mask:
  causal: bool
  window: int | None
  scale: float

  @property
  def mask_type(self):
    return fas.MaskType.CAUSAL if self.causal else fas.MaskType.NO_MASK


def _forward_kernel(m: _Mask, q, k, v):
  """cuDNN's forward: (out [B, T, H, D] in q.dtype, lse [B, H, T] float32)."""
  try:
    out, lse = fas.dot_product_attention(q, k, v, scale=m.scale, mask_type=m.mask_type,
                                         sliding_window_length=m.window, return_residual=True)
  except NotImplementedError as e:  # jax's own shape checks, against the local device
    raise ValueError(f"cuDNN attention refused q {q.shape} {q.dtype}, k {k.shape}: {e}; use "
                     f"implementation='xla'") from None
  return out, lse


def _backward_kernel(m: _Mask, q, k, v, out, lse, dout):
  """cuDNN's backward from the given out, lse and dout: (dq, dk, dv) in q.dtype."""
  unused = jnp.zeros(0, q.dtype)  # bias, sequence lengths, offsets, page tables
  return fas._dot_product_attention_bwd_p_wrapper.bind(
      q, k, v, *(unused,) * 7, lse, out, dout.astype(q.dtype), scale=m.scale, seed=0,
      dropout_rate=0.0, variadic_args=(False, False), mask_type=m.mask_type,
      layout=fas.AttentionLayout.BTNH.value, sliding_window_length=m.window)


def _grads(m: _Mask, q, k, v, out, lse, dout, dlse):
  """(dq, dk, dv) for cotangents dout and dlse (None: no lse cotangent), from out and lse."""
  if dlse is None:
    return tuple(_backward_kernel(m, q, k, v, out, lse, dout))
  D = q.shape[-1]
  g = jnp.swapaxes(dlse.astype(jnp.float32), 1, 2)[..., None]  # [B, T, H, 1]
  g_hi = g.astype(q.dtype)
  g_lo = (g - g_hi.astype(jnp.float32)).astype(q.dtype)
  zeros = jnp.zeros(out.shape[:-1] + (EXTRA - 2,), q.dtype)
  out_x = jnp.concatenate([out.astype(q.dtype), -g_hi, -g_lo, zeros], axis=-1)
  ones = jnp.ones_like(g_hi)
  dout_x = jnp.concatenate([dout.astype(q.dtype), ones, ones, zeros], axis=-1)
  pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, EXTRA)])
  grads = _backward_kernel(m, pad(q), pad(k), pad(v), out_x, lse, dout_x)
  return tuple(x[..., :D] for x in grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(m: _Mask, q, k, v):
  return _forward_kernel(m, q, k, v)


def _attention_fwd(m: _Mask, q, k, v):
  q, k, v = q.value, k.value, v.value  # symbolic_zeros: primals come wrapped
  out, lse = _forward_kernel(m, q, k, v)
  return (out, lse), (q, k, v, out, lse)


def _attention_bwd(m: _Mask, res, cotangents):
  q, k, v, out, lse = res
  dout, dlse = cotangents
  if isinstance(dout, SymbolicZero):
    dout = jnp.zeros_like(out)
  if not isinstance(dlse, SymbolicZero):
    check(q.shape[-1], q.dtype, causal=m.causal, sliding_window=m.window, softcap=None,
          segments=False, positions=False, extra_columns=EXTRA)
  return _grads(m, q, k, v, out, lse, dout, None if isinstance(dlse, SymbolicZero) else dlse)


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def cudnn_attention(q_BTHD, k_BTKD, v_BTKD, *, causal=False, sliding_window=None, scale=None):
  """cuDNN attention with lcjax's index masks: (out [B, T, H, D] in q.dtype, lse [B, H, T]
  float32). Differentiable in q, k, v, through out and lse. Inputs checked by `check`."""
  scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
  return _attention(_Mask(bool(causal), sliding_window, scale), q_BTHD, k_BTKD, v_BTKD)


def block_forward(q_BTHD, k_BTKD, v_BTKD, *, causal, scale):
  """One ring block pair: (out float32, lse float32) from cuDNN's forward (no autodiff: the
  ring's own backward calls `block_grads`)."""
  out, lse = _forward_kernel(_Mask(causal, None, scale), q_BTHD, k_BTKD, v_BTKD)
  return out.astype(jnp.float32), lse


def block_grads(q_BTHD, k_BTKD, v_BTKD, out_BTHD, lse_BHT, dout_BTHD, dlse_BHT, *, causal, scale):
  """(dq, dk, dv) float32 of one ring block pair from the ring's merged out and lse and their
  cotangents: cuDNN's backward kernel with the global softmax statistics."""
  m = _Mask(causal, None, scale)
  grads = _grads(m, q_BTHD, k_BTKD, v_BTKD, out_BTHD, lse_BHT, dout_BTHD, dlse_BHT)
  return tuple(g.astype(jnp.float32) for g in grads)
