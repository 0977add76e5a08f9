"""Compile targets: accelerators that this machine compiles for without having them.

`parse("tpu:v5p:2x2x2")` or `parse("gpu:h100:8")` gives a `Target` whose `devices()` are
compile-only devices (`jax.experimental.topologies`, backed by libtpu's compiler or the CUDA
plugin's): build a mesh from them and `jax.jit(f).lower(*shape_dtype_structs).compile()` runs the
real TPU or GPU compiler (Mosaic kernels and cuDNN fusions included) with the target's memory
analysis and schedule. Every platform-dependent choice in lcjax follows the mesh's devices
(`ops.manual.platform`), so such a compile picks what the target would run. A compile proves
lowering, memory and schedule only; numerics and speed need the device. The compilers come with
`pip install -r requirements-targets.txt`.

Memory per chip (the capacity a program may allocate) and dense bf16 peak per chip:
- TPU, as Google Cloud's TPU pages state them (cloud.google.com/tpu/docs/<kind>): v5p 95 GiB,
  459 TFLOP/s; v6e 32 GiB, 918 TFLOP/s; v5e 16 GiB, 197 TFLOP/s; v4 32 GiB, 275 TFLOP/s.
- GPU: the device memory of the shipped target config (lcjax/target_configs/*.txtpb, each
  naming its sources): H100 SXM 81559 MiB, H200 143771 MiB; 989 TFLOP/s for both (NVIDIA's
  datasheets, dense). JAX's GPU allocator takes 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION
  says more; plans here count the whole memory, as a training run sets the fraction near 1.
"""
import dataclasses
import functools
import importlib.util
import math
import os
import pathlib
import re

GiB = 1 << 30
MiB = 1 << 20
INSTALL = ('pip install -r requirements-targets.txt  (jax[tpu] and jax[cuda12] 0.10.2, '
           'libtpu 0.0.42.1)')
CONFIGS = pathlib.Path(__file__).parent / "target_configs"


@dataclasses.dataclass(frozen=True)
class Kind:
  platform: str            # "tpu" | "gpu"
  hbm_bytes_per_chip: int
  peak_flops_per_chip: float  # dense bf16
  link_gbytes_s: float     # chip-to-chip (TPU ICI, GPU NVLink), GB/s per chip and direction
  host_gbytes_s: float     # chip <-> host memory, GB/s per chip and direction
  rank: int = 0            # TPU: dimensions of the slice's topology
  config_file: str = ""    # GPU: the target config text proto in target_configs/


# Links, for the planner's cost model: TPU ICI per chip as the Cloud TPU pages state it, halved
# for one direction (v5p 4800 Gb/s, v6e 3584, v5e 1600, v4 2400); NVLink 4 900 GB/s both ways;
# host links are assumed, as no vendor states them per chip: PCIe 5.0 x16 at about 50 GB/s
# achieved for the GPUs, 32 GB/s for TPU hosts.
KINDS = {
    "v5p": Kind("tpu", 95 * GiB, 459e12, 300.0, 32.0, rank=3),
    "v6e": Kind("tpu", 32 * GiB, 918e12, 224.0, 32.0, rank=2),
    "v5e": Kind("tpu", 16 * GiB, 197e12, 100.0, 32.0, rank=2),
    "v4": Kind("tpu", 32 * GiB, 275e12, 150.0, 32.0, rank=3),
    "h100": Kind("gpu", 81559 * MiB, 989e12, 450.0, 50.0, config_file="h100_sxm.txtpb"),
    "h200": Kind("gpu", 143771 * MiB, 989e12, 450.0, 50.0, config_file="h200_sxm.txtpb"),
}
GPU_NETWORK_GBYTES_S = 50.0  # between GPU hosts: one 400 Gb/s NIC per GPU
FORMS = ("tpu:v5p:AxBxC", "tpu:v4:AxBxC", "tpu:v6e:AxB", "tpu:v5e:AxB", "gpu:h100:N",
         "gpu:h200:N", "gpu:h100:HOSTSxN")
EXAMPLES = "e.g. tpu:v5p:2x2x2, tpu:v6e:4x4, gpu:h100:8, gpu:h200:2x8"


