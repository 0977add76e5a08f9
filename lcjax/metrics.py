"""Metrics: JSONL + TensorBoard writer, FLOP accounting (DESIGN.md convention), MFU, memory."""
import json
import math
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax.ops import manual


# The keys mirrored to TensorBoard: the time series (start records stay in the JSONL only).
_TENSORBOARD_PREFIXES = ("train/", "eval/", "outer/")


def read_records(path, warn: bool = True) -> list[dict]:
  """The records of a metrics.jsonl; a torn last line (a run killed mid-write) is dropped (with
  a warning); any other line that does not parse is a ValueError naming the file and line."""
  text = pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
  lines = text.split("\n")
  if lines[-1] and warn:  # no newline after the last line: its write never finished
    print(f"[lcjax] warning: dropped the torn last line of {path} ({len(lines[-1])} bytes, no "
          "newline): a run stopped while writing it", flush=True)
  records = []
  for number, line in enumerate(lines[:-1], 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)  # older files may hold bare NaN: Python's json reads it
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number} is not a JSON record ({e.msg}); remove that line or "
                       "use a new --workdir") from None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
      raise ValueError(f"{path}:{number} is not a metrics record (an object with an integer "
                       "\"step\"); remove that line or use a new --workdir")
    records.append(record)
  return records


class MetricsWriter:
  """Appends one JSON object per record to DIR/metrics.jsonl and mirrors the time series to
  TensorBoard.

  keep_through: the run resumes after that step (from its checkpoint, or from scratch: -1):
  records past it are about to be logged again, so they are dropped from the JSONL, and the
  TensorBoard events are rebuilt from the records kept (no point twice). None (a dry run)
  keeps everything. Each record is one whole line, flushed; values are strict JSON (NaN and
  infinities as null). On several processes only process 0 writes; the others keep the
  records they are given in memory."""

  def __init__(self, workdir, keep_through: int | None):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb_dir = pathlib.Path(workdir) / "tensorboard"
    self._tb = self._file = None
    self.records = []
    if jax.process_index() != 0:
      return
    records = read_records(self.path) if self.path.exists() else []
    kept = records if keep_through is None else [r for r in records if r["step"] <= keep_through]
    if self.path.exists() and (kept != records or _torn(self.path)):
      self.path.write_text("".join(_line(r) for r in kept))
    if keep_through is not None:
      for event_file in self._tb_dir.glob("events.out.tfevents.*"):
        event_file.unlink()
      for record in kept:
        self._mirror(record)
    self.records = kept
    self._file = open(self.path, "a")

  def last(self, key, default=None):
    """The latest value of `key` among the records kept (and written since)."""
    return next((r[key] for r in reversed(self.records) if r.get(key) is not None), default)

  def write(self, step: int, record: dict):
    record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
    self.records.append(record)
    if self._file is None:
      return
    self._file.write(_line(record))
    self._file.flush()
    self._mirror(record)

  def _mirror(self, record):
    scalars = [(k, v) for k, v in record.items() if k.startswith(_TENSORBOARD_PREFIXES)
               and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not scalars:
      return
    if self._tb is None:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self._tb_dir))
    for key, value in scalars:
      self._tb.add_scalar(key, value, record["step"])

  def close(self):
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _torn(path) -> bool:
  with open(path, "rb") as f:
    if f.seek(0, 2) == 0:
      return False
    f.seek(-1, 2)
    return f.read(1) != b"\n"


def _line(record: dict) -> str:
  return json.dumps(_strict(record), allow_nan=False) + "\n"


def _strict(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  return value


def _plain(value):
  value = np.asarray(value) if isinstance(value, (jax.Array, np.ndarray, np.generic)) else value
  if isinstance(value, np.ndarray):
    return value.item() if value.size == 1 else value.tolist()
  return value


def train_flops_per_step(cfg, batch_size: int, seq_len: int) -> float:
  """Model FLOPs of one training step (DESIGN.md): matmuls 2mnk, 3x forward for the dense part;
  attention forward 4·B·H·Tq·Tk·D halved for causal (banded for a window), backward 2.5x forward."""
  E, H, K, D, F, V = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                      cfg.vocab_size)
  tokens = batch_size * seq_len
  matmul_params = cfg.num_layers * (2 * E * H * D + 2 * E * K * D + 3 * E * F) + E * V
  window = min(seq_len, cfg.sliding_window or seq_len)
  attn_pairs = seq_len * window - window * window / 2  # T²/2 for causal without a window
  attention_forward = 4 * batch_size * H * D * attn_pairs * cfg.num_layers
  return 3 * 2 * matmul_params * tokens + 3.5 * attention_forward


