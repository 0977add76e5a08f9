"""Sampling from a workdir (lcjax/sample.py): offloaded and DiLoCo runs sample the parameters
their evaluation uses (a DiLoCo run's shared ones, an offloaded run's master ones), read alone
from the latest checkpoint; sampling writes nothing into the workdir, not even when it refuses
one (tests/test_train.py samples a plain run).

The reference reads the checkpoint with orbax directly and runs `generate` on those parameters;
greedy sampling must give the same text. Each run trains 3 steps inside its one test, so it
trains once under xdist too."""
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from lcjax import config as config_lib
from lcjax import sample as sample_lib
from lcjax.train import prepare, train_and_evaluate

PROMPT = "def "


def _three_steps(config):
  config.train.steps = 3
  config.checkpoint.every = 3
  config.train.sample_prompt = ""
  return config


def _snapshot(directory):
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


def _saved_state(workdir, step):
  """The whole saved state of checkpoint `step`, read by orbax alone, on the host."""
  path = pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state"
  return jax.device_get(ocp.StandardCheckpointer().restore(path))


def _by_path(tree) -> dict:
  """{"a/b/0": leaf}: orbax reads integer dict keys back as strings, so trees compare by path."""
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_leaves(a, b):
  a, b = _by_path(a), _by_path(b)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _sample_and_reference(config, workdir, shared_path, monkeypatch):
  """(sample_from_workdir's text, generate's text on the saved `shared_path` parameters, the
  saved state, those saved parameters); sample_from_workdir must pass generate exactly those."""
  given = []
  generate = sample_lib.generate

  def spy(model_cfg, mesh, params, *args, **kwargs):
    given.append(jax.device_get(params))
    return generate(model_cfg, mesh, params, *args, **kwargs)

  before = _snapshot(workdir)
  monkeypatch.setattr(sample_lib, "generate", spy)
  text = sample_lib.sample_from_workdir(workdir, PROMPT, 5, 0.0)
  monkeypatch.undo()
  assert _snapshot(workdir) == before  # read only
  assert len(given) == 1

  saved = _saved_state(workdir, 3)
  shared = saved
  for key in shared_path:
    shared = shared[key]
  _assert_same_leaves(given[0], shared)
  # The saved values in the model's own tree structure (integer level keys).
  by_path = _by_path(shared)
  params = jax.tree.unflatten(jax.tree.structure(given[0]),
                              [by_path[k] for k in _by_path(given[0])])
  prepared = prepare(config, with_data=False)
  replicated = jax.sharding.NamedSharding(prepared.mesh, jax.sharding.PartitionSpec())
  reference = generate(prepared.model_cfg, prepared.mesh, jax.device_put(params, replicated),
                       prepared.tokenizer, PROMPT, 5, context=config.train.seq_len,
                       temperature=0.0)
  return text, reference, saved, shared


def test_a_diloco_run_samples_its_shared_parameters(tmp_path, monkeypatch):
  config = _three_steps(tiny_config())
  config.mesh.update(replica=2, data=1, fsdp=4)
  config.outer.update(kind="diloco", inner_steps=2)
  train_and_evaluate(config, tmp_path)
  text, reference, saved, shared = _sample_and_reference(config, tmp_path, ("outer", "params"),
                                                         monkeypatch)
  assert text.startswith(PROMPT) and len(text) > len(PROMPT)
  assert text == reference
  # Step 3 is one inner step past the step-2 sync: each island has moved away from theta, so
  # the parameters sampled (equal to theta) are not an island's.
  island, theta = _by_path(jax.tree.map(lambda x: x[0], saved["params"])), _by_path(shared)
  assert sorted(island) == sorted(theta)
  assert any(not np.array_equal(island[k], theta[k]) for k in theta)


def test_an_offload_run_samples_its_master_parameters(tmp_path, monkeypatch):
  config = _three_steps(tiny_config())
  config.optim.update(offload=True, update_on="alternate", subgroup_mb=0.01, h2d_gbps=10.0,
                      d2h_gbps=10.0, host_update_gbps=1.0, device_update_gbps=100.0)
  train_and_evaluate(config, tmp_path)
  text, reference, saved, _ = _sample_and_reference(config, tmp_path, ("params",), monkeypatch)
  assert "compute" not in saved  # the device's compute copy is derived, not saved
  assert text.startswith(PROMPT) and len(text) > len(PROMPT)
  assert text == reference


def test_a_workdir_without_config_is_refused_and_left_empty(tmp_path):
  with pytest.raises(ValueError, match="config.json not found; --workdir must be a directory"):
    sample_lib.sample_from_workdir(tmp_path, PROMPT, 5, 0.0)
  assert list(tmp_path.iterdir()) == []


def test_a_workdir_without_checkpoints_is_refused_without_writing(tmp_path):
  # A plain run that stopped before its first checkpoint: only its config.json.
  (tmp_path / "config.json").write_text(
      json.dumps(config_lib.validate(tiny_config()).to_dict(), indent=2, sort_keys=True))
  before = _snapshot(tmp_path)
  with pytest.raises(ValueError, match="has no checkpoint yet; train first"):
    sample_lib.sample_from_workdir(tmp_path, PROMPT, 5, 0.0)
  # sampling sets its own batch size and mesh, but writes neither into the run's config
  assert _snapshot(tmp_path) == before
  assert not (tmp_path / "checkpoints").exists()
