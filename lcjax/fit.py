"""Fit finder: the compiled memory of a training step, and the longest sequence that fits a budget.

Everything is compiled ahead of time from abstract inputs (`jax.ShapeDtypeStruct`), so real model
shapes are planned on a CPU with fake devices, or for a compile target's devices
(`lcjax.targets`: the TPU or GPU compiler, its memory analysis), and nothing is allocated. A
step's per-device memory on TPU is the HBM of libtpu's own buffer assignment (its memory-usage
report); elsewhere the smaller of the compiler's peak (GPU) and arguments + temporaries + outputs
- outputs aliased to donated arguments (`metrics.step_bytes`). A target compiler that runs
out of memory (RESOURCE_EXHAUSTED) gives a step that does not fit, with the figure it names.
"""
import dataclasses
import math

import jax

from lcjax import metrics as metrics_lib
from lcjax import parts as parts_lib
from lcjax import program as program_lib
from lcjax.ops import manual
from lcjax.train import prepare

@dataclasses.dataclass(frozen=True)
class StepMemory:
  seq_len: int
  total: int           # the per-device bytes the step needs: on TPU libtpu's buffer assignment
                       # (metrics.BufferReport), elsewhere `metrics.step_bytes`
  argument: int = 0
  temp: int = 0
  output: int = 0
  alias: int = 0
  host_temp: int = 0
  exhausted: str = ""  # the target compiler's RESOURCE_EXHAUSTED message: the step does not fit

  def fits(self, budget_bytes: int) -> bool:
    return not self.exhausted and self.total <= budget_bytes

  def describe(self) -> str:
    if self.exhausted:
      return f"does not fit: {self.exhausted}"
    return f"{self.total / 2**30:.2f} GiB"


