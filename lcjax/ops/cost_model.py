"""Cost model of sequence-parallel attention: bytes each device sends, memory, time; a chooser.

Exact byte counts of what `sequence_parallel_attention` issues (checked against compiled HLO in
tests/test_cost_model.py), per attention call and device, with B the per-device batch, T = S/P
the local length, e bytes per element, Kr = Hkv repeated up to the Ulysses degree u:
  ulysses (u-way)  all-to-all (u-1)/u * B T (2 Hq + 2 Kr) D e   forward (q, k, v in, out back),
                   the same again backward; ids all-gathered once: (u-1) B T 4 per id array
  ring (r-way)     (r-1) rotations of K/V (+ ids) forward, as many backward, plus r rotations
                   of float32 dK/dV; a block is B (S/r) (Kr/u) D
  allgather        all-gather K/V (+ ids) over P: (P-1)/P * B S Hkv D (2e + 4 ids/(Hkv D)),
                   reduce-scatter of dK/dV backward
Time: compute at `efficiency` of peak (DESIGN.md FLOP convention), collectives at link
bandwidth plus a latency each; the ring overlaps each step's transfer with its compute, the
all-to-all and all-gather do not overlap. Devices are ordered ring-major, Ulysses innermost, so a
Ulysses group of u <= devices_per_node stays inside a node.
"""
import collections
import dataclasses

from lcjax.ops.ulysses import kv_head_repeats

STRATEGIES = ("usp", "ulysses", "ring", "allgather")


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """One attention call; `batch` is the per-device batch (global batch / data parallelism)."""
  batch: int
  seq_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  bytes_per_element: int = 2
  causal: bool = True
  segments: bool = False  # segment ids travel beside positions


@dataclasses.dataclass(frozen=True)
class Topology:
  """Links and compute of one device; bandwidths per device and direction."""
  name: str = "8x H100 SXM per node, NVLink 4 + 8x 400 Gb/s InfiniBand"
  devices_per_node: int = 8
  intra_node_gbytes_s: float = 450.0  # NVLink 4: 900 GB/s bidirectional
  inter_node_gbytes_s: float = 50.0  # one 400 Gb/s NIC per GPU
  peak_tflops: float = 989.0  # bf16 dense
  efficiency: float = 0.5  # attention kernel fraction of peak
  latency_us: float = 10.0  # per collective or ring step


H100 = Topology()


@dataclasses.dataclass(frozen=True)
class Estimate:
  strategy: str
  ring: int
  ulysses: int
  bytes_sent: float  # per device, forward + backward
  compute_s: float
  comm_s: float  # not hidden behind compute
  time_s: float
  memory_bytes: float  # activation bytes of the attention op per device (backward peak)


def _degrees(strategy, ring_size, ulysses_size):
  """(Ulysses degree, ring degree) of a strategy on a ring x ulysses mesh."""
  P = ring_size * ulysses_size
  return {"usp": (ulysses_size, ring_size), "ulysses": (P, 1), "ring": (1, P),
          "allgather": (1, 1)}[strategy]


def _kv_heads(shape, uly):
  return shape.num_kv_heads * (kv_head_repeats(shape.num_heads, shape.num_kv_heads, uly)
                               if uly > 1 else 1)


def comm_bytes(strategy: str, shape: AttentionShape, ring_size: int, ulysses_size: int, *,
               backward: bool = False) -> dict[str, float]:
  """{collective kind: bytes sent per device} of one call (plus its backward pass)."""
  B, S, H, D, e = shape.batch, shape.seq_len, shape.num_heads, shape.head_dim, \
      shape.bytes_per_element
  P = ring_size * ulysses_size
  ids = 1 + shape.segments
  out = collections.Counter()
  if P == 1:
    return {}
  if strategy == "allgather":
    kv = 2 * B * S * shape.num_kv_heads * D * e
    out["all-gather"] += (kv + ids * B * S * 4) * (P - 1) / P
    if backward:
      out["reduce-scatter"] += kv * (P - 1) / P
    return dict(out)
  uly, ring = _degrees(strategy, ring_size, ulysses_size)
  Kr, T = _kv_heads(shape, uly), S // P
  if uly > 1:
    out["all-to-all"] += (1 + backward) * B * T * (2 * H + 2 * Kr) * D * e * (uly - 1) / uly
    out["all-gather"] += ids * B * T * 4 * (uly - 1)
  if ring > 1:
    kv, dkv = _rotation_bytes(shape, uly, ring)
    out["collective-permute"] += (ring - 1) * kv * (1 + backward) + backward * ring * dkv
  return dict(out)


