"""The train program: shardings derived from the declared state spec equal those the old
guessing code produced (its rules are restated below as the reference), for every variant and
the meshes the suite uses; unshardable dimensions are reported; fit and dry runs compile every
variant through the one path."""
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax import mesh as mesh_lib
from lcjax import model as model_lib
from lcjax import program as program_lib
from lcjax import fit
from lcjax.train import prepare
from conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _reference_param_shardings(abstract_model, mesh):
  """The pre-spec rule: a parameter one rank above its logical axes is a stacked block."""
  def sharding(variable):
    axes = tuple(variable.get_metadata()["logical_axes"])
    axes = axes[1:] if axes[:1] == ("layers",) else axes  # as declared before vmap added it
    if len(variable.shape) == len(axes) + 1:
      axes = ("layers",) + axes
    return mesh_lib.logical_sharding(variable.shape, axes, mesh)

  state = nnx.state(abstract_model, nnx.Param)
  return nnx.to_pure_dict(jax.tree.map(sharding, state,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _reference_mirror(tree, param_shardings, params, mesh):
  """The pre-spec rule for optimizer leaves: matched to a parameter by path tail and shape."""
  key = lambda path: tuple(str(k) for k in path)
  by_path = {key(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings)}
  shapes = {key(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}

  def sharding(path, leaf):
    keys = key(path)
    for start in range(len(keys)):
      tail = keys[start:]
      if tail in by_path and shapes[tail] == leaf.shape:
        return by_path[tail]
    return mesh_lib.replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding, tree)


def _reference(program, prepared):
  mesh, parts, config = program.mesh, program.parts, prepared.config
  abstract_model = nnx.eval_shape(lambda: model_lib.create(prepared.model_cfg, config.train.seed))
  params = _reference_param_shardings(abstract_model, mesh)
  abstract = program.stage.abstract
  replicated = mesh_lib.replicated(mesh)
  if config.outer.kind == "diloco":
    island = lambda s: NamedSharding(mesh, P("replica", *s.spec))
    opt = _reference_mirror(jax.eval_shape(program.tx.init, parts.abstract_params), params,
                            parts.abstract_params, mesh)
    outer_opt = _reference_mirror(abstract["outer"]["opt_state"], params, parts.abstract_params,
                                  mesh)
    return {"step": replicated, "params": jax.tree.map(island, params),
            "opt_state": jax.tree.map(island, opt), "tokens": NamedSharding(mesh, P("replica")),
            "outer": {"params": params, "opt_state": outer_opt, "step": replicated}}
  opt = _reference_mirror(abstract["opt_state"], params, parts.abstract_params, mesh)
  if not config.optim.offload:
    return {"step": replicated, "params": params, "opt_state": opt}
  host = lambda s: s.with_memory_kind("pinned_host")
  return {"step": replicated, "params": jax.tree.map(host, params),
          "opt_state": jax.tree.map(host, opt), "compute": params}


VARIANTS = {
    "data2_fsdp4": (dict(), dict()),
    "fsdp2_tensor4": (dict(data=1, fsdp=2, tensor=4), dict()),
    "fsdp4_ring2": (dict(data=1, fsdp=4, ring=2), dict()),
    "offload": (dict(), dict(offload=True, update_on="alternate", subgroup_mb=0.01)),
    "diloco_fsdp2_ring2": (dict(replica=2, data=1, fsdp=2, ring=2), dict()),
}


def _config(name):
  mesh, optim = VARIANTS[name]
  c = tiny_config()
  c.mesh.update(**mesh)
  c.optim.update(**optim)
  if "diloco" in name:
    c.outer.update(kind="diloco", inner_steps=2)
  return c


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_derived_shardings_equal_the_reference_rules(name):
  config = _config(name)
  prepared = prepare(config, with_data=False)
  with jax.set_mesh(prepared.mesh):
    program = program_lib.build(prepared, aot=True)
  expected = _reference(program, prepared)
  got = program.live.shardings
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for (path, a), b, x in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected),
                             jax.tree.leaves(program.live.abstract)):
    assert a.is_equivalent_to(b, len(x.shape)), (jax.tree_util.keystr(path), a, b)
    assert a.memory_kind == b.memory_kind, jax.tree_util.keystr(path)


def test_unshardable_dimensions_are_reported():
  prepared = prepare(_config("fsdp2_tensor4"), with_data=False)  # 2 kv heads over tensor=4
  with jax.set_mesh(prepared.mesh):
    program = program_lib.build(prepared, aot=True)
  lines = [l for l in program.unshardable if "params/" in l]
  assert any("wk" in l and "kv_heads" in l and "tensor=4" in l for l in lines), lines
  assert all("wq" not in l for l in lines)  # 4 query heads do divide


def test_fit_compiles_the_offloaded_step():
  c = _config("offload")
  plain = fit.step_memory(tiny_config(), 64)
  offloaded = fit.step_memory(c, 64)
  assert offloaded.total > 0 and plain.total > 0


def test_fit_script_prints_its_table_with_offload():
  out = subprocess.run(
      [sys.executable, "scripts/fit.py", "--config=experiments/tiny_cpu.py",
       "--config.optim.offload=True", "--config.model.num_layers=2", "--memory_gb=0.05",
       "--granularity=256", "--max_len=1024", "--remat=none"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| MsT | remat | longest sequence | memory (GiB) |" in out.stdout
  assert "| off | none |" in out.stdout and "| on | none |" in out.stdout
