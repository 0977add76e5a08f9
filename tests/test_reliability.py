"""Fault drills (docs/reliability.md): a NaN injected at a chosen step (stop: the run stops, every
checkpoint left is finite, rotation kept the last finite one; skip: the run goes on with the
step counted), SIGINT and SIGTERM mid-run (a checkpoint at the next step boundary, exit 75, and
the resumed run logs exactly the uninterrupted run's losses), a second signal (exits at once),
two runs on one workdir (the second stops in one line), a torn metrics line (dropped, the
resume goes on; TensorBoard holds each point once)."""
import dataclasses
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import read_losses, tiny_config
from lcjax import data as data_lib
from lcjax import guard
from lcjax import main as main_lib
from lcjax import parts as parts_lib
from lcjax import workdir as workdir_lib
from lcjax.train import prepare, train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
B = 8  # tiny_config's batch


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
  """The uninterrupted tiny run (6 steps, checkpoints at 3 and 6): its losses."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  train_and_evaluate(tiny_config(), workdir)
  return read_losses(workdir)


def _strict_records(workdir):
  """metrics.jsonl read as strict JSON (a bare NaN is an error), every line whole."""
  text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
  assert text.endswith("\n")

  def refuse(constant):
    raise AssertionError(f"metrics.jsonl holds a bare {constant}")

  return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def _saved_state(workdir, step):
  path = pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state"
  return jax.device_get(ocp.StandardCheckpointer().restore(path))


def _poison_step(monkeypatch, config, step):
  """Makes the loss (and so every gradient) of training step `step` (1-based) NaN: the loss
  function multiplies by NaN when it sees that step's batch."""
  poison = prepare(config).datasets.train_batch((step - 1) * B, B)["inputs"]
  model_parts = parts_lib.model_parts

  def poisoned_parts(*args, **kwargs):
    parts = model_parts(*args, **kwargs)
    loss_fn = parts.loss_fn

    def loss(params, batch):
      objective, (cross_entropy, count) = loss_fn(params, batch)
      factor = jnp.where(jnp.all(batch["inputs"] == poison), jnp.nan, 1.0)
      return objective * factor, (cross_entropy * factor, count)

    return dataclasses.replace(parts, loss_fn=loss)

  monkeypatch.setattr(parts_lib, "model_parts", poisoned_parts)


def test_nan_stops_the_run_and_every_checkpoint_is_finite(tmp_path, monkeypatch):
  config = tiny_config()
  # Metrics are read only at checkpoint boundaries (2, 4, 6) and one checkpoint is kept: the
  # NaN of step 3 is seen at step 4, before its save, so rotation never drops checkpoint 2.
  config.train.update(log_every=100, eval_every=100)
  config.checkpoint.update(every=2, keep=1)
  _poison_step(monkeypatch, config, 3)
  with pytest.raises(guard.NonFinite) as stop:
    train_and_evaluate(config, tmp_path)
  line = str(stop.value)
  assert line.startswith("lcjax: error: train/loss is nan at step 3")
  assert "the last finite checkpoint is step 2" in line and "\n" not in line
  assert stop.value.code == guard.EXIT_NON_FINITE
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  saved = _saved_state(tmp_path, 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved) if x.dtype.kind == "f")
  records = {r["step"]: r for r in _strict_records(tmp_path) if "train/loss" in r}
  assert records[3]["train/loss"] is None  # NaN is written as null


def test_nan_skip_drops_the_update_and_counts_it(tmp_path, monkeypatch, straight):
  config = tiny_config()
  config.train.nan_policy = "skip"
  _poison_step(monkeypatch, config, 3)
  result = train_and_evaluate(config, tmp_path)
  records = {r["step"]: r for r in _strict_records(tmp_path) if "train/loss" in r}
  assert sorted(records) == list(range(1, 7))
  assert records[3]["train/loss"] is None and records[3]["train/skipped"] == 1
  assert [records[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
  assert all(np.isfinite(records[s]["train/loss"]) for s in (1, 2, 4, 5, 6))
  assert [records[s]["train/loss"] for s in (1, 2)] == [straight[1], straight[2]]
  # Step 4 trains the parameters of step 2 (step 3's update was dropped) on batch 4.
  assert records[4]["train/loss"] != straight[4]
  assert np.isfinite(result["eval/loss"])
  saved = _saved_state(tmp_path, 6)
  assert int(saved["step"]) == 6
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved) if x.dtype.kind == "f")