def _rotation_bytes(shape: AttentionShape, uly: int, ring: int):
  """Bytes of one ring hop: K/V block with its ids, and the float32 dK/dV block backward."""
  block = shape.batch * (shape.seq_len // ring) * (_kv_heads(shape, uly) // uly) * shape.head_dim
  ids = (1 + shape.segments) * shape.batch * (shape.seq_len // ring) * 4
  return 2 * block * shape.bytes_per_element + ids, 2 * block * 4


def activation_bytes(strategy: str, shape: AttentionShape, ring_size: int, ulysses_size: int,
                     *, backward: bool = True) -> float:
  """Bytes of the attention op's live tensors per device, assuming an O(T)-memory local kernel."""
  B, S, H, K, D, e = shape.batch, shape.seq_len, shape.num_heads, shape.num_kv_heads, \
      shape.head_dim, shape.bytes_per_element
  P = ring_size * ulysses_size
  T = S // P
  local = B * T * (2 * H + 2 * K) * D * e + B * T * 4 * (1 + shape.segments)  # q, k, v, out, ids
  if strategy == "allgather":
    full_kv = 2 * B * S * K * D * e + B * S * 4 * (1 + shape.segments)
    return local + full_kv * (1 + backward)  # gathered K/V, and their gradients backward
  uly, ring = _degrees(strategy, ring_size, ulysses_size)
  Kr = _kv_heads(shape, uly)
  total = local
  if uly > 1:  # head-split copies of q, k, v, out (and their cotangents backward)
    total += B * T * (2 * H + 2 * Kr) * D * e * (1 + backward)
  if ring > 1:
    Tr, h, kr = S // ring, H // uly, Kr // uly
    total += 2 * 2 * B * Tr * kr * D * e  # the K/V block held and the one in flight
    total += B * Tr * h * (D + 1) * 4  # float32 out and lse accumulators
    if backward:
      total += 2 * 2 * B * Tr * kr * D * 4 + B * Tr * h * D * 4  # dK/dV held + in flight, dq
  return total


def _flops(shape: AttentionShape, backward=True):
  """DESIGN.md convention: 4 B Hq S^2 D forward, halved for causal; backward 2.5x forward."""
  f = 4 * shape.batch * shape.num_heads * shape.seq_len ** 2 * shape.head_dim
  f *= 0.5 if shape.causal else 1.0
  return f * (3.5 if backward else 1.0)


def _spans_nodes(group, stride, topo):
  return group * stride > topo.devices_per_node


def _all_to_all_s(nbytes, n, topo):
  """An all-to-all over n consecutive devices: traffic to peers in the node and outside it."""
  inside = min(n, topo.devices_per_node) - 1
  outside = n - 1 - inside
  intra = nbytes * inside / (n - 1) / (topo.intra_node_gbytes_s * 1e9)
  inter = nbytes * outside / (n - 1) / (topo.inter_node_gbytes_s * 1e9)
  return max(intra, inter)


def estimate(strategy: str, shape: AttentionShape, ring_size: int, ulysses_size: int,
             topology: Topology = H100) -> Estimate:
  """Time and traffic of one forward + backward attention call per device."""
  P = ring_size * ulysses_size
  sent = comm_bytes(strategy, shape, ring_size, ulysses_size, backward=True)
  speed = P * topology.peak_tflops * 1e12 * topology.efficiency
  fwd, bwd = _flops(shape, backward=False) / speed, _flops(shape) / speed
  bwd -= fwd
  lat = topology.latency_us * 1e-6
  link = lambda spans: (topology.inter_node_gbytes_s if spans else
                        topology.intra_node_gbytes_s) * 1e9
  comm = 0.0
  if strategy == "allgather" and P > 1:
    comm = sum(sent.values()) / link(_spans_nodes(P, 1, topology)) + 2 * lat
  elif P > 1:
    uly, ring = _degrees(strategy, ring_size, ulysses_size)
    if uly > 1:  # 4 all-to-alls forward, 4 backward, one all-gather of ids per id array
      comm += _all_to_all_s(sent["all-to-all"] + sent["all-gather"], uly, topology) + 9 * lat
    if ring > 1:  # every step hides its transfer behind its compute where it can
      kv, dkv = _rotation_bytes(shape, uly, ring)
      bw = link(_spans_nodes(ring, uly, topology))
      exposed = lambda nbytes, step_compute: max(0.0, nbytes / bw + lat - step_compute)
      comm += (ring - 1) * exposed(kv, fwd / ring)
      comm += (ring - 1) * exposed(kv + dkv, bwd / ring) + exposed(dkv, 0.0)
  return Estimate(strategy, ring_size, ulysses_size, sum(sent.values()), fwd + bwd, comm,
                  fwd + bwd + comm, activation_bytes(strategy, shape, ring_size, ulysses_size))


def feasible(strategy: str, shape: AttentionShape, ring_size: int, ulysses_size: int) -> bool:
  """Whether the heads split for this strategy (Hq divisible by the Ulysses degree)."""
  uly, _ = _degrees(strategy, ring_size, ulysses_size)
  return uly == 1 or shape.num_heads % uly == 0


def choose_strategy(shape: AttentionShape, ring_size: int, ulysses_size: int,
                    topology: Topology = H100, memory_budget: float | None = None) -> Estimate:
  """The fastest feasible strategy on this ring x ulysses mesh (within the memory budget)."""
  options = [estimate(s, shape, ring_size, ulysses_size, topology) for s in STRATEGIES
             if feasible(s, shape, ring_size, ulysses_size)]
  fits = [o for o in options if memory_budget is None or o.memory_bytes <= memory_budget]
  if not fits:
    raise ValueError(f"no strategy fits {memory_budget / 2**30:.1f} GiB per device for {shape} on "
                     f"ring {ring_size} x ulysses {ulysses_size}; the smallest needs "
                     f"{min(o.memory_bytes for o in options) / 2**30:.1f} GiB: add devices")
  return min(fits, key=lambda o: o.time_s)


def splits(devices: int):
  """Every (ring, ulysses) factorisation of `devices`."""
  return [(devices // u, u) for u in range(1, devices + 1) if devices % u == 0]


def table(shape: AttentionShape, devices: int, topology: Topology = H100):
  """Estimates of USP on every feasible split of `devices` (1 x P is Ulysses, P x 1 the ring)
  and of all-gather KV, fastest first."""
  rows = [estimate("usp", shape, r, u, topology) for r, u in splits(devices)
          if feasible("usp", shape, r, u)]
  rows.append(estimate("allgather", shape, devices, 1, topology))
  return sorted(rows, key=lambda o: o.time_s)

