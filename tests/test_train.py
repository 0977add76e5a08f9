"""Training: overfits a fixed batch, stop + resume is exact, losses do not depend on the mesh,
dry run reports memory, and each bad input stops at start with a clear message."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from lcjax import config as config_lib
from lcjax import parts as parts_lib
from lcjax.train import prepare, train_and_evaluate
from conftest import read_losses as _losses, scratch_program, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_overfits_a_fixed_batch():
  c = tiny_config()
  c.train.update(steps=80, lr=1e-2, warmup_steps=5)
  prepared = prepare(c)
  c, mesh, ds, model_cfg = prepared
  with jax.set_mesh(mesh):
    program, state = scratch_program(prepared)
    batch = parts_lib.device_batch(ds.train_batch(0, 8), program.batch_sharding)
    losses = []
    for _ in range(80):
      state, m = program.step(state, batch)
      losses.append(float(m["train/loss"]))
  assert losses[0] > 5.0  # about log(384) at init
  assert losses[-1] < 0.35 * losses[0], losses[::10]


def test_stop_and_resume_logs_identical_losses(tmp_path, crash_on_evaluation):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train_and_evaluate(tiny_config(), straight)
  # The same run, killed during its second evaluation (step 6): its last checkpoint is step 3.
  disarm = crash_on_evaluation(2, KeyboardInterrupt())
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(tiny_config(), resumed)
  disarm()
  assert max(_losses(resumed)) >= 3
  result = train_and_evaluate(tiny_config(), resumed)
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  assert a == b  # bitwise: same data, same program, same state
  assert np.isfinite(result["eval/loss"])


def test_losses_do_not_depend_on_the_mesh(tmp_path):
  a = train_and_evaluate(tiny_config(), tmp_path / "fsdp")  # data 2 x fsdp 4
  b_config = tiny_config()
  b_config.mesh.update(data=1, fsdp=2, tensor=4)
  b = train_and_evaluate(b_config, tmp_path / "tensor")
  la, lb = _losses(tmp_path / "fsdp"), _losses(tmp_path / "tensor")
  np.testing.assert_allclose([lb[s] for s in sorted(lb)], [la[s] for s in sorted(la)], rtol=2e-5)
  assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=2e-5)


def test_dry_run_reports_compiled_memory(tmp_path):
  record = train_and_evaluate(tiny_config(), tmp_path, dry_run=True)
  for key in ("compile/temp_bytes", "compile/argument_bytes", "compile/output_bytes",
              "model/params", "model/flops_per_step", "optim/state_bytes_device"):
    assert record[key] > 0, key
  assert record["optim/state_bytes_host"] == 0
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
  written = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert written["compile/temp_bytes"] == record["compile/temp_bytes"]


def _bad(update):
  c = tiny_config()
  update(c)
  return c


@pytest.mark.parametrize("update, message", [
    (lambda c: c.mesh.update(data=3), "multiply to 12 but there are 8 devices"),
    (lambda c: c.model.update(num_kv_heads=3), r"num_heads \(4\) must be a multiple"),
    (lambda c: c.train.update(batch_size=6), r"batch_size \(6\) must be a multiple"),
    (lambda c: c.data.update(source="text", paths="/nonexistent/*.txt"), "matches no file"),
    (lambda c: c.model.update(vocab_size=100), r"smaller than the tokenizer's vocabulary \(259\)"),
    (lambda c: c.model.update(remat="sometimes"), "model.remat must be one of"),
])
def test_bad_config_values(tmp_path, update, message):
  with pytest.raises(ValueError, match=message):
    train_and_evaluate(_bad(update), tmp_path)


def test_unknown_key_is_rejected(tmp_path):
  c = tiny_config()
  c.model.num_layer = 3  # typo of num_layers
  with pytest.raises(ValueError, match="unknown config key 'model.num_layer'"):
    train_and_evaluate(c, tmp_path)


def _snapshot(directory):
  return {p: p.read_bytes() for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


def test_incompatible_and_corrupt_checkpoints_stop_without_overwriting(tmp_path):
  c = tiny_config()
  c.train.steps = 3
  train_and_evaluate(c, tmp_path)
  before = _snapshot(tmp_path / "checkpoints")
  changed = tiny_config()
  changed.model.embed_dim = 64
  with pytest.raises(ValueError, match=r"cannot resume: .*embed.* model.embed_dim 32 -> 64"):
    train_and_evaluate(changed, tmp_path)
  assert _snapshot(tmp_path / "checkpoints") == before
  for path in (tmp_path / "checkpoints" / "3" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.raises(ValueError, match="cannot be restored.*delete that step's directory"):
    train_and_evaluate(tiny_config(), tmp_path)


def test_cli_reports_an_unknown_override_in_one_line(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "lcjax.main", "--config=experiments/tiny_cpu.py",
       f"--workdir={tmp_path}", "--config.model.num_kv_heads=3"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("lcjax: error:") and "num_kv_heads (3)" in last, proc.stderr[-2000:]


def test_sampling_from_a_workdir(tmp_path):
  from lcjax.sample import sample_from_workdir
  c = tiny_config()
  c.train.steps = 3
  train_and_evaluate(c, tmp_path)
  greedy = [sample_from_workdir(tmp_path, "def f", 8, temperature=0.0) for _ in range(2)]
  assert greedy[0] == greedy[1] and greedy[0].startswith("def f")
  with pytest.raises(ValueError, match="no checkpoint yet"):
    sample_from_workdir(_empty_run(tmp_path / "empty"), "x", 1, temperature=0.0)


def _empty_run(workdir):
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config_lib.validate(tiny_config()).to_dict()))
  return workdir