@dataclasses.dataclass(frozen=True)
class Target:
  """One compile target: `name` as given, e.g. "tpu:v5p:2x2x2" or "gpu:h100:8"."""
  name: str
  platform: str  # "tpu" | "gpu"
  kind: str  # a key of KINDS
  topology: tuple[int, ...]  # TPU: chips along each axis of the slice; GPU: (hosts, GPUs per host)

  @property
  def spec(self) -> Kind:
    return KINDS[self.kind]

  @property
  def hbm_bytes_per_chip(self) -> int:
    return self.spec.hbm_bytes_per_chip

  @property
  def peak_flops_per_chip(self) -> float:
    return self.spec.peak_flops_per_chip

  @property
  def chips(self) -> int:
    return math.prod(self.topology)

  @property
  def topology_name(self) -> str:
    """The topology the compiler's description takes: "v5p:2x2x2" (libtpu), or "1x2x8"
    (CUDA: partitions x hosts x GPUs per host)."""
    if self.platform == "tpu":
      return f"{self.kind}:{'x'.join(map(str, self.topology))}"
    return f"1x{self.topology[0]}x{self.topology[1]}"

  def devices(self) -> list:
    """Compile-only devices of the target (v4 gives one per TensorCore, two per chip)."""
    if self.platform == "tpu":
      return list(_tpu_topology(self.topology_name).devices)
    return list(_gpu_topology(self.topology_name, self.spec.config_file).devices)

  @property
  def hbm_bytes_per_device(self) -> int:
    """Memory per device of `devices()`: the chip's, shared by the devices on one chip."""
    return self.hbm_bytes_per_chip * self.chips // len(self.devices())

  def cost_topology(self):
    """The target's links and compute for `ops.cost_model` (and the planner)."""
    from lcjax.ops import cost_model
    per_host = self.topology[1] if self.platform == "gpu" else self.chips  # a TPU slice: all ICI
    return cost_model.Topology(
        name=self.name, devices_per_node=per_host, intra_node_gbytes_s=self.spec.link_gbytes_s,
        inter_node_gbytes_s=GPU_NETWORK_GBYTES_S if self.platform == "gpu" else
        self.spec.link_gbytes_s, peak_tflops=self.peak_flops_per_chip / 1e12)

  def describe(self) -> dict:
    """The target's figures for a start record."""
    return {"compile/target": self.name, "compile/target_chips": self.chips,
            "compile/target_hbm_bytes_per_device": self.hbm_bytes_per_device,
            "compile/target_peak_flops_per_chip": self.peak_flops_per_chip}


def parse(name: str) -> Target:
  """"tpu:<kind>:<topology>" or "gpu:<kind>:[HOSTSx]N" -> Target; ValueError naming the valid
  forms otherwise."""
  text = name.strip().lower()
  m = re.fullmatch(r"(tpu|gpu):([a-z0-9]+):(\d+(?:x\d+)*)", text)
  kind = KINDS.get(m.group(2)) if m else None
  if kind is None or kind.platform != m.group(1):
    raise ValueError(f"unknown target {name!r}; valid forms: {', '.join(FORMS)}, {EXAMPLES}")
  platform, kind_name = m.group(1), m.group(2)
  dims = tuple(int(d) for d in m.group(3).split("x"))
  if min(dims) < 1:
    raise ValueError(f"target {name!r}: every dimension must be at least 1, {EXAMPLES}")
  if platform == "tpu" and len(dims) != kind.rank:
    raise ValueError(f"target {name!r}: a {kind_name} topology has {kind.rank} positive "
                     f"dimensions ({'x'.join('ABC'[:kind.rank])}), e.g. "
                     f"tpu:{kind_name}:{'x'.join(['2'] * kind.rank)}")
  if platform == "gpu":
    if len(dims) > 2:
      raise ValueError(f"target {name!r}: a GPU target is gpu:{kind_name}:N (N GPUs on one host) "
                       f"or gpu:{kind_name}:HOSTSxN (N GPUs on each of HOSTS hosts)")
    dims = (1,) + dims if len(dims) == 1 else dims
  return Target(name=name, platform=platform, kind=kind_name, topology=dims)


def have_tpu_compiler() -> bool:
  """Whether libtpu (the TPU compiler behind compile-only TPU devices) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def have_gpu_compiler() -> bool:
  """Whether jax's CUDA plugin (the GPU compiler behind compile-only GPU devices) is installed."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    return False


@functools.lru_cache(maxsize=None)
def _tpu_topology(topology_name: str):
  if not have_tpu_compiler():
    raise ImportError(f"compiling for TPU target {topology_name!r} needs libtpu, which is not "
                      f"installed; run: {INSTALL}")
  if "tpu" not in os.environ.get("JAX_PLATFORMS", "tpu"):
    # this process drives no TPU chip, only the compiler: let several such processes (pytest
    # workers) load libtpu, which otherwise fails "accessing libtpu multi-process lockfile"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return topologies.get_topology_desc(topology_name=topology_name, platform="tpu")


@functools.lru_cache(maxsize=None)
def _gpu_topology(topology_name: str, config_file: str):
  if not have_gpu_compiler():
    raise ImportError(f"compiling for a GPU target needs jax's CUDA plugin, which is not "
                      f"installed; run: {INSTALL}")
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="cuda", topology=topology_name,
                                      target_config=(CONFIGS / config_file).read_text())
