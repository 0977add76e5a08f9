"""Deep Optimizer States: offloaded AdamW trains exactly like optax.adamw on the device, on either
update lane and mixed; state placement; the performance model's choice; checkpoints across
offload on and off."""
import itertools
import json
import shutil

import jax
import numpy as np
import pytest

from lcjax import checkpoint as checkpoint_lib
from lcjax import config as config_lib
from lcjax import metrics as metrics_lib
from lcjax import parts as parts_lib
from lcjax import program as program_lib
from lcjax.optim import host_lane, perf_model
from lcjax.train import prepare, train_and_evaluate
from conftest import read_losses as _losses, tiny_config, train_steps

FIGURES = dict(h2d_gbps=10.0, d2h_gbps=10.0, host_update_gbps=1.0, device_update_gbps=100.0)


def offload_config(update_on="auto", **optim):
  c = tiny_config()
  c.optim.update(offload=True, subgroup_mb=0.01, update_on=update_on, **FIGURES)
  c.optim.update(**optim)
  return c


@pytest.fixture(scope="module")
def reference():
  _, state, losses = train_steps(tiny_config())
  return jax.device_get(steps_saved(state)), losses


def steps_saved(state):
  return {k: state[k] for k in ("step", "params", "opt_state")}


@pytest.mark.parametrize("update_on, host_lane", [
    ("host", "auto"), ("device", "auto"), ("alternate", "auto"),
    ("host", "cpu_backend"),  # the accelerators' host lane, forced on CPU
])
def test_offload_trains_like_optax_adamw_on_device(reference, update_on, host_lane):
  ref_state, ref_losses = reference
  program, state, losses = train_steps(offload_config(update_on, host_lane=host_lane))
  opt = program.stage.opt
  assert opt.host_lane_kind == ("jit" if host_lane == "auto" else host_lane)
  on_device = opt.on_device
  assert len(on_device) > 3
  assert any(on_device) == (update_on != "host") and all(on_device) == (update_on == "device")
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  got = jax.device_get(program.saved_view(state))
  assert jax.tree.structure(got) == jax.tree.structure(ref_state)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Master params and moments in host memory; the compute copy on the device.
  for x in jax.tree.leaves({"p": state["params"], "o": state["opt_state"]}):
    assert x.sharding.memory_kind == "pinned_host"
  for x in jax.tree.leaves(state["compute"]):
    assert x.sharding.memory_kind == "device"
  record = metrics_lib.state_bytes_by_memory_kind(steps_saved(state))
  assert record["optim/state_bytes_device"] == 4  # the step counter only
  assert record["optim/state_bytes_host"] > 0


def _transfers(jaxpr, source, target):
  """The top-level device_put equations of `jaxpr` from one memory space to another."""
  def kind(destination):  # a sharding with a memory kind, or a jax.memory.Space
    return getattr(destination, "memory_kind", None) or {
        "Device": "device", "Host": "pinned_host"}.get(getattr(destination, "name", None))

  return [e for e in jaxpr.eqns if e.primitive.name == "device_put"
          and all(v.aval.memory_space.name == source for v in e.invars)
          and all(kind(s) == target for s in e.params["devices"])]


def test_device_lane_moves_its_state_inside_the_step_jit():
  prepared = prepare(offload_config("alternate"))
  with jax.set_mesh(prepared.mesh):
    program = program_lib.build(prepared)
    traced = program.trace(parts_lib.abstract_batch(8, 32, program.batch_sharding))
  opt = program.stage.opt
  n_device, n_host = len(opt.device_leaves), len(opt.host_leaves)
  assert n_device > 0 and n_host > 0
  jaxpr = traced.jaxpr.jaxpr
  # In: params, mu and nu of each device-lane leaf; out: those three again, each host-lane
  # gradient, and the step and count scalars the host lanes read.
  assert len(_transfers(jaxpr, "Host", "device")) == 3 * n_device
  assert len(_transfers(jaxpr, "Device", "pinned_host")) == 3 * n_device + n_host + 2
  # CPU lowers memory-space transfers to nothing; a GPU lowering carries them as custom calls.
  cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert cuda.count('_xla_buffer_placement = "device"') >= 3 * n_device


def test_init_and_restore_build_the_state_in_host_memory(tmp_path):
  config = offload_config("alternate")
  prepared = prepare(config)
  c, mesh = prepared.config, prepared.mesh
  with jax.set_mesh(mesh):
    program = program_lib.build(prepared)
    # The init jit itself returns master params and moments in pinned_host (no device_put after).
    out = program.live.shardings
    state, _ = program.init(program_lib.Scratch())
  for kind, tree in (("pinned_host", {"p": out["params"], "o": out["opt_state"]}),
                     ("device", out["compute"])):
    assert {s.memory_kind for s in jax.tree.leaves(tree)} == {kind}
  for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(out)):
    assert a.sharding.memory_kind == s.memory_kind
  abstract = program.saved.abstract
  for x in jax.tree.leaves({"p": abstract["params"], "o": abstract["opt_state"]}):
    assert x.sharding.memory_kind == "pinned_host"
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, c)
  try:
    checkpointer.save(0, program.saved_view(state), {"next_sequence": 0}, force=True)
    checkpointer.manager.wait_until_finished()
    with jax.set_mesh(mesh):
      restored, _ = checkpointer.restore(0, program.saved.abstract)
  finally:
    checkpointer.close()
  for x in jax.tree.leaves({"p": restored["params"], "o": restored["opt_state"]}):
    assert x.sharding.memory_kind == "pinned_host"  # restored there, before `attach`


