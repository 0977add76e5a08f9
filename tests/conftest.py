"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the flags above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _eight_devices():
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices; see tests/conftest.py"


import json  # noqa: E402
import pathlib  # noqa: E402


def tiny_config(**mesh):
  """The smallest model and run that exercise every part of a training step (2 layers, GQA)."""
  from lcjax import config as config_lib
  c = config_lib.base_config()
  c.train.update(steps=6, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=3,
                 eval_batches=1, log_every=1, sample_prompt="", peak_flops=1e9)
  c.checkpoint.update(every=3, keep=5)
  c.mesh.update(data=2, fsdp=4, **mesh) if mesh else c.mesh.update(data=2, fsdp=4)
  c.model.update(num_layers=2, num_levels=1, embed_dim=32, num_heads=4, num_kv_heads=2,
                 head_dim=8, mlp_dim=64)
  c.data.max_documents = 30
  return c


def read_losses(workdir) -> dict:
  """{step: train/loss} from a run's metrics.jsonl."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def scratch_program(config):
  """(program, prepared, state at step 0) of a config; call under jax.set_mesh(prepared.mesh)."""
  from lcjax import program as program_lib
  from lcjax.train import prepare
  prepared = prepare(config)
  program = program_lib.build(prepared)
  return program, prepared, program.init(program_lib.Scratch())[0]


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture():
  return tiny_config


@pytest.fixture(name="read_losses")
def _read_losses_fixture():
  return read_losses
