"""The mesh a computation runs on: the platform of its devices, and shard_map regions over all of it.

Backend choices (attention kernel, tile sizes) follow the devices a program is compiled for. In an
ahead-of-time compile for a TPU target from a CPU host, `jax.default_backend()` is "cpu" while
the mesh set by `jax.set_mesh` holds compile-only TPU devices; its abstract mesh carries their
platform, inside jit and shard_map too, so `platform()` reads it there.

Mosaic kernels cannot be partitioned by XLA: jax lowers a `tpu_custom_call` only where every mesh
axis is manual (or on one device). `manual_specs` picks the split of an attention call's arrays
for a region manual over every free axis: batch over the batch axes that divide it, heads over
`tensor` when it divides both head counts, the sequence over the axes the caller names; axes that
split nothing hold replicas. Helpers here are shared by `ops.attention` and
`ops.sequence_parallel_attention`.
"""
import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("replica", "data", "fsdp")
HEAD_AXES = ("tensor",)
_PLATFORMS = {"cuda": "gpu", "rocm": "gpu"}  # device.platform spellings -> default_backend's


def platform(mesh=None) -> str:
  """"cpu" | "gpu" | "tpu" of the devices of `mesh` (Mesh or AbstractMesh; default: the mesh set
  by `jax.set_mesh`, also inside jit); `jax.default_backend()` only when no mesh names devices."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  return platform_of(None if mesh.empty else mesh.abstract_mesh.abstract_device)


def platform_of(device) -> str:
  """"cpu" | "gpu" | "tpu" of one device (or abstract device); the default backend's for None."""
  name = jax.default_backend() if device is None else device.platform
  return _PLATFORMS.get(name, name)


def free_axes(mesh) -> tuple:
  """Mesh axes not yet manual (outside any enclosing shard_map over them)."""
  return tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual)


def names(entry) -> tuple:
  """Mesh axis names in one PartitionSpec entry."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def spec_entry(axes):
  """The PartitionSpec entry of a tuple of mesh axes (None, a name, or the tuple)."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def typed_axes(x, dim) -> tuple:
  """Explicit mesh axes that split dim `dim` of x according to its type (none under Auto)."""
  spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
  return names(spec[dim])


def batch_axes(q, mesh, exclude=(), given=None) -> tuple:
  """Mesh axes splitting the batch: `given`, else q's Explicit sharding plus the Auto batch axes
  (DESIGN's replica, data, fsdp: under Auto the sharding is not visible) that divide it."""
  B = q.shape[0]
  if given is not None:
    axes = names(given)
    bad = [a for a in axes if a not in free_axes(mesh) or a in exclude]
    if bad or B % math.prod(mesh.shape[a] for a in axes):
      raise ValueError(f"batch_axes {axes} must be free mesh axes outside the sequence axes "
                       f"{tuple(exclude)} whose sizes divide the batch {B}; got mesh "
                       f"{dict(mesh.shape)}")
    return axes
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  axes = [a for a in typed_axes(q, 0) if a not in exclude]
  n = math.prod(mesh.shape[a] for a in axes)
  for a in BATCH_AXES:
    if types.get(a) == AxisType.Auto and mesh.shape[a] > 1 and B % (n * mesh.shape[a]) == 0:
      axes.append(a)
      n *= mesh.shape[a]
  return tuple(axes)


def head_axes(q, num_kv_heads: int, mesh, exclude=(), per_device_divisor: int = 1) -> tuple:
  """Mesh axes splitting the heads of q and k/v alike: q's Explicit head sharding and the free
  `tensor` axis, if together they divide Hq and Hkv and leave Hq per device a multiple of
  `per_device_divisor` (a Ulysses degree inside); else none (the heads stay whole)."""
  free = free_axes(mesh)
  axes = [a for a in typed_axes(q, 2) if a not in exclude]
  axes += [a for a in HEAD_AXES if a in free and a not in axes and a not in exclude
           and mesh.shape[a] > 1]
  n = math.prod(mesh.shape[a] for a in axes)
  H = q.shape[2]
  if H % n or num_kv_heads % n or (H // n) % per_device_divisor:
    return ()
  return tuple(axes)


def array_spec(x, batch, seq, heads, seq_dim=1) -> P:
  """PartitionSpec of a [B, T, H, D] (or [B, T] ids) array in the manual region."""
  spec = [None] * x.ndim
  spec[0], spec[seq_dim] = spec_entry(batch), spec_entry(seq)
  if x.ndim == 4:
    spec[2] = spec_entry(heads)
  return P(*spec)


def lse_spec(batch, seq, heads) -> P:
  """PartitionSpec of an lse [B, H, T] output."""
  return P(spec_entry(batch), spec_entry(heads), spec_entry(seq))


def conform(x, mesh, spec):
  """Reshards x to `spec` on its Explicit axes (Auto axes are shard_map's to move)."""
  explicit = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
  want = tuple(spec_entry(tuple(a for a in names(e) if a in explicit)) for e in spec)
  have = tuple(spec_entry(typed_axes(x, d)) for d in range(x.ndim))
  if not explicit or want == have:
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, P(*want)))


def region(body, mesh, args, in_specs, out_specs):
  """body(*args) in a shard_map manual over every free axis of `mesh`; None args pass through.

  `check_vma` is off so that any local implementation runs inside (not every kernel types its
  values as varying over manual axes); the backward pass then sums input cotangents over the
  axes a spec leaves out, which costs an all-reduce only where such an axis has size > 1.
  """
  axes = free_axes(mesh)
  if not axes:
    return body(*args)
  in_specs = tuple(P() if x is None else s for x, s in zip(args, in_specs))
  args = [None if x is None else conform(x, mesh, s) for x, s in zip(args, in_specs)]
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names=set(axes), check_vma=False)(*args)
