"""The global device mesh and the one table mapping logical axis names to mesh axes.

Axes, slowest links first: replica, data, fsdp, ring, ulysses, tensor (DESIGN.md). All six
always exist (size 1 when unused), so a PartitionSpec never depends on which are in use.
"""
import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("replica", "data", "fsdp", "ring", "ulysses", "tensor")
BATCH_AXES = ("replica", "data", "fsdp")
SEQUENCE_AXES = ("ring", "ulysses")

# Logical name -> mesh axes. Parameters and activations name their dimensions logically;
# this table alone decides where they live.
LOGICAL_RULES = {
    "batch": BATCH_AXES,
    "seq": SEQUENCE_AXES,
    "act_embed": None,     # model width of activations (batch already uses fsdp)
    # model width of parameters: ZeRO-3 over every axis whose devices see different tokens,
    # fsdp and the sequence axes (as DeepSpeed-Ulysses with ZeRO-3 and MaxText's context
    # parallelism do), so one long sequence over P chips holds 1/P of the state on each
    "embed": ("fsdp", "ring", "ulysses"),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": None,
    "norm": None,          # RMSNorm scales: small, replicated
    "layers": None,        # the stacked-blocks dimension of a level
    "islands": ("replica",),  # the outer loop's per-island copies (DiLoCo), or paths (DiPaCo)
}


def mesh_shape(mesh_config, device_count: int) -> dict:
  """Per-axis sizes with `data=-1` filled in; ValueError unless their product is the device count."""
  sizes = {axis: int(mesh_config[axis]) for axis in AXES}
  others = math.prod(size for axis, size in sizes.items() if axis != "data")
  if sizes["data"] == -1:
    if device_count % others:
      raise ValueError(f"mesh axes other than data multiply to {others}, which does not divide "
                       f"the {device_count} devices; change the mesh sizes")
    sizes["data"] = device_count // others
  if math.prod(sizes.values()) != device_count:
    raise ValueError(f"mesh sizes {sizes} multiply to {math.prod(sizes.values())} but there are "
                     f"{device_count} devices; make the product equal the device count "
                     "(or set mesh.data=-1 to fill)")
  return sizes


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The mesh over `devices`, laid on their physical topology (jax.make_mesh). An axis size that
  is no product of whole physical axes (2 on a 4x4x4 TPU slice) splits a physical axis. With
  mesh.dcn_<axis> sizes, each axis is its per-host size within a host (ICI) times its dcn size
  across hosts (processes, or TPU slices): the slow links carry only the dcn part."""
  devices = jax.devices() if devices is None else devices
  dcn = dcn_shape(mesh_config)
  types = (AxisType.Auto,) * len(AXES)
  if math.prod(dcn) > 1:
    return jax.sharding.Mesh(_hybrid_grid(mesh_config, dcn, devices), AXES, axis_types=types)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  try:
    return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
  except NotImplementedError:  # "Failed to find assignment for logical_axis_index ..."
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, AXES, axis_types=types)


def dcn_shape(mesh_config) -> tuple:
  """Per-axis sizes across hosts (1 where the config has no mesh.dcn_<axis>)."""
  return tuple(int(mesh_config.get(f"dcn_{axis}", 1)) for axis in AXES)


def _granule(device) -> int:
  """What the slow links connect: TPU slices where devices have them, else processes (hosts)."""
  return device.slice_index if _by_slice(device) else device.process_index


def _by_slice(device) -> bool:
  return device.platform == "tpu" and getattr(device, "slice_index", None) is not None


def _hybrid_grid(mesh_config, dcn, devices):
  from jax.experimental import mesh_utils
  granules = sorted({_granule(d) for d in devices})
  if math.prod(dcn) != len(granules):
    named = {f"dcn_{a}": n for a, n in zip(AXES, dcn) if n > 1}
    raise ValueError(f"mesh sizes across hosts {named} multiply to {math.prod(dcn)} but the "
                     f"{len(devices)} devices are on {len(granules)} hosts (processes or slices); "
                     "make the product of the mesh.dcn_* sizes equal the number of hosts")
  per_host = len(devices) // len(granules)
  try:
    sizes = mesh_shape(mesh_config, per_host)
  except ValueError as e:
    raise ValueError(f"per host ({per_host} devices each): {e}") from None
  return mesh_utils.create_hybrid_device_mesh(
      tuple(sizes[a] for a in AXES), dcn, devices,
      process_is_granule=not _by_slice(devices[0]),
      allow_split_physical_axes=True)


def _mesh_axes_for(name, mesh):
  """The mesh axes a logical name maps to, leaving out those of size 1 and those that are manual
  here (inside a shard_map over them, e.g. the DiLoCo islands' `replica`)."""
  axes = LOGICAL_RULES[name] if name is not None else None
  manual = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual}
  return tuple(a for a in (axes or ()) if mesh.shape[a] > 1 and a not in manual)


def logical_spec(shape, logical_axes, mesh) -> P:
  """PartitionSpec for an array whose dims carry `logical_axes`; a dim that does not divide stays whole."""
  spec = []
  for dim, name in zip(shape, logical_axes):
    axes = _mesh_axes_for(name, mesh)
    if not axes or dim % math.prod(mesh.shape[a] for a in axes):
      spec.append(None)
    else:
      spec.append(axes if len(axes) > 1 else axes[0])
  return P(*spec)


def unshardable_dims(shape, logical_axes, mesh) -> list:
  """(dimension, logical name, mesh axes) of each dim whose rule names mesh axes it cannot be
  split over (its size is not a multiple of their product)."""
  out = []
  for dim, (size, name) in enumerate(zip(shape, logical_axes)):
    axes = _mesh_axes_for(name, mesh)
    if axes and size % math.prod(mesh.shape[a] for a in axes):
      out.append((dim, name, axes))
  return out


def logical_sharding(shape, logical_axes, mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(shape, logical_axes, mesh))


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """[B, T, ...] data arrays: batch over (replica, data, fsdp), sequence over (ring, ulysses)."""
  names = ("batch", "seq") + (None,) * (ndim - 2)
  return NamedSharding(mesh, P(*[(_mesh_axes_for(n, mesh) or None) for n in names]))


def batch_divisor(mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def constrain(x, logical_axes):
  """with_sharding_constraint by logical names under the current mesh; a no-op without one.

  Inside a manual region (a DiLoCo island: shard_map over `replica`) the batch dimension is left
  to the inputs' sharding: with jax 0.10.2, XLA's SPMD partitioner fails a check
  (spmd_partitioner_util.cc, partition group sizes) on a batch constraint over fsdp there when
  the sequence is split too (tests/test_diloco.py runs that mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if AxisType.Manual in mesh.axis_types:
    logical_axes = tuple(None if name == "batch" else name for name in logical_axes)
  return jax.lax.with_sharding_constraint(x, logical_spec(x.shape, logical_axes, mesh))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(mesh) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in AXES if mesh.shape[a] > 1) or "single device"
