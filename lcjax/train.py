"""`train_and_evaluate(config, workdir)`: the training loop, importable from a Colab.

Per step: the global batch for that step (a pure function of seed and step), one jitted,
donated train step, metrics read one log interval late so the device is never idle waiting for
the host. Every eval_every steps and at the end: held-out loss. Every checkpoint.every steps and
at the end: a checkpoint; rerunning with the same workdir resumes from the latest.
"""
import math
import pathlib
import time

import jax
import numpy as np
import tqdm

from lcjax import checkpoint as checkpoint_lib
from lcjax import config as config_lib
from lcjax import data as data_lib
from lcjax import mesh as mesh_lib
from lcjax import metrics as metrics_lib
from lcjax import ops
from lcjax import sample as sample_lib
from lcjax import step as step_lib
from lcjax.model import ModelConfig


def _check_batch(config, mesh):
  divisor = mesh_lib.batch_divisor(mesh)
  if config.train.batch_size % divisor:
    raise ValueError(f"train.batch_size ({config.train.batch_size}) must be a multiple of the "
                     f"batch-sharding mesh axes replica*data*fsdp = {divisor}")


def _sequence_layout(config):
  """The token permutation of sequence parallelism (None when it is off)."""
  ring, ulysses = config.mesh.ring, config.mesh.ulysses
  if ring * ulysses == 1:
    return None
  return np.asarray(ops.sequence_layout(config.train.seq_len, ring, ulysses, config.sp.layout))


def prepare(config):
  """(validated config, mesh, datasets in the sequence layout, model config): what every entry
  point (training, tests, benchmarks) builds before the steps."""
  config = config_lib.validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  _check_batch(config, mesh)
  datasets = data_lib.build(config.data, config.train.seq_len, config.train.seed,
                            layout=_sequence_layout(config))
  return config, mesh, datasets, ModelConfig.from_config(config, datasets.tokenizer.vocab_size)


def evaluate(steps, params, datasets, config) -> dict:
  """Exact held-out mean loss over the evaluated tokens (not a mean of batch means)."""
  sums = jax.device_get([  # all batches dispatched first, then one host sync
      steps.eval(params, step_lib.device_batch(batch, steps.batch_sharding))
      for batch in datasets.eval_batches(config.train.batch_size, config.train.eval_batches)])
  loss_sum = sum(float(s) for s, _ in sums)
  count = sum(float(c) for _, c in sums)
  loss = loss_sum / max(count, 1.0)
  record = {"eval/loss": loss, "eval/tokens": count}
  if datasets.tokenizer.is_bytes:
    record["eval/bits_per_byte"] = loss / math.log(2)  # byte tokens: one target = one byte (or EOS)
  return record


def _start_record(steps, model_cfg, config, compiled, state, peak_flops):
  tokens = config.train.batch_size * config.train.seq_len
  record = {"model/params": model_cfg.param_count(),
            "model/flops_per_step": metrics_lib.train_flops_per_step(
                model_cfg, config.train.batch_size, config.train.seq_len),
            "model/tokens_per_step": tokens, "mesh": mesh_lib.describe(steps.mesh),
            "device/peak_flops": peak_flops, "device/count": steps.mesh.devices.size,
            **metrics_lib.compiled_memory(compiled)}
  # The fp32 parameters are the master weights: with the moments, the optimizer's state. A dry
  # run's abstract state carries the shardings (memory kinds) the live one would have.
  optimizer_state = {"params": state["params"], "opt_state": state["opt_state"]}
  record.update(metrics_lib.state_bytes_by_memory_kind(optimizer_state))
  record.update(steps.describe())
  if steps.offload is not None and "compute" in state:  # a live state, not a dry run's
    record["optim/measured_update_s"] = steps.offload.measure_update_s(state)
  return record


def _start_from_plain_run(steps, workdir, step=0):
  """DiLoCo's warm start: a plain run's checkpoint (0: its latest) becomes every island's state."""
  abstract_plain, convert = steps.from_plain
  step, state, position = checkpoint_lib.restore_other(workdir, abstract_plain, step)
  print(f"[lcjax] every island starts from step {step} of {workdir}")
  return convert(state), position["next_sequence"]