def measure_peak_flops(mesh, dtype, size: int | None = None, repeats: int = 5) -> float:
  """Per-device matmul throughput (FLOP/s): one [n, n] @ [n, n] per device, median of repeats."""
  n_dev = mesh.devices.size
  size = size or (512 if manual.platform(mesh) == "cpu" else 8192)
  sharding = NamedSharding(mesh, P(mesh.axis_names))
  a = jax.device_put(jnp.ones((n_dev, size, size), dtype), sharding)
  matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=sharding)
  matmul(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / float(np.median(times))


def step_bytes(mem) -> int:
  """Per-device bytes of a compiled step in the device's own memory, from memory_analysis():
  the smaller of the compiler's peak and arguments + temporaries + outputs - outputs aliased to
  donated arguments. The peak (TPU, GPU; 0 on CPU) is the true maximum of live buffers, but it
  counts buffers in host memory too (a pinned_host argument of 4 MiB passed through beside a
  4 MiB device one gives a peak of 8 MiB on v5p and on H100), so where the step keeps state or
  activations on the host (optimizer or remat offload) the device-only sum bounds it better;
  where nothing is on the host, the sum overstates the peak (it adds buffers that never
  coexist)."""
  summed = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
  peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
  return min(peak, summed) if peak else summed


def out_of_memory(error) -> str | None:
  """The one-line message of a compile that ran out of the device's main memory (TPU HBM, GPU
  memory: RESOURCE_EXHAUSTED), None for any other error; a kernel that overflows a core's own
  memories (TPU SMEM, VMEM) is a bug, not a step that does not fit, and stays an error."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  line = text.split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
  return None if re.search(r"\b[sv]mem\b", line, re.IGNORECASE) else line


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def exhausted_bytes(message: str) -> int:
  """The bytes an out-of-memory message says were required: its first "(221.89G)"-style figure
  (libtpu's "required for HLO temporaries (221.89G) exceeds available HBM (95.74G)")."""
  m = re.search(r"\(([\d.]+)\s*([KMGT]?)i?B?\)", message)
  return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0


class BufferReport:
  """libtpu's own buffer assignment of one ahead-of-time compile for TPU: with `options` the
  compile dumps its memory-usage report (compiler option xla_dump_to, a temporary directory
  removed on exit), and `hbm_bytes()` reads the report's "Memory Space: default" total, the HBM
  the program's buffers take. memory_analysis() has no exact HBM figure once state or
  activations live in host memory: its peak counts host buffers and its sum counts temporaries
  that never coexist (docs/targets.md, "A figure above the HBM"). Other platforms: no options,
  no figure.

    with BufferReport(mesh.devices.flat[0].platform) as report:
      compiled = lowered.compile(report.options)
      hbm = report.hbm_bytes()
  """

  def __init__(self, platform: str):
    self.platform, self.directory = platform, None

  def __enter__(self):
    if self.platform == "tpu":
      import tempfile
      self.directory = tempfile.mkdtemp(prefix="lcjax-buffers-")
    return self

  def __exit__(self, *exc):
    if self.directory:
      import shutil
      shutil.rmtree(self.directory, ignore_errors=True)

  @property
  def options(self) -> dict:
    return {"xla_dump_to": self.directory} if self.directory else {}

  def hbm_bytes(self) -> int | None:
    """The largest HBM total among the compile's reports (one per module), None without one."""
    if not self.directory:
      return None
    totals = [hbm_bytes_of_report(p.read_text()) for p in
              pathlib.Path(self.directory).glob("*memory-usage-report.txt")]
    totals = [t for t in totals if t is not None]
    return max(totals) if totals else None


def hbm_bytes_of_report(text: str) -> int | None:
  """The "Memory Space: default" (HBM) total of an XLA TPU memory-usage report."""
  m = re.search(r"Memory Space: default \(color=0\)\s*\nTotal bytes: (\d+)", text)
  return int(m.group(1)) if m else None


def compiled_memory(compiled, hbm_bytes: int | None = None) -> dict:
  """The compile/* fields of the start record, from the compiled step's memory_analysis();
  `hbm_bytes` (libtpu's buffer assignment, BufferReport) is the step's figure where given."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  exact = {} if hbm_bytes is None else {"compile/step_bytes_analysis": step_bytes(mem),
                                         "compile/step_bytes_source": "libtpu buffer assignment"}
  return {"compile/step_bytes": step_bytes(mem) if hbm_bytes is None else hbm_bytes, **exact,
          "compile/temp_bytes": mem.temp_size_in_bytes,
          "compile/argument_bytes": mem.argument_size_in_bytes,
          "compile/output_bytes": mem.output_size_in_bytes,
          "compile/alias_bytes": mem.alias_size_in_bytes,
          "compile/host_argument_bytes": mem.host_argument_size_in_bytes,
          "compile/host_temp_bytes": mem.host_temp_size_in_bytes}


def state_bytes_by_memory_kind(tree) -> dict:
  """optim/state_bytes_{device,host}: bytes of the arrays (or abstract arrays) by memory kind."""
  device = host = 0
  for x in jax.tree.leaves(tree):
    kind = getattr(x.sharding, "memory_kind", None) or "device"
    nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    if "host" in kind:
      host += nbytes
    else:
      device += nbytes
  return {"optim/state_bytes_device": device, "optim/state_bytes_host": host}


def device_memory() -> dict:
  """train/peak_memory_bytes: the largest peak over local devices, where the backend reports it
  (GPU, TPU; the CPU backend has no memory_stats)."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
  return {"train/peak_memory_bytes": max(peaks)} if peaks else {}
