"""Checkpoint compatibility (lcjax/checkpoint.py): a run resumes after any change that leaves
the saved tree (structure, shapes, dtypes) and the data stream alone, and refuses in one line
naming the config key after any change of either, leaving the workdir as it was.

Each run trains once per session for 4 steps with a checkpoint at step 3; every test works on a
copy cut back to that checkpoint (a run killed after it). A resume runs one step: its step-4
loss is the loss of the restored parameters on batch 4, so it must equal the straight run's,
whatever the change. A refusal is checked where the run makes it, before its first step
(checkpointer and program.init), so no step is compiled for it; one test refuses end to end."""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import read_losses, tiny_config
from lcjax import checkpoint as checkpoint_lib
from lcjax import program as program_lib
from lcjax.train import prepare, train_and_evaluate


def _config(**mesh):
  c = tiny_config()
  c.mesh.update(**mesh)
  c.train.update(steps=4, eval_every=4)
  c.checkpoint.update(every=3, keep=5)
  return c


SP_MESH = {"data": 1, "fsdp": 2, "ring": 2, "ulysses": 2}


def _train(workdir, config):
  train_and_evaluate(config, workdir)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "4"]
  return workdir


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory):
  return _train(tmp_path_factory.mktemp("plain") / "run", _config())


def _killed_after_step_3(run, tmp_path):
  """A copy of `run` as if it had been killed after its step-3 checkpoint."""
  workdir = tmp_path / run.name
  shutil.copytree(run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  metrics = workdir / "metrics.jsonl"
  kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 3]
  metrics.write_text("".join(line + "\n" for line in kept))
  return workdir


def _resume(config, workdir, capsys):
  """The step-4 loss of resuming the copy `workdir` with `config`."""
  before = read_losses(workdir)
  assert sorted(before) == [1, 2, 3]
  train_and_evaluate(config, workdir)
  assert "resumed from step 3" in capsys.readouterr().out
  after = read_losses(workdir)
  assert sorted(after) == [1, 2, 3, 4]
  assert {s: after[s] for s in before} == before  # the records up to the checkpoint are kept
  return after[4]


@pytest.mark.parametrize("change", [
    lambda c: c.model.update(remat="full"),
    lambda c: c.model.update(attention="reference"),
    lambda c: c.model.update(mlp_chunks=2),
    lambda c: c.model.update(loss_chunks=2),
    lambda c: c.mesh.update(data=4, fsdp=2),
], ids=["remat", "attention", "mlp_chunks", "loss_chunks", "mesh"])
def test_resumes_after_a_change_that_keeps_the_saved_tree(change, plain_run, tmp_path, capsys):
  config = _config()
  change(config)
  loss = _resume(config, _killed_after_step_3(plain_run, tmp_path), capsys)
  np.testing.assert_allclose(loss, read_losses(plain_run)[4], rtol=2e-5)


@pytest.mark.parametrize("strategy, layout", [("ring", "contiguous")])
def test_resumes_after_a_sequence_parallel_change(strategy, layout, tmp_path, capsys):
  # The sequence-parallel run trains inside its one test, so it trains once under xdist too.
  straight = _train(tmp_path / "straight", _config(**SP_MESH))  # sp.strategy usp, layout zigzag
  config = _config(**SP_MESH)
  config.sp.update(strategy=strategy, layout=layout)
  loss = _resume(config, _killed_after_step_3(straight, tmp_path / "resumed"), capsys)
  np.testing.assert_allclose(loss, read_losses(straight)[4], rtol=2e-5)


def _diloco(c):
  c.mesh.update(replica=2, data=1, fsdp=4)
  c.outer.update(kind="diloco", inner_steps=2)


def _snapshot(directory):
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


# (change, what the one-line message must say)
REFUSALS = {
    "num_layers": (lambda c: c.model.update(num_layers=3),
                   r"cannot resume: .* \(2, .*in the checkpoint but \(3, .*"
                   r"model\.num_layers 2 -> 3"),
    "embed_dim": (lambda c: c.model.update(embed_dim=64),
                  r"cannot resume: .*32\) float32 in the checkpoint but .*64\) float32 .*"
                  r"model\.embed_dim 32 -> 64"),
    "vocab_size": (lambda c: c.model.update(vocab_size=512),
                   r"cannot resume: .*\(384, 32\) float32 in the checkpoint but \(512, 32\) .*"
                   r"model\.vocab_size 0 -> 512"),
    "replica": (_diloco, r"cannot resume: .*mesh\.replica 1 -> 2.*outer\.kind 'none' -> 'diloco'"),
    "data_source": (lambda c: c.data.update(max_documents=20),
                    r"holds a run with data\.max_documents=30, but this config has 20"),
    "seed": (lambda c: c.train.update(seed=1),
             r"holds a run with train\.seed=0, but this config has 1"),
}


