"""Config validation (lcjax/config.py): importable and checkable without JAX, and every error a
user can make names the offending key at validate time, before any data or model is built."""
import os
import pathlib
import runpy
import subprocess
import sys

import pytest

from lcjax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _diloco_config():
  return runpy.run_path(str(ROOT / "experiments" / "diloco_cpu.py"))["get_config"]()


def test_validating_imports_no_jax():
  # A fresh interpreter: this test process has imported JAX long ago (conftest.py).
  script = (
      "import runpy, sys\n"
      "import lcjax.config as config_lib\n"
      "config_lib.validate(config_lib.base_config())\n"
      "config_lib.validate(runpy.run_path('experiments/diloco_cpu.py')['get_config']())\n"
      "heavy = ('jax', 'jaxlib', 'flax', 'optax')\n"
      "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]", proc.stdout


def test_an_attention_typo_is_refused_at_validate_time():
  c = config_lib.base_config()
  c.model.attention = "pallsa"
  with pytest.raises(ValueError, match=r"model\.attention must be one of .*'pallas'.*'pallsa'"):
    config_lib.validate(c)


@pytest.mark.parametrize("attention", config_lib.ATTENTION_IMPLEMENTATIONS)
def test_every_attention_implementation_validates(attention):
  c = config_lib.base_config()
  c.model.attention = attention
  if attention == "cudnn":  # what it needs (tests/test_cudnn_attention.py)
    c.model.update(dtype="bfloat16", document_mask=False)
  assert config_lib.validate(c).model.attention == attention


@pytest.mark.parametrize("update_on", ["auto", "device"])
def test_offload_inside_diloco_islands_validates(update_on):
  c = _diloco_config()
  c.optim.update(offload=True, update_on=update_on)
  full = config_lib.validate(c)
  assert full.outer.kind == "diloco" and full.optim.offload


@pytest.mark.parametrize("update_on", ["host", "alternate"])
def test_host_lanes_inside_diloco_islands_are_refused(update_on):
  c = _diloco_config()
  c.optim.update(offload=True, update_on=update_on)
  with pytest.raises(ValueError,
                     match=rf"optim\.update_on='{update_on}'.*optim\.update_on='device'"):
    config_lib.validate(c)


def test_host_lanes_without_an_outer_loop_validate():
  c = config_lib.base_config()
  c.optim.update(offload=True, update_on="host")
  assert config_lib.validate(c).optim.update_on == "host"


def test_unknown_key_is_named_with_the_known_ones():
  c = config_lib.base_config()
  c.model.num_layer = 3  # typo of num_layers
  with pytest.raises(ValueError, match=r"unknown config key 'model\.num_layer'; known keys here: "
                                       r".*num_layers"):
    config_lib.validate(c)


def test_a_section_given_a_value_is_refused():
  c = config_lib.base_config()
  del c["outer"]
  c.outer = "diloco"
  with pytest.raises(ValueError, match="config key 'outer' must be a section"):
    config_lib.validate(c)


@pytest.mark.parametrize("update, message", [
    (lambda c: c.model.update(num_kv_heads=3),
     r"model\.num_heads \(4\) must be a multiple of model\.num_kv_heads \(3\)"),
    (lambda c: c.model.update(num_heads=0), r"model\.num_heads must be > 0; got 0"),
    (lambda c: c.model.update(num_layers=3, num_levels=2),
     r"model\.num_layers \(3\) must be a multiple of model\.num_levels \(2\)"),
    (lambda c: c.model.update(mlp_chunks=512),
     r"model\.mlp_chunks \(512\) exceeds .*train\.seq_len"),
    (lambda c: c.mesh.update(fsdp=0), r"mesh\.fsdp must be >= 1"),
    (lambda c: c.optim.update(update_on="gpu"), r"optim\.update_on must be .*'gpu'"),
    (lambda c: c.outer.update(kind="dilico"), r"outer\.kind must be none, diloco or dipaco; got 'dilico'"),
    (lambda c: c.outer.update(base_from="/some/run"), r"outer\.base_from starts DiPaCo's modules"),
])
def test_bad_values_name_their_key(update, message):
  c = config_lib.base_config()
  update(c)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_validate_fills_defaults_and_locks():
  c = config_lib.base_config()
  del c["outer"]
  c.model.embed_dim = 64
  full = config_lib.validate(c)
  assert full.model.embed_dim == 64 and full.outer.kind == "none"
  with pytest.raises(AttributeError):
    full.model.new_key = 1
