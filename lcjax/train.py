"""`train_and_evaluate(config, workdir)`: the training loop, importable from a Colab.

Per step: the global batch for that step (a pure function of seed and step), one jitted,
donated train step, metrics read one log interval late so the device is never idle waiting for
the host. Every eval_every steps and at the end: held-out loss. Every checkpoint.every steps and
at the end: a checkpoint; rerunning with the same workdir resumes from the latest.

Reliability (docs/reliability.md): the workdir is locked before it is read; the metrics read at
each log, eval and checkpoint boundary are checked to be finite (guard.py, train.nan_policy) and
every saved state is finite; SIGTERM/SIGINT save at the next step boundary (workdir.py).
"""
import collections
import dataclasses
import math
import pathlib
import time

import jax
import numpy as np
import tqdm

from lcjax import checkpoint as checkpoint_lib
from lcjax import config as config_lib
from lcjax import data as data_lib
from lcjax import distributed
from lcjax import guard
from lcjax import hf as hf_lib
from lcjax import mesh as mesh_lib
from lcjax import metrics as metrics_lib
from lcjax import ops
from lcjax import parts as parts_lib
from lcjax import program as program_lib
from lcjax import sample as sample_lib
from lcjax import targets as targets_lib
from lcjax import workdir as workdir_lib
from lcjax.ops import manual
from lcjax.outer import routing
from lcjax.data.tokenizers import make_tokenizer
from lcjax.model import ModelConfig


def _check_batch(config, mesh):
  divisor = mesh_lib.batch_divisor(mesh)
  if config.train.batch_size % divisor:
    raise ValueError(f"train.batch_size ({config.train.batch_size}) must be a multiple of the "
                     f"batch-sharding mesh axes replica*data*fsdp = {divisor}")


