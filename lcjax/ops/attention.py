"""`ops.attention`: the one local attention entry point; validates, fills defaults, dispatches."""
import jax
import jax.numpy as jnp
import numpy as np

from lcjax.ops import cudnn_attention, manual
from lcjax.ops.blockwise import blockwise_attention
from lcjax.ops.pallas_attention import pallas_attention
from lcjax.ops.reference import reference_attention

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas", "pallas_interpret", "cudnn")


def _check_and_fill(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                    sliding_window, softcap, scale):
  """Raises ValueError on inputs a user can get wrong; returns filled positions/segments."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D]; got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  B, Tq, H, D = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
  if k.shape[0] != B or k.shape[3] != D:
    raise ValueError(f"k/v batch and head dim must match q's ({B}, {D}); got k {k.shape}")
  K = k.shape[2]
  if K == 0 or H % K:
    raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K}) for GQA/MQA; "
                     f"choose num_kv_heads dividing num_heads")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating dtype; got {x.dtype}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  if sliding_window is not None and (not isinstance(sliding_window, (int, np.integer))
                                     or sliding_window < 1):
    raise ValueError(f"sliding_window must be a Python int >= 1 (or None for no window); "
                     f"got {sliding_window!r}")
  if softcap is not None and not (isinstance(softcap, (int, float, np.number)) and softcap > 0):
    raise ValueError(f"softcap must be a Python number > 0 (or None); got {softcap!r}")
  if scale is not None and not isinstance(scale, (int, float, np.number)):
    raise ValueError(f"scale must be a Python number (or None for D ** -0.5); got {scale!r}")
  Tk = k.shape[1]
  if Tq == 0 or Tk == 0:
    raise ValueError(f"attention needs at least one query and one key; got Tq={Tq}, Tk={Tk}")
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(Tq, dtype=jnp.int32), (B, Tq))
  if kv_positions is None:
    kv_positions = jnp.broadcast_to(jnp.arange(Tk, dtype=jnp.int32), (B, Tk))
  for name, x, T in (("q_positions", q_positions, Tq), ("kv_positions", kv_positions, Tk),
                     ("q_segment_ids", q_segment_ids, Tq), ("kv_segment_ids", kv_segment_ids, Tk)):
    if x is not None and x.shape != (B, T):
      raise ValueError(f"{name} must have shape (B, T) = {(B, T)}; got {x.shape}")
    if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must have an integer dtype; got {x.dtype}")
  return q_positions, kv_positions


def resolve_implementation(implementation: str, platform: str | None = None) -> str:
  """"auto" and "pallas" -> what runs on `platform`: "reference" | "xla" | "pallas" |
  "pallas_interpret" | "cudnn".

  `platform` defaults to that of the mesh the computation runs on (`manual.platform`: the
  devices it is compiled for, not the host). "auto" takes the fastest tested path: the Mosaic
  kernel on TPU, blockwise XLA elsewhere (cuDNN's numerics are not yet checked on a GPU, see
  docs/gpu_attention.md). "pallas" is the TPU kernel, interpreted on CPU; "cudnn" needs a GPU.
  """
  platform = manual.platform() if platform is None else platform
  if implementation == "cudnn":
    cudnn_attention.check_platform(platform)
  if implementation == "auto":
    return "pallas" if platform == "tpu" else "xla"
  if implementation == "pallas" and platform != "tpu":
    if platform != "cpu":
      raise ValueError(f"implementation='pallas' has no tested kernel for platform {platform!r}; "
                       f"use 'xla', or 'pallas_interpret' to run the TPU kernel interpreted")
    return "pallas_interpret"
  return implementation


def _mosaic_in_manual_region(q, k, v, *, q_positions, kv_positions, q_segment_ids,
                             kv_segment_ids, local=pallas_attention, **kwargs):
  """`local` (the Mosaic or cuDNN kernel) on each device's block, in a shard_map manual over
  every free mesh axis (Mosaic kernels cannot be partitioned, cuDNN's not over the sequence):
  batch over the batch axes that divide it, heads over `tensor` when it divides Hq and Hkv, the
  sequence whole. Returns (out, lse)."""
  mesh = jax.sharding.get_abstract_mesh()
  batch = manual.batch_axes(q, mesh)
  heads = manual.head_axes(q, k.shape[2], mesh, exclude=batch)
  args = (q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  specs = tuple(None if x is None else manual.array_spec(x, batch, (), heads) for x in args)

  def body(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return local(q, k, v, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                 kv_segment_ids=kv_seg, **kwargs)

  return manual.region(body, mesh, args, specs, (specs[0], manual.lse_spec(batch, (), heads)))


def _cudnn_local(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, **kwargs):
  assert q_positions is kv_positions is q_segment_ids is kv_segment_ids is None
  return cudnn_attention.cudnn_attention(q, k, v, **kwargs)


def attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
              q_positions=None, kv_positions=None, sliding_window=None, softcap=None,
              scale=None, return_lse=False, implementation="auto"):
  """Softmax attention over [B, T, H, D] arrays with lcjax's masking semantics (DESIGN.md).

  Returns out [B, Tq, Hq, D] in q.dtype and, with return_lse, lse [B, Hq, Tq] float32 (natural log).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"choose one of {IMPLEMENTATIONS}")
  implementation = resolve_implementation(implementation)
  positions_given = q_positions is not None or kv_positions is not None
  q_positions, kv_positions = _check_and_fill(q, k, v, q_segment_ids, kv_segment_ids,
                                              q_positions, kv_positions, sliding_window, softcap,
                                              scale)
  if implementation == "cudnn":
    cudnn_attention.check(q.shape[-1], q.dtype, causal=causal, sliding_window=sliding_window,
                          softcap=softcap, segments=q_segment_ids is not None,
                          positions=positions_given)
  kwargs = dict(causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                q_positions=q_positions, kv_positions=kv_positions, sliding_window=sliding_window,
                softcap=None if softcap is None else float(softcap),
                scale=q.shape[-1] ** -0.5 if scale is None else float(scale))
  if implementation == "reference":
    return reference_attention(q, k, v, return_lse=return_lse, **kwargs)
  if implementation == "xla":
    out, lse = blockwise_attention(q, k, v, **kwargs)
  elif implementation == "pallas_interpret":
    out, lse = pallas_attention(q, k, v, interpret=True, **kwargs)
  elif implementation == "cudnn":  # index masks only (checked above); partitioned like Mosaic
    out, lse = _mosaic_in_manual_region(
        q, k, v, q_positions=None, kv_positions=None, q_segment_ids=None, kv_segment_ids=None,
        local=_cudnn_local, causal=causal, sliding_window=sliding_window, scale=kwargs["scale"])
  else:  # the Mosaic kernel: in a shard_map over every free mesh axis (a no-op without a mesh)
    out, lse = _mosaic_in_manual_region(q, k, v, interpret=False, **kwargs)
  return (out, lse) if return_lse else out