def _tensorboard_points(workdir) -> list:
  """(tag, step) of every scalar in the run's TensorBoard event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  points = []
  for path in sorted((pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      points += [(v.tag, event.step) for v in event.summary.value]
      i += 12 + n + 4
  return points


def test_sigint_saves_at_the_next_step_and_the_resume_is_exact(tmp_path, monkeypatch, straight,
                                                               capsys):
  handler = signal.getsignal(signal.SIGINT)
  train_batch = data_lib.Datasets.train_batch

  def interrupted(self, first, size, rows=None):  # a real SIGINT while step 5's batch is built:
    if first == 4 * B:                             # the run stops after step 4, before step 5
      os.kill(os.getpid(), signal.SIGINT)
    return train_batch(self, first, size, rows)

  monkeypatch.setattr(data_lib.Datasets, "train_batch", interrupted)
  config = tiny_config()
  config.data.prefetch = 0  # step 5's batch is built just before step 5, not ahead of it
  with pytest.raises(workdir_lib.Preempted) as stop:
    train_and_evaluate(config, tmp_path)
  monkeypatch.undo()
  assert stop.value.code == workdir_lib.EXIT_PREEMPTED == 75
  assert str(stop.value).startswith("lcjax: SIGINT at step 4: checkpoint 4 is saved in ")
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 4]
  assert sorted(read_losses(tmp_path)) == [1, 2, 3, 4]
  assert signal.getsignal(signal.SIGINT) is handler  # the run put the handlers back
  # A run killed while writing a record leaves a torn last line: dropped, with a warning.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "train/lo')
  capsys.readouterr()
  train_and_evaluate(tiny_config(), tmp_path)
  out = capsys.readouterr().out
  assert "dropped the torn last line" in out and "resumed from step 4" in out
  assert read_losses(tmp_path) == straight  # bitwise: steps 1-6, each once
  steps = [r["step"] for r in _strict_records(tmp_path) if "train/loss" in r]
  assert steps == list(range(1, 7))
  points = _tensorboard_points(tmp_path)
  assert len(points) == len(set(points))  # no point twice after the resume
  assert sorted(s for tag, s in points if tag == "train/loss") == list(range(1, 7))


# The tiny config, its batches slowed down, and step 5's batch held back until the file named by
# LCJAX_TEST_RELEASE exists: a signal lands mid-run, at a known step.
SLOW_CONFIG = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_config
from lcjax import data

_train_batch = data.Datasets.train_batch


def _slow(self, first, size, rows=None):
  time.sleep(0.2)
  release = os.environ["LCJAX_TEST_RELEASE"]
  if first == 4 * size:
    open(release + ".waiting", "w").close()
  while first == 4 * size and not os.path.exists(release):
    time.sleep(0.1)
  return _train_batch(self, first, size, rows)


data.Datasets.train_batch = _slow


def get_config():
  config = tiny_config()
  config.data.prefetch = 0  # step 5's batch is held back just before step 5, not ahead
  return config
"""
PLAIN_CONFIG = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_config


def get_config():
  return tiny_config()
"""


def _start(tmp_path, workdir):
  config = tmp_path / "slow.py"
  config.write_text(SLOW_CONFIG)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", LCJAX_TEST_RELEASE=str(tmp_path / "release"))
  return subprocess.Popen([sys.executable, "-m", "lcjax.main", f"--config={config}",
                           f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process, timeout=300):
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.1)


def _logged(workdir) -> int:
  """How many train records a running run has written (a line being written is not counted)."""
  path = workdir / "metrics.jsonl"
  lines = path.read_text().split("\n")[:-1] if path.exists() else []
  return sum('"train/loss"' in line for line in lines)


def test_sigterm_mid_run_saves_refuses_a_second_run_and_resumes_exactly(tmp_path, straight,
                                                                        capsys):
  workdir = tmp_path / "run"
  process = _start(tmp_path, workdir)
  try:
    _wait_for(lambda: (tmp_path / "release.waiting").exists(), process)  # held before step 5
    assert _logged(workdir) == 4
    # A second run on the same workdir stops at its lock, naming the first's pid.
    config = tmp_path / "tiny.py"
    config.write_text(PLAIN_CONFIG)
    assert main_lib.main(["lcjax", f"--config={config}", f"--workdir={workdir}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lcjax: error: --workdir={workdir} is in use by process {process.pid} (it "
                   f"holds {workdir / '.lock'}); wait for that run to end, stop it, or use "
                   "another --workdir"]
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    (tmp_path / "release").touch()
    _, stderr = process.communicate(timeout=300)
  finally:
    process.kill()
  assert process.returncode == 75, stderr[-3000:]
  assert stderr.strip().splitlines()[-1].startswith(
      "lcjax: SIGTERM at step 4: checkpoint 4 is saved in "), stderr[-3000:]
  assert "Traceback" not in stderr
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 4]
  assert sorted(read_losses(workdir)) == [1, 2, 3, 4]
  train_and_evaluate(tiny_config(), workdir)
  assert read_losses(workdir) == straight
  steps = [r["step"] for r in _strict_records(workdir) if "train/loss" in r]
  assert steps == list(range(1, 7))  # the refused run interleaved nothing


def test_a_second_signal_exits_at_once(tmp_path):
  workdir = tmp_path / "run"
  process = _start(tmp_path, workdir)
  try:
    # config.json is written just before the handlers go in: signal during the compile
    _wait_for(lambda: (workdir / "config.json").exists(), process)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == "lcjax: SIGINT again: exiting at once, without saving"
  assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
