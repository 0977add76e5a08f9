"""Compile targets: accelerators that this machine compiles for without having them.

`parse("tpu:v5p:2x2x2")` gives a `Target` whose `devices()` are compile-only TPU devices
(`jax.experimental.topologies`, backed by libtpu's compiler): build a mesh from them and
`jax.jit(f).lower(*shape_dtype_structs).compile()` runs the real TPU compiler (Mosaic kernels
included) with the target's memory analysis and schedule. Every platform-dependent choice in
lcjax follows the mesh's devices (`ops.manual.platform`), so such a compile picks what the
target would run. A compile proves lowering, memory and schedule only; numerics and speed need
the device. libtpu comes with `pip install -r requirements-targets.txt`.

HBM per chip, as Google Cloud's TPU pages state them (the capacity a program may allocate):
v5p 95 GiB (cloud.google.com/tpu/docs/v5p), v6e 32 GiB (.../tpu/docs/v6e), v5e 16 GiB
(.../tpu/docs/v5e), v4 32 GiB (.../tpu/docs/v4). GPU targets (`gpu:h100:8`, 80 GiB per H100 SXM,
NVIDIA's H100 datasheet; `gpu:h200:8`, 141 GB per H200, NVIDIA's H200 datasheet) need a GPU
target config for the CUDA compiler and are not built yet.
"""
import dataclasses
import functools
import importlib.util
import math
import os
import re

GiB = 1 << 30
INSTALL = 'pip install -r requirements-targets.txt  (jax[tpu]==0.10.2, libtpu 0.0.42.1)'

# kind -> (HBM bytes per chip, topology rank as libtpu names it)
TPU_KINDS = {"v5p": (95 * GiB, 3), "v6e": (32 * GiB, 2), "v5e": (16 * GiB, 2), "v4": (32 * GiB, 3)}
FORMS = ("tpu:v5p:AxBxC", "tpu:v4:AxBxC", "tpu:v6e:AxB", "tpu:v5e:AxB")


@dataclasses.dataclass(frozen=True)
class Target:
  """One compile target: `name` as given, e.g. "tpu:v5p:2x2x2"."""
  name: str
  platform: str  # "tpu"
  kind: str  # "v5p" | "v6e" | "v5e" | "v4"
  topology: tuple[int, ...]  # chips along each axis of the slice
  hbm_bytes_per_chip: int

  @property
  def chips(self) -> int:
    return math.prod(self.topology)

  @property
  def topology_name(self) -> str:
    """The name libtpu's topology description takes: "v5p:2x2x2"."""
    return f"{self.kind}:{'x'.join(map(str, self.topology))}"

  def devices(self) -> list:
    """Compile-only devices of the slice (v4 gives one per TensorCore, two per chip)."""
    return list(_topology(self.topology_name).devices)

  @property
  def hbm_bytes_per_device(self) -> int:
    """HBM per device of `devices()`: the chip's, shared by the devices on one chip."""
    return self.hbm_bytes_per_chip * self.chips // len(self.devices())


def parse(name: str) -> Target:
  """"tpu:<kind>:<topology>" -> Target; ValueError naming the valid forms otherwise."""
  m = re.fullmatch(r"tpu:(v5p|v6e|v5e|v4):(\d+(?:x\d+)*)", name.strip().lower())
  if m is None:
    hint = (" (GPU targets are not available yet)" if name.strip().lower().startswith("gpu")
            else "")
    raise ValueError(f"unknown target {name!r}{hint}; valid forms: {', '.join(FORMS)}, "
                     f"e.g. tpu:v5p:2x2x2, tpu:v6e:4x4, tpu:v5e:2x2, tpu:v4:2x2x1")
  kind, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  hbm, rank = TPU_KINDS[kind]
  if len(dims) != rank or min(dims) < 1:
    raise ValueError(f"target {name!r}: a {kind} topology has {rank} positive dimensions "
                     f"({'x'.join('ABC'[:rank])}), e.g. tpu:{kind}:{'x'.join(['2'] * rank)}")
  return Target(name=name, platform="tpu", kind=kind, topology=dims, hbm_bytes_per_chip=hbm)


def have_tpu_compiler() -> bool:
  """Whether libtpu (the TPU compiler behind compile-only devices) is installed."""
  return importlib.util.find_spec("libtpu") is not None


@functools.lru_cache(maxsize=None)
def _topology(topology_name: str):
  if not have_tpu_compiler():
    raise ImportError(f"compiling for TPU target {topology_name!r} needs libtpu, which is not "
                      f"installed; run: {INSTALL}")
  if "tpu" not in os.environ.get("JAX_PLATFORMS", "tpu"):
    # this process drives no TPU chip, only the compiler: let several such processes (pytest
    # workers) load libtpu, which otherwise fails "accessing libtpu multi-process lockfile"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return topologies.get_topology_desc(topology_name=topology_name, platform="tpu")
