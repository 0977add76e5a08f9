"""`ops.sequence_parallel_attention`: attention over a sequence sharded on (ring, ulysses) mesh axes.

Strategies (USP, arXiv 2405.07719; the mesh has R ring and U Ulysses devices):
- `usp`: Ulysses all-to-all over `ulysses` (sequence split -> head split), then ring attention
  over `ring` on the ring chunk, then the all-to-all back. 1xU is pure Ulysses, Rx1 pure ring.
- `ulysses`: one all-to-all over both axes (R*U-way head split); needs Hq % (R*U) == 0.
- `ring`: one ring over all R*U devices, ring-major.
- `allgather`: gather K/V (and their positions/segments) over both axes, attend local queries
  (Llama 3 context parallelism); wins at short local sequences.

`shard_map` is manual over every free mesh axis (`manual.region`), as Mosaic kernels require
(they cannot be partitioned automatically): the sequence over the sequence axes, the batch over
the batch axes that divide it (replica/data/fsdp, see `manual.batch_axes`), heads over `tensor`
when it divides both head counts and leaves a multiple of the Ulysses degree; the body works on
plain local arrays and is replicated over any remaining axis. A region manual over the sequence
axes only is what one would write first, but on jax 0.10 the partitioner then gathers the batch
inside it and lowers the Ulysses all-to-all to all-gathers, and a Mosaic kernel inside it fails
to lower. Meshes whose axes are Auto or Explicit both work: inputs are resharded to the in_specs
first where the axis types demand it.

With implementation "cudnn" (index masks only): the local attention must see its sequence in
global order, so after a Ulysses all-to-all in the zigzag layout the sequence is unzipped even
without a ring; positions must be the layout's defaults and segment ids absent; all-gather and
ring windows are refused (`cudnn_attention.check_sequence_parallel`).
"""
import math

import jax
import jax.numpy as jnp

from lcjax.ops import cost_model, cudnn_attention, layouts, manual, ulysses
from lcjax.ops.attention import attention
from lcjax.ops.ring import RingSpec, ring_attention

STRATEGIES = ("usp", "ulysses", "ring", "allgather")


def check_sequence_parallel(num_heads: int, num_kv_heads: int, seq_len: int, *, ring_size: int,
                            ulysses_size: int, strategy: str, layout: str) -> None:
  """Raises ValueError, naming the numbers and the fix, for an invalid split (config time)."""
  if strategy not in STRATEGIES + ("auto",):
    raise ValueError(f"unknown sequence-parallel strategy {strategy!r}; choose one of "
                     f"{STRATEGIES + ('auto',)}")
  layouts.check_sequence_split(seq_len, ring_size, ulysses_size, layout)
  if num_kv_heads < 1 or num_heads % num_kv_heads:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
  degree = {"usp": ulysses_size, "ulysses": ring_size * ulysses_size}.get(strategy, 1)
  if degree > 1:
    ulysses.kv_head_repeats(num_heads, num_kv_heads, degree)


def _local_attention(strategy, layout, R, U, ring_axis, ulysses_axis, seq_len, return_lse, kw):
  """The shard_map body: local shards in, local shards out."""
  seq_axes = tuple(a for a, n in ((ring_axis, R), (ulysses_axis, U)) if n > 1)
  uly_axes, ring_axes = {"usp": ((ulysses_axis,) if U > 1 else (), (ring_axis,) if R > 1 else ()),
                         "ulysses": (seq_axes, ()), "ring": ((), seq_axes),
                         "allgather": ((), ())}[strategy]
  degree = math.prod(R if a == ring_axis else U for a in uly_axes)  # Ulysses head split
  cudnn = kw["implementation"] == "cudnn"
  unzip = U if layout == "zigzag" and uly_axes and ring_axes else 1
  if cudnn and layout == "zigzag" and uly_axes and not ring_axes:  # into global order
    unzip = degree

  def body(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    if strategy == "allgather":
      gather = lambda x: x if x is None or not seq_axes else jax.lax.all_gather(
          x, seq_axes, axis=1, tiled=True)
      return attention(q, gather(k), gather(v), q_positions=q_pos, kv_positions=gather(kv_pos),
                       q_segment_ids=q_seg, kv_segment_ids=gather(kv_seg), return_lse=return_lse,
                       **kw)
    if uly_axes:
      f = ulysses.kv_head_repeats(q.shape[2], k.shape[2], degree)
      if f > 1:  # Hkv < degree: repeat each kv head the fewest times that splits evenly
        k, v = jnp.repeat(k, f, axis=2), jnp.repeat(v, f, axis=2)
      q, k, v = (layouts.unzip_halves(ulysses.scatter_heads(x, uly_axes), unzip) for x in (q, k, v))
      q_pos, kv_pos, q_seg, kv_seg = (
          None if x is None else layouts.unzip_halves(ulysses.gather_sequence(x, uly_axes), unzip)
          for x in (q_pos, kv_pos, q_seg, kv_seg))
    if ring_axes:
      starts, half = layouts.ring_block_starts(seq_len, R, U, layout, ring_over_ulysses=not uly_axes)
      if layout == "contiguous" or not (kw["causal"] or kw["sliding_window"]):
        starts, half = starts[:, :1], half * starts.shape[1]  # nothing to skip below a whole chunk
      spec = RingSpec(axes=ring_axes, starts=tuple(map(tuple, starts.tolist())), half_len=half,
                      **kw)
      out, lse = ring_attention(q, k, v, (q_pos, q_seg), (kv_pos, kv_seg), spec)
    elif cudnn:  # the (sub)sequence in global order: positions are the token indices
      out, lse = attention(q, k, v, return_lse=True, **kw)
    else:
      out, lse = attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                           kv_segment_ids=kv_seg, return_lse=True, **kw)
    out = ulysses.gather_heads(layouts.zip_halves(out, unzip), uly_axes) if uly_axes else out
    if not return_lse:
      return out
    lse = ulysses.gather_heads_lse(layouts.zip_halves(lse, unzip, axis=2), uly_axes) \
        if uly_axes else lse
    return out, lse

  return body