def mst_chunks(model_config) -> dict:
  """MsT chunk counts sized so one chunk's [C, F] hidden or [C, V] logits is no larger than a
  layer's [T, E] input: mlp_chunks = ceil(F / E), loss_chunks = ceil(V / E)."""
  E = model_config.embed_dim
  return {"mlp_chunks": -(-model_config.mlp_dim // E),
          "loss_chunks": -(-(model_config.vocab_size or 256) // E)}


def step_memory(config, seq_len: int, devices=None) -> StepMemory:
  """Compiled per-device memory of the training step of `config` at `seq_len` tokens, on
  `devices` (default: this machine's; a target's `devices()` to plan for it)."""
  prepared = prepare(with_overrides(config, {"train.seq_len": seq_len}), with_data=False,
                     devices=devices)
  with jax.set_mesh(prepared.mesh):
    program = program_lib.build(prepared, aot=True)
    batch = parts_lib.abstract_batch(prepared.config.train.batch_size, seq_len,
                                     program.batch_sharding)
    with metrics_lib.BufferReport(manual.platform(prepared.mesh)) as report:
      try:
        _, compiled = program.compile(batch, report.options)
      except jax.errors.JaxRuntimeError as e:
        message = metrics_lib.out_of_memory(e)
        if message is None:
          raise
        return StepMemory(seq_len, metrics_lib.exhausted_bytes(message), exhausted=message)
      hbm = report.hbm_bytes()
    mem = compiled.memory_analysis()
  return StepMemory(seq_len, metrics_lib.step_bytes(mem) if hbm is None else hbm,
                    mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes,
                    mem.alias_size_in_bytes, mem.host_temp_size_in_bytes)


def _measure_in_child(config, seq_len: int, target_name: str, queue):
  from lcjax import targets
  try:
    queue.put(step_memory(config, seq_len, targets.parse(target_name).devices()))
  except Exception as e:  # noqa: BLE001 (re-raised in the parent)
    queue.put(ValueError(str(e)) if isinstance(e, ValueError) else RuntimeError(
        f"{type(e).__name__}: {e}"))


def step_memory_isolated(config, seq_len: int, target_name: str):
  """(StepMemory, "") of `step_memory` for a target, compiled in a child process (the caller's
  main module must be import-safe: multiprocessing's spawn imports it); errors are re-raised
  here; (None, what happened) when the compiler crashed the child (libtpu aborts its process on a failed internal check,
  e.g. `llo_loop.cc: Check failed: index_space_.start <= index_space_.limit` for Llama3-8B at
  512K tokens per v5p chip), so that a search records the crash and goes on."""
  import multiprocessing
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  child = ctx.Process(target=_measure_in_child, args=(config, seq_len, target_name, queue))
  child.start()
  child.join()  # the result is a few hundred bytes: the child's exit never waits on the pipe
  if child.exitcode != 0:  # killed by a signal (libtpu's abort is SIGABRT, exit code -6)
    return None, f"the compiler crashed its process (exit code {child.exitcode})"
  result = queue.get(timeout=60)
  if isinstance(result, Exception):
    raise result
  return result, ""


def with_overrides(config, overrides: dict):
  """A copy of `config` with {"section.key": value} overrides (keys must exist)."""
  config = config.copy_and_resolve_references()
  config.unlock()
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return config


def longest_fitting(config, budget_bytes: int, *, granularity: int = 1024,
                    max_len: int = 1 << 22, on_probe=None, devices=None):
  """(longest multiple of `granularity` whose step fits `budget_bytes`, its StepMemory), or
  (0, None) if even `granularity` tokens do not fit.

  Memory grows about linearly in T (attention is O(T)), so after bracketing the answer the
  search probes where the line through the bracket's ends predicts the last fitting length,
  and the length after it: two compiles when the line is right, bisection-like otherwise.
  """
  probes = {}

  def fits(units):
    if units not in probes:
      probes[units] = step_memory(config, units * granularity, devices)
      if on_probe:
        on_probe(probes[units])
    return probes[units].fits(budget_bytes)

  def predicted_last_fit(a, b):
    """Last unit under the budget on the line through a and b (a < b measured)."""
    ma, mb = probes[a].total, probes[b].total
    if mb <= ma:
      return 2 * b
    return a + math.floor((budget_bytes - ma) * (b - a) / (mb - ma))

  max_units = max_len // granularity
  if not fits(1):
    return 0, None
  lo, hi, prev = 1, None, None
  while hi is None:  # bracket: grow at least 2x, further where the line says there is room
    guess = predicted_last_fit(prev, lo) + 1 if prev else 2 * lo
    nxt = min(max(2 * lo, guess), max_units)
    if nxt == lo:
      return lo * granularity, probes[lo]
    if fits(nxt):
      prev, lo = lo, nxt
    else:
      hi = nxt
  while hi - lo > 1:
    guess = min(max(predicted_last_fit(lo, hi), lo + 1), hi - 1)
    for units in (guess, guess + 1):
      if lo < units < hi:
        if fits(units):
          lo = units
        else:
          hi = units
          break
  return lo * granularity, probes[lo]


def fit_table(config, budget_bytes: int, remat_policies, *, granularity=1024, max_len=1 << 22,
              on_probe=None, devices=None) -> list[dict]:
  """Longest fitting sequence for each (MsT off/on) x remat policy."""
  rows = []
  for mst in (False, True):
    for remat in remat_policies:
      overrides = {"model.remat": remat}
      if mst:
        overrides.update({f"model.{k}": v for k, v in mst_chunks(config.model).items()})
      else:
        overrides.update({"model.mlp_chunks": 1, "model.loss_chunks": 1})
      seq_len, mem = longest_fitting(with_overrides(config, overrides), budget_bytes,
                                     granularity=granularity, max_len=max_len, on_probe=on_probe,
                                     devices=devices)
      rows.append({"mst": mst, "remat": remat, "seq_len": seq_len,
                   "memory_gb": mem.total / 2**30 if mem else math.nan,
                   "mlp_chunks": overrides["model.mlp_chunks"],
                   "loss_chunks": overrides["model.loss_chunks"]})
  return rows