def _resume_program(config, workdir):
  """What train_and_evaluate does before its first step to resume `workdir` (without compiling
  the step): the checkpointer's data-stream check, then program.init from this run's latest
  checkpoint, which checks the saved tree."""
  prepared = prepare(config, with_data=False)
  checkpointer = checkpoint_lib.Checkpointer(workdir, prepared.config)
  try:
    with jax.set_mesh(prepared.mesh):
      program = program_lib.build(prepared, aot=True)
      return program.init(program_lib.ThisRun(checkpointer, checkpointer.latest_step()))
  finally:
    checkpointer.close()


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refuses_naming_the_key(name, plain_run, tmp_path):
  change, message = REFUSALS[name]
  workdir = _killed_after_step_3(plain_run, tmp_path)
  before = _snapshot(workdir)
  config = _config()
  change(config)
  with pytest.raises(ValueError, match=message) as error:
    _resume_program(config, workdir)
  assert "\n" not in str(error.value)
  assert "use a new --workdir" in str(error.value)
  assert _snapshot(workdir) == before


def test_the_unchanged_config_restores_the_saved_state_onto_another_mesh(plain_run, tmp_path):
  workdir = _killed_after_step_3(plain_run, tmp_path)
  config = _config()
  config.mesh.update(data=1, fsdp=8)
  state, next_sequence = _resume_program(config, workdir)
  assert int(state["step"]) == 3 and next_sequence == 3 * config.train.batch_size
  assert state["params"]["embed"]["embedding"].sharding.spec == P(None, "fsdp")
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  reader = checkpoint_lib.Checkpointer(workdir, config, read_only=True)
  try:
    saved, position = reader.restore(3, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), state))
  finally:
    reader.close()
  assert position == {"next_sequence": next_sequence}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(saved))


@pytest.mark.parametrize("name", ["seed", "embed_dim"])
def test_a_refused_run_writes_nothing(name, plain_run, tmp_path):
  workdir = tmp_path / "run"  # killed after logging step 4, before its step-4 checkpoint
  shutil.copytree(plain_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  before = _snapshot(workdir)
  config = _config()
  REFUSALS[name][0](config)
  with pytest.raises(ValueError, match=REFUSALS[name][1]):
    train_and_evaluate(config, workdir)
  assert _snapshot(workdir) == before


def _tree(**leaves):
  """{"a/b": (shape, dtype)} -> the nested tree of ShapeDtypeStructs."""
  tree = {}
  for path, (shape, dtype) in leaves.items():
    *parents, last = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = jax.ShapeDtypeStruct(shape, dtype)
  return tree


def test_first_difference():
  saved = _tree(**{"params/w": ((2, 3), jnp.float32), "params/b": ((3,), jnp.float32),
                   "step": ((), jnp.int32)})
  assert checkpoint_lib.first_difference(saved, saved) is None
  # concrete arrays compare by shape and dtype only
  assert checkpoint_lib.first_difference(
      saved, jax.tree.map(lambda x: np.ones(x.shape, x.dtype), saved)) is None
  fewer = _tree(**{"params/w": ((2, 3), jnp.float32), "step": ((), jnp.int32)})
  assert checkpoint_lib.first_difference(saved, fewer) == \
      "the checkpoint holds params/b, which this config does not build"
  assert checkpoint_lib.first_difference(fewer, saved) == \
      "this config builds params/b, which the checkpoint does not hold"
  wider = _tree(**{"params/w": ((2, 4), jnp.float32), "params/b": ((3,), jnp.float32),
                   "step": ((), jnp.int32)})
  assert checkpoint_lib.first_difference(saved, wider) == \
      "params/w is (2, 3) float32 in the checkpoint but (2, 4) float32 in this config"
  narrower = _tree(**{"params/w": ((2, 3), jnp.bfloat16), "params/b": ((3,), jnp.float32),
                      "step": ((), jnp.int32)})
  assert checkpoint_lib.first_difference(saved, narrower) == \
      "params/w is (2, 3) float32 in the checkpoint but (2, 3) bfloat16 in this config"
  # several differences: the first path in sorted order is named
  both = _tree(**{"params/w": ((2, 4), jnp.float32), "params/b": ((4,), jnp.float32),
                  "step": ((), jnp.int32)})
  assert checkpoint_lib.first_difference(saved, both).startswith("params/b is (3,)")
  # sequence indices (optax states are tuples) are path components too
  assert checkpoint_lib.first_difference(
      {"opt": (jax.ShapeDtypeStruct((2,), jnp.float32),)},
      {"opt": (jax.ShapeDtypeStruct((3,), jnp.float32),)}).startswith("opt/0 is (2,)")


def test_data_stream_keys_are_config_keys():
  from lcjax import config as config_lib
  flat = checkpoint_lib._flat(config_lib.base_config().to_dict())
  assert set(checkpoint_lib.DATA_STREAM_KEYS) <= set(flat)