def sequence_parallel_attention(q, k, v, *, mesh, strategy="usp", layout="zigzag",
                                ring_axis="ring", ulysses_axis="ulysses", causal=False,
                                q_segment_ids=None, kv_segment_ids=None, q_positions=None,
                                kv_positions=None, sliding_window=None, softcap=None, scale=None,
                                return_lse=False, implementation="auto", batch_axes=None):
  """Attention with the sequence split over the `ring` x `ulysses` mesh axes (DESIGN.md API).

  q [B, S, Hq, D], k, v [B, S, Hkv, D]: global arrays in stored order (`sequence_layout`), the
  sequence axis sharded over (ring_axis, ulysses_axis); the batch may be sharded over other axes.
  Positions default to the layout's global positions; pass them explicitly when they differ
  (e.g. restarting per document, with segment ids). Returns out like q (and lse [B, Hq, S]).
  `batch_axes`: mesh axes splitting the batch; by default read from q's Explicit sharding, and
  under Auto axes assumed to be those of ("replica", "data", "fsdp") in the mesh that divide B.
  `strategy="auto"` asks `cost_model.choose_strategy` (H100 topology) for this mesh and shape.
  """
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"expected q [B, S, Hq, D] and k, v [B, S, Hkv, D]; got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  B, S, H, _ = q.shape
  if k.shape[:2] != (B, S):
    raise ValueError(f"sequence_parallel_attention is self-attention over one sharded sequence: "
                     f"q and k/v must share batch and length; got q {q.shape}, k {k.shape}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  if (q_positions is None) != (kv_positions is None):
    raise ValueError("pass both q_positions and kv_positions, or neither")
  for name, x in (("q_positions", q_positions), ("kv_positions", kv_positions),
                  ("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
    if x is not None and x.shape != (B, S):
      raise ValueError(f"{name} must have shape (B, S) = {(B, S)}; got {x.shape}")
  R, U = mesh.shape.get(ring_axis, 1), mesh.shape.get(ulysses_axis, 1)
  if strategy == "auto":
    strategy = cost_model.choose_strategy(
        cost_model.AttentionShape(batch=B, seq_len=S, num_heads=H, num_kv_heads=k.shape[2],
                                  head_dim=q.shape[3], bytes_per_element=q.dtype.itemsize,
                                  causal=causal),
        ring_size=R, ulysses_size=U).strategy
  check_sequence_parallel(H, k.shape[2], S, ring_size=R, ulysses_size=U, strategy=strategy,
                          layout=layout)
  if implementation == "cudnn":
    cudnn_attention.check_platform(manual.platform(mesh))
    ring = (strategy == "ring" and R * U > 1) or (strategy == "usp" and R > 1)
    cudnn_attention.check_sequence_parallel(
        strategy, q.shape[3], q.dtype, ring=ring, causal=causal, sliding_window=sliding_window,
        softcap=softcap, segments=q_segment_ids is not None, positions=q_positions is not None)
  kw = dict(causal=causal, sliding_window=sliding_window, softcap=softcap, scale=scale,
            implementation=implementation)
  if q_positions is None:
    perm = jnp.asarray(layouts.sequence_layout(S, R, U, layout))
    q_positions = kv_positions = jnp.broadcast_to(perm, (B, S))
  body = _local_attention(strategy, layout, R, U, ring_axis, ulysses_axis, S, return_lse, kw)
  # specs name every sequence axis of the mesh, size 1 or not, so the output's sharding type
  # is the input's; the collectives run over the axes of size > 1 only
  seq_axes = tuple(a for a in (ring_axis, ulysses_axis) if a in mesh.axis_names)
  batch = manual.batch_axes(q, mesh, seq_axes, batch_axes)
  degree = {"usp": U, "ulysses": R * U}.get(strategy, 1)  # the local heads split this far inside
  heads = manual.head_axes(q, k.shape[2], mesh, batch + seq_axes, per_device_divisor=degree)
  args = (q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  in_specs = tuple(None if x is None else manual.array_spec(x, batch, seq_axes, heads)
                   for x in args)
  out_spec = in_specs[0]
  return manual.region(body, mesh, args, in_specs,
                       (out_spec, manual.lse_spec(batch, seq_axes, heads)) if return_lse
                       else out_spec)