def test_cpu_backend_lane_needs_addressable_arrays():
  class SpansProcesses:
    is_fully_addressable = False

  with pytest.raises(ValueError, match="optim.update_on='device'"):
    host_lane.require_addressable([SpansProcesses()])


def _direct(figures, sizes, on_device):
  f = figures
  host = sum(3 * p / f.host_update_bps for p, d in zip(sizes, on_device) if not d)
  link = sum(3 * p * (1 / f.h2d_bps + 1 / f.d2h_bps + 1 / f.device_update_bps) if d
             else p * (1 / f.d2h_bps + 1 / f.h2d_bps) for p, d in zip(sizes, on_device))
  return max(host, link)


@pytest.mark.parametrize("link_bps, expect", [
    (1e6, "host"),     # slow link: streaming costs more than the host's own update
    (1e13, "device"),  # fast link: the device lane hides everything
    (3e9, "split"),    # in between: half the bytes go each way
])
def test_chooser_follows_the_model(link_bps, expect):
  f = perf_model.Figures(h2d_bps=link_bps, d2h_bps=link_bps, host_update_bps=1e9,
                         device_update_bps=1e12)
  sizes = [1e6, 1e6, 1e6, 1e6]
  on_device, t = perf_model.choose(f, sizes)
  assert t == pytest.approx(_direct(f, sizes, on_device), rel=1e-12)
  best = min(_direct(f, sizes, c) for c in itertools.product([False, True], repeat=len(sizes)))
  assert t == pytest.approx(best, rel=1e-12)
  assert {"host": not any(on_device), "device": all(on_device),
          "split": 0 < sum(on_device) < len(sizes)}[expect], on_device
  for choice in itertools.product([False, True], repeat=len(sizes)):
    assert perf_model.predicted_time(f, sizes, choice) == pytest.approx(_direct(f, sizes, choice))


def test_measured_figures_and_start_record(tmp_path):
  c = offload_config(h2d_gbps=0.0, d2h_gbps=0.0, host_update_gbps=0.0, device_update_gbps=0.0)
  c.train.steps = 1
  train_and_evaluate(c, tmp_path)
  start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  for key in ("optim/h2d_gbps", "optim/d2h_gbps", "optim/host_update_gbps",
              "optim/device_update_gbps", "optim/predicted_update_s", "optim/measured_update_s",
              "optim/state_bytes_host"):
    assert start[key] > 0, key
  assert start["optim/state_bytes_device"] == 0
  assert start["optim/host_lane"] == "jit"
  assert isinstance(start["optim/device_subgroups"], list)


def test_checkpoint_round_trip_is_exact(tmp_path):
  config = offload_config("alternate")
  program, state, _ = train_steps(config, n_steps=2)
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, config_lib.validate(config))
  try:
    checkpointer.save(2, program.saved_view(state), {"next_sequence": 16}, force=True)
    checkpointer.manager.wait_until_finished()
    with jax.set_mesh(program.mesh):
      restored, position = program.init(program_lib.ThisRun(checkpointer, 2))
  finally:
    checkpointer.close()
  assert position == 16
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.sharding.memory_kind == b.sharding.memory_kind
    np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  train_and_evaluate(tiny_config(), workdir)
  return _losses(workdir)


def test_dry_run_reports_host_state(tmp_path):
  record = train_and_evaluate(offload_config(), tmp_path, dry_run=True)
  assert record["optim/state_bytes_host"] > 0 and record["optim/state_bytes_device"] == 0
  assert record["optim/predicted_update_s"] > 0


@pytest.mark.parametrize("first, second", [(True, True), (False, True), (True, False)])
def test_resume_across_offload_settings(tmp_path, straight_losses, first, second):
  train_and_evaluate(offload_config("alternate") if first else tiny_config(), tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if stopped after the step-3 checkpoint
  train_and_evaluate(offload_config("alternate") if second else tiny_config(), tmp_path)
  ref, got = straight_losses, _losses(tmp_path)
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-6)


@pytest.mark.parametrize("update, message", [
    (lambda c: c.optim.update(name="sgd"), "supports optim.name='adamw' only"),
    (lambda c: c.optim.update(subgroup_mb=0.0), "optim.subgroup_mb must be > 0"),
    (lambda c: c.optim.update(update_on="gpu"), "optim.update_on must be"),
    (lambda c: c.optim.update(h2d_gbps=-1.0), "optim.h2d_gbps must be >= 0"),
    (lambda c: c.optim.update(host_lane="gpu"), "optim.host_lane must be"),
])
def test_bad_offload_config(update, message):
  c = offload_config()
  update(c)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)