def train_and_evaluate(config, workdir, *, dry_run: bool = False) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last train and eval metrics."""
  config, mesh, datasets, model_cfg = prepare(config)
  workdir = pathlib.Path(workdir)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config)
  writer = None
  try:
    with jax.set_mesh(mesh):
      steps = step_lib.build(model_cfg, config, mesh)
      abstract_batch = step_lib.abstract_batch(config.train.batch_size, config.train.seq_len,
                                               steps.batch_sharding)
      runner, compiled = steps.compile(abstract_batch)
      latest = checkpointer.latest_step()
      writer = metrics_lib.MetricsWriter(workdir, resume_step=latest)
      peak = config.train.peak_flops or metrics_lib.measure_peak_flops(mesh, model_cfg.compute_dtype)
      if dry_run:
        record = _start_record(steps, model_cfg, config, compiled, steps.abstract_state, peak)
        writer.write(latest or 0, {"dry_run": True, **record})
        return record
      if latest is None and config.outer.init_from:
        state, next_sequence = _start_from_plain_run(steps, config.outer.init_from,
                                                     config.outer.init_step)
      elif latest is None:
        state, next_sequence = steps.init(), 0
      else:
        state, position = checkpointer.restore(latest, steps.abstract_state)
        state = steps.attach(state)
        next_sequence = position["next_sequence"]
        print(f"[lcjax] resumed from step {latest} in {workdir}")
        if latest >= config.train.steps:
          print(f"[lcjax] the run is complete (train.steps={config.train.steps}); raise "
                "--config.train.steps to train further")
      writer.write(int(state["step"]), _start_record(steps, model_cfg, config, compiled, state, peak))
      result = _loop(config, steps, runner, state, next_sequence, datasets, checkpointer,
                     writer, model_cfg, peak)
  finally:  # also on a crash: finish in-flight checkpoint writes, flush metrics
    if writer is not None:
      writer.close()
    checkpointer.close()
  if config.train.sample_prompt:
    text = sample_lib.generate(model_cfg, steps.mesh, result.pop("params"), datasets.tokenizer,
                               config.train.sample_prompt, config.train.sample_tokens,
                               context=config.train.seq_len, seed=config.train.seed)
    (workdir / "sample.txt").write_text(text)
  result.pop("params", None)
  result["data/unigram_entropy"] = datasets.unigram_entropy()
  return result


def _loop(config, steps, compiled, state, next_sequence, datasets, checkpointer, writer,
          model_cfg, peak):
  t = config.train
  start = int(state["step"])
  flops = metrics_lib.train_flops_per_step(model_cfg, t.batch_size, t.seq_len)
  pending, last = [], {}
  timer, timed_steps = time.perf_counter(), 0
  bar = tqdm.tqdm(total=t.steps, initial=start, desc="train", unit="step", mininterval=2)
  for step in range(start, t.steps):
    batch = datasets.train_batch(next_sequence, t.batch_size)
    next_sequence += t.batch_size
    state, metrics = compiled(state, step_lib.device_batch(batch, steps.batch_sharding))
    pending.append((step + 1, metrics))
    done = step + 1
    if done % t.log_every == 0 or done == t.steps:
      for logged_step, m in jax.device_get(pending):
        last = steps.annotate(logged_step, {k: float(v) for k, v in m.items()})
      timed_steps += len(pending)
      elapsed = (time.perf_counter() - timer) / timed_steps
      last.update({"train/step_time_s": elapsed,
                   "train/tokens_per_s": t.batch_size * t.seq_len / elapsed,
                   "train/mfu": flops / elapsed / (peak * steps.mesh.devices.size),
                   **metrics_lib.device_memory()})
      writer.write(logged_step, last)
      bar.set_postfix(loss=f"{last['train/loss']:.3f}")
      pending, timer, timed_steps = [], time.perf_counter(), 0
    if done % t.eval_every == 0 or done == t.steps:
      record = evaluate(steps, steps.eval_params(state), datasets, config)
      writer.write(done, record)
      last.update(record)
    if done % config.checkpoint.every == 0 or done == t.steps:
      checkpointer.save(done, steps.saved(state), {"next_sequence": next_sequence},
                        force=done == t.steps)
    if not pending:  # eval and checkpoint time stays out of the next interval's step time
      timer = time.perf_counter()
    bar.update(1)
  bar.close()
  return {**last, "params": steps.eval_params(state)}
