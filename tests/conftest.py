"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# JAX's persistent compilation cache for this pytest session: a program compiled once (a resume
# drill's straight and resumed runs, every test of the tiny model, the processes a test starts,
# which inherit these variables) is read back instead of compiled again. The directory is made by
# the first process (pytest-xdist's controller, whose environment the workers inherit) and
# removed when it exits: every session starts empty.
if "LCJAX_TEST_COMPILE_CACHE" not in os.environ:
  os.environ["LCJAX_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="lcjax-test-compiled-")
  atexit.register(shutil.rmtree, os.environ["LCJAX_TEST_COMPILE_CACHE"], True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ["LCJAX_TEST_COMPILE_CACHE"],
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # noqa: E402  (must follow the flags above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _eight_devices():
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices; see tests/conftest.py"


import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402


def tiny_config(**mesh):
  """The smallest model and run that exercise every part of a training step (2 layers, GQA)."""
  from lcjax import config as config_lib
  c = config_lib.base_config()
  c.train.update(steps=6, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=3,
                 eval_batches=1, log_every=1, sample_prompt="", peak_flops=1e9)
  c.checkpoint.update(every=3, keep=5)
  c.mesh.update(**{"data": 2, "fsdp": 4, **mesh})
  c.model.update(num_layers=2, num_levels=1, embed_dim=32, num_heads=4, num_kv_heads=2,
                 head_dim=8, mlp_dim=64)
  c.data.max_documents = 30
  return c


def tiny_outer_config(kind, **outer):
  """The tiny model on 4 islands of 2 devices, 6 steps, syncing every 2: outer.kind=kind."""
  c = tiny_config()
  c.mesh.update(replica=4, data=2, fsdp=1)
  c.train.update(steps=6, log_every=1, eval_every=3, batch_size=8)
  c.outer.update(kind=kind, inner_steps=2, **outer)
  return c


def wide_config(width: int):
  """2 layers of `width` (heads of 128, MLP 4096) on fsdp 4, 4 sequences: big enough per token
  that compile targets run out of memory at lengths that still compile fast."""
  c = tiny_config(data=1, fsdp=4)
  c.model.update(embed_dim=width, mlp_dim=4096, num_heads=width // 128,
                 num_kv_heads=width // 128, head_dim=128)
  c.train.batch_size = 4
  return c


def read_losses(workdir) -> dict:
  """{step: train/loss} from a run's metrics.jsonl."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def killed_and_resumed(config, tmp_path, crash_on_evaluation):
  """(straight, resumed) workdirs: `config` run through, and run again killed at its second
  evaluation, then resumed from its last checkpoint."""
  from lcjax.train import train_and_evaluate
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train_and_evaluate(config, straight)
  disarm = crash_on_evaluation(2, RuntimeError("simulated crash"))
  with pytest.raises(RuntimeError, match="simulated crash"):
    train_and_evaluate(config, resumed)
  disarm()
  train_and_evaluate(config, resumed)
  return straight, resumed


def scratch_program(prepared):
  """(program, state at step 0) of a prepared run; call under jax.set_mesh(prepared.mesh)."""
  from lcjax import program as program_lib
  program = program_lib.build(prepared)
  return program, program.init(program_lib.Scratch())[0]


def train_steps(config, n_steps=4):
  """(program, live state, losses) after n_steps from scratch, batch i = sequences 8i..8i+7."""
  from lcjax import parts as parts_lib
  from lcjax.train import prepare
  prepared = prepare(config)
  with jax.set_mesh(prepared.mesh):
    program, state = scratch_program(prepared)
    losses = []
    for i in range(n_steps):
      batch = parts_lib.device_batch(prepared.datasets.train_batch(i * 8, 8),
                                     program.batch_sharding)
      state, m = program.step(state, batch)
      losses.append(float(m["train/loss"]))
  return program, state, losses


@functools.cache
def full_forward(model_cfg):
  """Jitted full forward of `model_cfg`'s model: (params, tokens [B, T]) -> logits [B, T, V],
  positions 0..T-1, one document per row."""
  import jax.numpy as jnp
  from flax import nnx
  from lcjax import model as model_lib
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.create(model_cfg, 0)))

  @jax.jit
  def logits(params, tokens_BT):
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    return nnx.merge(graphdef, params)(tokens_BT, positions_BT, jnp.ones_like(tokens_BT))

  return logits


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture():
  return tiny_config


@pytest.fixture(name="read_losses")
def _read_losses_fixture():
  return read_losses


@pytest.fixture
def crash_on_evaluation(monkeypatch):
  """crash_on_evaluation(n, error) makes lcjax.train.evaluate raise `error` on its n-th call from
  then on, as if the run were killed there; it returns a function that undoes it."""
  from lcjax import train as train_lib
  original = train_lib.evaluate

  def arm(n, error):
    calls = []

    def evaluate(*args, **kwargs):
      calls.append(1)
      if len(calls) == n:
        raise error
      return original(*args, **kwargs)

    monkeypatch.setattr(train_lib, "evaluate", evaluate)
    return lambda: monkeypatch.setattr(train_lib, "evaluate", original)

  return arm