def _sequence_layout(config):
  """The token permutation of sequence parallelism (None when it is off)."""
  ring, ulysses = (config_lib.mesh_size(config.mesh, a) for a in ("ring", "ulysses"))
  if ring * ulysses == 1:
    return None
  return np.asarray(ops.sequence_layout(config.train.seq_len, ring, ulysses, config.sp.layout))


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What every entry point (training, dry run, fit, sampling, tests) builds before the program."""
  config: object            # validated, locked
  mesh: jax.sharding.Mesh
  model_cfg: ModelConfig
  tokenizer: object
  datasets: object | None   # None when built without data (compiling, sampling)

  def __iter__(self):  # config, mesh, datasets, model_cfg = prepare(...)
    return iter((self.config, self.mesh, self.datasets, self.model_cfg))


def _datasets(config):
  """The train and held-out streams (DiPaCo: one shard per path), in the sequence layout."""
  t, layout = config.train, _sequence_layout(config)
  if config.outer.kind == "dipaco":
    return routing.build(config, t.seq_len, t.seed, layout)
  return data_lib.build(config.data, t.seq_len, t.seed, layout=layout)


def prepare(config, *, with_data: bool = True, devices=None, mesh_config=None) -> Prepared:
  """The validated config, the mesh (over `devices`, from `mesh_config` if given, else the
  config's), the model config and, with_data, the datasets in the sequence layout."""
  config = config_lib.validate(config)
  mesh = mesh_lib.make_mesh(mesh_config or config.mesh, devices)
  _check_batch(config, mesh)
  if with_data:
    datasets = _datasets(config)
    tokenizer = datasets.tokenizer
  else:
    datasets, tokenizer = None, make_tokenizer(config.data)
  return Prepared(config, mesh, ModelConfig.from_config(config, tokenizer.vocab_size), tokenizer,
                  datasets)


def row_share(program, config):
  """The rows of each global batch this process builds (None: one process builds them all)."""
  if jax.process_count() == 1:
    return None
  return parts_lib.RowShare.of(program.batch_sharding, config.train.batch_size,
                               config.train.seq_len)


def _rows(share):
  """The `rows` argument of the data streams: this process's span, or all rows."""
  return None if share is None else share.span


def _eval_sums(program, params, batches, share, in_flight: int = 2) -> tuple[float, float]:
  """(cross-entropy sum, token count) over held-out batches, at most `in_flight` dispatched
  ahead of the host: enough to overlap the next batch's transfer with this one's compute, few
  enough to bound device memory (and XLA:CPU's collective rendezvous, which deadlocked with a
  whole split of evaluations queued at once)."""
  pending, loss_sum, count = collections.deque(), 0.0, 0.0
  for batch in batches:
    pending.append(program.eval(params, parts_lib.device_batch(batch, program.batch_sharding,
                                                               share)))
    if len(pending) > in_flight:
      s, c = jax.device_get(pending.popleft())
      loss_sum, count = loss_sum + float(s), count + float(c)
  for s, c in jax.device_get(list(pending)):
    loss_sum, count = loss_sum + float(s), count + float(c)
  return loss_sum, count


def evaluate(program, state, datasets, config) -> dict:
  """Exact held-out mean loss over the evaluated tokens (not a mean of batch means). With
  DiPaCo's paths every held-out document is evaluated with the path it is routed to:
  eval/loss is that routed mixture's, eval/loss/path<p> each path's on its documents."""
  t, record, share = config.train, {}, row_share(program, config)
  if program.num_paths == 1:
    loss_sum, count = _eval_sums(program, program.model_params(state),
                                 datasets.eval_batches(t.batch_size, t.eval_batches, rows=_rows(share)), share)
  else:
    loss_sum = count = 0.0
    for p in range(program.num_paths):
      s, c = _eval_sums(program, program.path_params(state, p),
                        datasets.eval_batches(t.batch_size, t.eval_batches, path=p,
                                              rows=_rows(share)), share)
      if c:  # a path no held-out document is routed to has no held-out loss
        record[f"eval/loss/path{p}"] = s / c
      loss_sum, count = loss_sum + s, count + c
  loss = loss_sum / max(count, 1.0)
  record.update({"eval/loss": loss, "eval/tokens": count})
  if datasets.tokenizer.is_bytes:
    record["eval/bits_per_byte"] = loss / math.log(2)  # byte tokens: one target = one byte (or EOS)
  return record


def _start_record(program, model_cfg, config, compiled, state, peak_flops, hbm_bytes=None):
  tokens = config.train.batch_size * config.train.seq_len
  record = {"model/params": model_cfg.param_count(),
            "model/flops_per_step": metrics_lib.train_flops_per_step(
                model_cfg, config.train.batch_size, config.train.seq_len),
            "model/tokens_per_step": tokens, "mesh": mesh_lib.describe(program.mesh),
            "device/peak_flops": peak_flops, "device/count": program.mesh.devices.size,
            **metrics_lib.compiled_memory(compiled, hbm_bytes)}
  # The fp32 parameters are the master weights: with the moments, the optimizer's state. A dry
  # run's abstract state carries the shardings (memory kinds) the live one would have.
  optimizer_state = {k: v for k, v in state.items() if k in ("params", "opt_state")}
  record.update(metrics_lib.state_bytes_by_memory_kind(optimizer_state))
  record.update(program.describe())
  if not isinstance(jax.tree.leaves(state)[0], jax.ShapeDtypeStruct):  # a live state
    record.update(program.stage.measure(state))
  return record


def _target_verdict(target, record) -> dict:
  """The target's figures and whether the step fits its memory per device."""
  budget, needed = target.hbm_bytes_per_device, record["compile/step_bytes"]
  print(f"[lcjax] {target.name}: the step needs {needed / 2**30:.2f} GiB per device of "
        f"{budget / 2**30:.2f} GiB: {'fits' if needed <= budget else 'does NOT fit'}")
  return {**target.describe(), "compile/fits": needed <= budget}


def state_source(config, checkpointer):
  """Where this run's state comes from, in the resume order: this run's latest checkpoint,
  then a Hugging Face model (model.init_from_hf), then another run's (outer.init_from), then
  scratch."""
  latest = checkpointer.latest_step()
  if latest is not None:
    return program_lib.ThisRun(checkpointer, latest)
  if config.model.init_from_hf:
    return hf_lib.Pretrained(config.model.init_from_hf)
  o = config.outer
  if o.kind == "dipaco" and o.init_from:  # a DiPaCo run goes on here, re-routed
    return program_lib.OtherRun(o.init_from, o.init_step, same_program=True)
  if o.init_from or o.base_from:  # DiLoCo's start, DiPaCo's base run
    return program_lib.OtherRun(o.init_from or o.base_from, o.init_step)
  return program_lib.Scratch()


def build_program(prepared, *, aot: bool = False):
  """The program of a prepared run, its step guarded as train.nan_policy says."""
  program = program_lib.build(prepared, aot=aot)
  if prepared.config.train.nan_policy == "skip":
    program = program_lib.Program(guard.SkipNonFinite(program.stage), program.parts, program.tx,
                                  program.mesh)
  return program


def train_and_evaluate(config, workdir, *, dry_run: bool = False, target=None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last train and eval metrics.

  dry_run: compile the step, write its start record, return it. `target` (a `targets.Target` or
  its name, e.g. "tpu:v5p:2x2x2"; dry runs only) compiles for that accelerator's compile-only
  devices: its memory analysis and schedule, judged against its memory."""
  if target is not None and not dry_run:
    raise ValueError(f"target {getattr(target, 'name', target)!r} has compile-only devices: "
                     "nothing can run on them; add --dry_run to compile for it")
  target = targets_lib.parse(target) if isinstance(target, str) else target
  # On several processes a bad config, mesh or data path stops every process with one line.
  prepared = distributed.agreed(lambda: prepare(config, devices=target.devices() if target else None))
  config, mesh, datasets, model_cfg = prepared
  workdir = pathlib.Path(workdir)
  lock = workdir_lib.Lock(workdir)  # before anything in the workdir is read or written
  try:
    result = _run(prepared, workdir, dry_run, target)
    if dry_run:
      return result
    if config.train.sample_prompt:
      text = sample_lib.generate(model_cfg, mesh, result.pop("params"), datasets.tokenizer,
                                 config.train.sample_prompt, config.train.sample_tokens,
                                 context=config.train.seq_len, seed=config.train.seed)
      if distributed.is_leader():
        (workdir / "sample.txt").write_text(text)
  finally:
    lock.release()
  result.pop("params", None)
  result["data/unigram_entropy"] = datasets.unigram_entropy()
  return result


def _run(prepared, workdir, dry_run, target) -> dict:
  config, mesh, datasets, model_cfg = prepared
  checkpointer = checkpoint_lib.Checkpointer(workdir, config)
  writer = None
  try:
    with jax.set_mesh(mesh), workdir_lib.Preemption() as preemption:
      program = build_program(prepared, aot=dry_run)
      for line in program.unshardable:
        print(f"[lcjax] not sharded: {line}")
      latest = checkpointer.latest_step()
      if latest is not None:  # refuse before compiling or touching the metrics
        checkpointer.check_state(latest, program.saved.abstract)
      if (workdir / "metrics.jsonl").exists():
        metrics_lib.read_records(workdir / "metrics.jsonl", warn=False)
      abstract_batch = parts_lib.abstract_batch(config.train.batch_size, config.train.seq_len,
                                                program.batch_sharding)
      with metrics_lib.BufferReport(manual.platform(mesh) if dry_run else "") as report:
        try:
          runner, compiled = program.compile(abstract_batch, report.options)
        except jax.errors.JaxRuntimeError as e:
          if target is None or metrics_lib.out_of_memory(e) is None:
            raise
          raise ValueError(f"{target.name}: the step does not fit: "
                           f"{metrics_lib.out_of_memory(e)}; find one that does with "
                           f"scripts/fit.py or scripts/plan.py --target={target.name}") from None
        hbm = report.hbm_bytes()
      peak = (config.train.peak_flops or (target.peak_flops_per_chip if target else
              metrics_lib.measure_peak_flops(mesh, model_cfg.compute_dtype)))
      if dry_run:
        record = _start_record(program, model_cfg, config, compiled, program.live.abstract, peak,
                               hbm)
        if target:
          record.update(_target_verdict(target, record))
        writer = metrics_lib.MetricsWriter(workdir, keep_through=None)
        writer.write(latest or 0, {"dry_run": True, **record})
        return record
      source = state_source(config, checkpointer)
      state, next_sequence = (source.init(program) if isinstance(source, hf_lib.Pretrained)
                              else program.init(source))
      start = int(state["step"])
      if getattr(datasets, "rounds", 1) > 1 and next_sequence != start * config.train.batch_size:
        raise ValueError(f"DiPaCo in rounds reads each path's shard by the step: the state starts "
                         f"at step {start} but its data position is sequence {next_sequence}, "
                         f"not step x train.batch_size ({config.train.batch_size}); start from a "
                         "run with the same train.batch_size")
      resumed = isinstance(source, program_lib.ThisRun)
      if resumed:
        print(f"[lcjax] resumed from step {latest} in {workdir}")
        if latest >= config.train.steps:
          print(f"[lcjax] the run is complete (train.steps={config.train.steps}); raise "
                "--config.train.steps to train further")
      if config.outer.kind == "dipaco" and distributed.is_leader():  # an artifact of the run
        datasets.router.save(workdir / "router.safetensors")
      # Only now, with the state restored, are the records past its step dropped.
      writer = metrics_lib.MetricsWriter(workdir, keep_through=start if resumed else start - 1)
      record = _start_record(program, model_cfg, config, compiled, state, peak)
      if config.outer.kind == "dipaco":
        record.update(datasets.describe())
      writer.write(start, record)
      with jax.transfer_guard("disallow"):  # a host sync hidden in the step is an error
        return _loop(config, program, runner, state, next_sequence, datasets, checkpointer,
                     writer, model_cfg, peak, preemption)
  finally:  # also on a crash: finish in-flight checkpoint writes, flush metrics
    if writer is not None:
      writer.close()
    checkpointer.close()


class _Reader:
  """Reads the pending train metrics at a boundary: one record per read, checked finite."""

  def __init__(self, config, program, checkpointer, writer, flops, peak):
    self.t, self.program, self.checkpointer, self.writer = config.train, program, checkpointer, writer
    self.flops, self.peak = flops, peak
    self.skipped = writer.last("train/skipped_steps", 0)
    self.timer, self.timed_steps = time.perf_counter(), 0

  def read(self, pending, extra=None) -> dict:
    """The record of the last pending step with `extra`, written; NonFinite under nan_policy
    'stop'."""
    skipped, record = 0, {}
    for logged_step, m in jax.device_get(pending):
      record = self.program.annotate(logged_step, {k: float(v) for k, v in m.items()})
      skipped += int(record.pop("train/skipped", 0))
      bad = guard.first_non_finite(record) if self.t.nan_policy == "stop" else None
      if bad:
        self.writer.write(logged_step, record)
        self.stop(f"{bad} is {record[bad]}", logged_step)
    self.timed_steps += len(pending)
    elapsed = (time.perf_counter() - self.timer) / self.timed_steps
    record.update({"train/step_time_s": elapsed,
                   "train/tokens_per_s": self.t.batch_size * self.t.seq_len / elapsed,
                   "train/mfu": self.flops / elapsed / (self.peak * self.program.mesh.devices.size),
                   **metrics_lib.device_memory(), **(extra or {})})
    if self.t.nan_policy == "skip":
      self.skipped += skipped
      record.update({"train/skipped": skipped, "train/skipped_steps": self.skipped})
    self.writer.write(logged_step, record)
    self.timer, self.timed_steps = time.perf_counter(), 0
    return record

  def stop(self, what, step):
    raise guard.NonFinite(guard.stop_line(what, step, self.t.nan_policy,
                                          self.checkpointer.latest_step(),
                                          self.checkpointer.workdir / "checkpoints"))

  def save(self, step, state, next_sequence, *, force=False, wait=False):
    """Saves `state` at `step` once it is known to be finite."""
    if not bool(jax.device_get(guard.all_finite(guard.device_leaves(state)))):
      self.stop("the state (parameters or optimizer moments) is not finite", step)
    self.checkpointer.save(step, state, {"next_sequence": next_sequence}, force=force, wait=wait)


def _loop(config, program, runner, state, next_sequence, datasets, checkpointer, writer,
          model_cfg, peak, preemption):
  t = config.train
  start = int(jax.device_get(state["step"]))
  flops = metrics_lib.train_flops_per_step(model_cfg, t.batch_size, t.seq_len)
  reader = _Reader(config, program, checkpointer, writer, flops, peak)
  pending, last, share = [], {}, row_share(program, config)
  first_sequence = next_sequence
  make_batch = lambda step: datasets.train_batch(  # noqa: E731
      first_sequence + (step - start) * t.batch_size, t.batch_size, rows=_rows(share))
  bar = tqdm.tqdm(total=t.steps, initial=start, desc="train", unit="step", mininterval=2,
                  disable=not distributed.is_leader())
  # Host batches are built a few steps ahead on a thread: data/wait_s is what the loop still
  # waited for them, per step (0 when the host keeps up).
  batches = data_lib.Prefetcher(make_batch, start, t.steps, depth=config.data.prefetch)
  try:
    for step, batch in batches:
      if preemption.requested(step):
        _stop_preempted(preemption, reader, pending, step, start, program.saved_view(state),
                        next_sequence)
      next_sequence += t.batch_size
      state, metrics = runner(state, parts_lib.device_batch(batch, program.batch_sharding,
                                                                  share))
      pending.append((step + 1, metrics))
      done = step + 1
      log = done % t.log_every == 0 or done == t.steps
      evaluate_now = done % t.eval_every == 0 or done == t.steps
      save = done % config.checkpoint.every == 0 or done == t.steps
      if log or evaluate_now or save:  # the host reads the metrics anyway: check them here
        data_record = {"data/wait_s": batches.take_wait_s() / len(pending), **datasets.stats()}
        last.update(reader.read(pending, data_record))
        bar.set_postfix(loss=f"{last['train/loss']:.3f}")
        pending = []
      if evaluate_now:
        record = evaluate(program, state, datasets, config)
        writer.write(done, record)
        if guard.first_non_finite(record):
          reader.stop(f"eval/loss is {record['eval/loss']}", done)
        if config.outer.early_stopping:
          state = program.early_stop(state, record)
        last.update(record)
      if save:
        reader.save(done, program.saved_view(state), next_sequence, force=done == t.steps)
      if not pending:  # eval and checkpoint time stay out of the next interval's step time
        reader.timer = time.perf_counter()
      bar.update(1)
  finally:  # before any stop line: the bar is not redrawn after it
    bar.close()
    batches.close()
  # What each process read: on several processes its share of the rows, not the whole corpus.
  writer.write(t.steps, distributed.per_process(datasets.stats()))
  return {**last, "params": _sample_params(program, state, config, datasets)}


def _sample_params(program, state, config, datasets):
  """The parameters the end-of-run sample uses: DiPaCo's are the sample prompt's path."""
  if program.num_paths == 1 or not config.train.sample_prompt:
    return program.model_params(state)
  return program.path_params(state, routing.route_text(config, config.train.sample_prompt,
                                                       datasets.router))


def _stop_preempted(preemption, reader, pending, step, start, saved_state, next_sequence):
  """Saves the state after `step` steps (forced, waited for) and raises Preempted."""
  if pending:
    reader.read(pending)
  checkpointer = reader.checkpointer
  if step > start and checkpointer.latest_step() != step:
    reader.save(step, saved_state, next_sequence, force=True, wait=True)
  latest = checkpointer.latest_step()
  saved = (f"checkpoint {latest} is saved in {checkpointer.workdir / 'checkpoints'}"
           if latest is not None else "no step was trained, nothing to save")
  raise workdir_lib.Preempted(f"lcjax: {preemption.signal_name} at step {step}: {saved}; run the "
                              "same command to resume")
