"""Bytes that the collectives of a compiled SPMD program send per device, read from its HLO text.

Counts each collective once per execution: instructions in a while loop's body are multiplied
by the loop's known trip count, nested loops by the product, and a conditional counts its most
expensive branch. Conventions (bytes sent by one device, the usual "bus bytes"):
  all-to-all          (n-1)/n x buffer        all-gather      (n-1)/n x result
  reduce-scatter      (n-1)   x result        all-reduce      2 (n-1)/n x buffer
  collective-permute  buffer x (pairs / devices)
where n is the size of a replica group. Used by tests to check `cost_model` against what XLA
really compiled, and by the benchmark to report communicated bytes.
"""
import collections
import math
import re

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s+(" + "|".join(KINDS) +
                    r")(-start)?\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s*\(.*\{\s*$")


def _shape_bytes(text):
  """Bytes of every array shape in `text` (a shape or a tuple of shapes)."""
  return [_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
          for t, dims in _SHAPE.findall(text)]


def _group_size(rest, devices):
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if m:  # mesh['a'=2,'b'=4] {'b'}: groups span the named axes
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{(\{[\d,]*\})", rest)
  if m and m.group(1) != "{}":
    return len(m.group(1).strip("{}").split(","))
  return devices


def _sent(kind, start, shape_text, rest, devices):
  """Bytes one device sends for one instruction."""
  sizes = _shape_bytes(shape_text)
  if kind == "collective-permute":
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", rest)
    count = pairs.group(1).count("{") if pairs else devices
    buffer = sizes[0]  # for -start: (operand, output, ...) -> operand
    return buffer * count / devices
  n = _group_size(rest, devices)
  if kind == "all-gather":
    return sizes[-1] * (n - 1) / n  # for -start: (operand, output) -> output
  if kind == "reduce-scatter":
    return sizes[-1] * (n - 1)
  if kind == "all-reduce":
    return 2 * sum(sizes) * (n - 1) / n
  total = sum(sizes) if not start else sum(sizes) / 2  # all-to-all(-start) result
  return total * (n - 1) / n


def collective_bytes(hlo_text: str) -> dict[str, float]:
  """{kind: bytes sent per device} over one execution of the compiled module."""
  m = re.search(r"num_partitions=(\d+)", hlo_text)
  devices = int(m.group(1)) if m else 1
  own = collections.defaultdict(lambda: collections.Counter())
  calls = collections.defaultdict(list)  # computation -> [(multiplier, [callee alternatives])]
  entry, current = None, None
  for line in hlo_text.splitlines():
    h = _HEADER.match(line)
    if h:
      current = h.group(1)
      if line.startswith("ENTRY"):
        entry = current
      continue
    if current is None:
      continue
    i = _INSTR.match(line)
    if i:
      shape_text, kind, start, rest = i.groups()
      own[current][kind] += _sent(kind, bool(start), shape_text, rest, devices)
      continue
    if " while(" in line:
      body = re.search(r"body=%([\w.\-]+)", line).group(1)
      trip = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
      if trip is None:
        raise ValueError(f"while loop without a known trip count: {line[:200]}")
      calls[current].append((int(trip.group(1)), [body]))
    elif " conditional(" in line:
      m = re.search(r"branch_computations=\{([^}]*)\}", line)
      branches = re.findall(r"%([\w.\-]+)", m.group(1)) if m else \
          re.findall(r"(?:true|false)_computation=%([\w.\-]+)", line)
      calls[current].append((1, branches))
    else:
      for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
        calls[current].append((1, [callee]))

  done = {}

  def total(comp):
    if comp not in done:
      out = collections.Counter(own[comp])
      for mult, alternatives in calls[comp]:
        best = max((total(c) for c in alternatives), key=lambda c: sum(c.values()),
                   default=collections.Counter())
        for k, b in best.items():
          out[k] += mult * b
      done[comp] = out
    return done[comp]

  return {k: b for k, b in total(entry).items() if b}
