"""The mesh (lcjax/mesh.py) and the shardings derived from declared logical axes
(lcjax/state_spec.py): sizes filled and checked, a dimension sharded only where its size
divides, and every dimension a rule cannot shard reported by leaf and mesh axis."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from lcjax import mesh as mesh_lib
from lcjax import optim
from lcjax import parts as parts_lib
from lcjax import state_spec
from lcjax.optim import inner as inner_lib
from lcjax.state_spec import Decl
from lcjax.train import prepare


def _mesh_config(**sizes):
  c = {"replica": 1, "data": -1, "fsdp": 1, "ring": 1, "ulysses": 1, "tensor": 1}
  c.update(sizes)
  return ml_collections.ConfigDict(c)


def _mesh(**sizes):
  return mesh_lib.make_mesh(_mesh_config(**sizes))


@pytest.mark.parametrize("sizes, data", [({}, 8), ({"fsdp": 4}, 2), ({"replica": 2, "ring": 2}, 2),
                                         ({"fsdp": 2, "ulysses": 2, "tensor": 2}, 1)])
def test_mesh_shape_fills_data(sizes, data):
  shape = mesh_lib.mesh_shape(_mesh_config(**sizes), 8)
  assert shape["data"] == data
  assert list(shape) == list(mesh_lib.AXES)
  assert all(shape[a] == sizes.get(a, 1) for a in mesh_lib.AXES if a != "data")


def test_mesh_shape_errors_name_the_numbers():
  with pytest.raises(ValueError, match="other than data multiply to 3, which does not divide "
                                       "the 8"):
    mesh_lib.mesh_shape(_mesh_config(fsdp=3), 8)
  with pytest.raises(ValueError, match="multiply to 12 but there are 8 devices"):
    mesh_lib.mesh_shape(_mesh_config(data=3, fsdp=4), 8)
  with pytest.raises(ValueError, match="multiply to 4 but there are 8 devices"):
    mesh_lib.mesh_shape(_mesh_config(data=1, fsdp=4), 8)


def test_make_mesh_has_every_axis():
  mesh = _mesh(fsdp=4)
  assert mesh.axis_names == mesh_lib.AXES
  assert dict(mesh.shape) == {"replica": 1, "data": 2, "fsdp": 4, "ring": 1, "ulysses": 1,
                              "tensor": 1}
  assert mesh_lib.describe(mesh) == "data=2 x fsdp=4"


def test_logical_spec_shards_only_dimensions_that_divide():
  mesh = _mesh(data=1, fsdp=4, tensor=2)
  assert mesh_lib.logical_spec((32, 64), ("embed", "mlp"), mesh) == P("fsdp", "tensor")
  assert mesh_lib.logical_spec((30, 64), ("embed", "mlp"), mesh) == P(None, "tensor")
  assert mesh_lib.logical_spec((32, 7), ("embed", "mlp"), mesh) == P("fsdp", None)
  # the stacked-layers dimension, head_dim and unnamed dimensions are never sharded
  assert mesh_lib.logical_spec((2, 32, 4, 8), ("layers", "embed", "heads", "head_dim"), mesh) == \
      P(None, "fsdp", "tensor", None)
  assert mesh_lib.logical_spec((8, 8), (None, None), mesh) == P(None, None)


def test_parameters_are_sharded_over_the_sequence_axes_too():
  """ZeRO-3 over fsdp x ring x ulysses: one sequence spread over the chips by sequence
  parallelism holds a 1/P share of the parameters (and so of grads and optimizer state)."""
  mesh = _mesh(data=1, fsdp=2, ring=2, ulysses=2)
  assert mesh_lib.logical_spec((32, 64), ("embed", "mlp"), mesh) == P(("fsdp", "ring", "ulysses"),
                                                                      None)
  assert mesh_lib.logical_spec((32, 64), ("embed", "mlp"), _mesh(data=2, ring=4)) == P("ring", None)
  # activations keep their width whole: their sequence dimension already uses ring x ulysses
  assert mesh_lib.logical_spec((2, 32, 32), ("batch", "seq", "act_embed"), mesh) == \
      P("fsdp", ("ring", "ulysses"), None)


def test_logical_spec_leaves_out_axes_of_size_one():
  mesh = _mesh(data=2, fsdp=4)  # tensor = 1: "mlp" has no axis to go to
  assert mesh_lib.logical_spec((32, 64), ("embed", "mlp"), mesh) == P("fsdp", None)
  # batch over (replica, data, fsdp): only the axes larger than one, all of them together
  assert mesh_lib.logical_spec((8, 32), ("batch", "seq"), mesh) == P(("data", "fsdp"), None)
  assert mesh_lib.logical_spec((4, 32), ("batch", "seq"), mesh) == P(None, None)


def test_unshardable_dims_reports_the_indivisible_dimension():
  mesh = _mesh(data=1, fsdp=4, tensor=2)
  assert mesh_lib.unshardable_dims((32, 64), ("embed", "mlp"), mesh) == []
  assert mesh_lib.unshardable_dims((30, 64), ("embed", "mlp"), mesh) == [(0, "embed", ("fsdp",))]
  assert mesh_lib.unshardable_dims((2, 30, 63), ("layers", "embed", "mlp"), mesh) == \
      [(1, "embed", ("fsdp",)), (2, "mlp", ("tensor",))]
  # a rule whose axes are all of size one shards nothing and so cannot fail
  assert mesh_lib.unshardable_dims((30, 7), ("embed", "mlp"), _mesh(data=8)) == []
  # several axes at once: the product must divide
  batch_mesh = _mesh(data=2, fsdp=4)
  assert mesh_lib.unshardable_dims((12, 32), ("batch", "seq"), batch_mesh) == \
      [(0, "batch", ("data", "fsdp"))]


def test_manual_axes_are_left_to_the_shard_map():
  # Inside a DiLoCo island (manual over replica) the islands dimension is already split.
  mesh = jax.sharding.AbstractMesh(
      (2, 1, 4, 1, 1, 1), mesh_lib.AXES,
      axis_types=(jax.sharding.AxisType.Manual,) + (jax.sharding.AxisType.Auto,) * 5)
  assert mesh_lib.logical_spec((2, 32), ("islands", "embed"), mesh) == P(None, "fsdp")
  assert mesh_lib.unshardable_dims((3, 32), ("islands", "embed"), mesh) == []
  auto = _mesh(replica=2, fsdp=4, data=1)
  assert mesh_lib.logical_spec((2, 32), ("islands", "embed"), auto) == P("replica", "fsdp")


def test_batch_sharding():
  assert mesh_lib.batch_sharding(_mesh(fsdp=4)).spec == P(("data", "fsdp"), None)
  assert mesh_lib.batch_sharding(_mesh(data=8)).spec == P("data", None)
  assert mesh_lib.batch_sharding(_mesh(replica=2, data=1, fsdp=4)).spec == \
      P(("replica", "fsdp"), None)
  sp = _mesh(data=1, fsdp=2, ring=2, ulysses=2)
  assert mesh_lib.batch_sharding(sp).spec == P("fsdp", ("ring", "ulysses"))
  assert mesh_lib.batch_sharding(sp, ndim=3).spec == P("fsdp", ("ring", "ulysses"), None)
  assert mesh_lib.batch_divisor(sp) == 2
  assert mesh_lib.batch_divisor(_mesh(replica=2, data=2, ring=2)) == 4


def test_derive_shards_by_declaration_and_memory_kind():
  mesh = _mesh(data=1, fsdp=4, tensor=2)
  decls = {"w": Decl(("embed", "mlp")), "count": Decl(),
           "host": state_spec.in_memory({"m": Decl(("layers", "embed", "mlp"))}, "pinned_host")}
  abstract = {"w": jax.ShapeDtypeStruct((32, 64), jnp.float32),
              "count": jax.ShapeDtypeStruct((), jnp.int32),
              "host": {"m": jax.ShapeDtypeStruct((2, 32, 64), jnp.float32)}}
  derived = state_spec.derive(decls, abstract, mesh)
  assert derived.unshardable == ()
  assert derived.shardings["w"].spec == P("fsdp", "tensor")
  assert derived.shardings["count"].spec == P()
  assert derived.shardings["host"]["m"].spec == P(None, "fsdp", "tensor")
  assert derived.shardings["host"]["m"].memory_kind == "pinned_host"
  assert derived.abstract["w"].sharding == derived.shardings["w"]
  assert derived.abstract["host"]["m"].shape == (2, 32, 64)
  stacked = state_spec.stacked(decls, "islands")
  assert stacked["w"].axes == ("islands", "embed", "mlp")
  assert stacked["host"]["m"].memory_kind == "pinned_host"


def test_derive_reports_each_unshardable_dimension_by_leaf():
  mesh = _mesh(data=1, fsdp=4, tensor=2)
  decls = {"a": {"w": Decl(("embed", "mlp"))}, "b": Decl(("vocab", "embed"))}
  abstract = {"a": {"w": jax.ShapeDtypeStruct((30, 64), jnp.float32)},
              "b": jax.ShapeDtypeStruct((259, 32), jnp.float32)}
  derived = state_spec.derive(decls, abstract, mesh, prefix="state/")
  assert derived.unshardable == (
      "state/a/w: dimension 0 (embed, size 30) is not sharded over fsdp=4: 30 is not a multiple "
      "of their product",
      "state/b: dimension 0 (vocab, size 259) is not sharded over tensor=2: 259 is not a multiple "
      "of their product")
  assert derived.shardings["a"]["w"].spec == P(None, "tensor")
  assert derived.shardings["b"].spec == P(None, "fsdp")


def _plain_state_spec(config):
  prepared = prepare(config, with_data=False)
  parts = parts_lib.model_parts(prepared.model_cfg, config.train.seed, prepared.mesh)
  abstract, decls = inner_lib.plain_state(parts, optim.make(prepared.config))
  return state_spec.derive(decls, abstract, prepared.mesh)


def test_a_model_width_fsdp_cannot_split_is_reported_per_parameter():
  c = tiny_config()  # data 2 x fsdp 4
  c.model.embed_dim = 30
  derived = _plain_state_spec(c)
  by_leaf = {line.split(":")[0]: line for line in derived.unshardable}
  assert set(by_leaf) >= {"params/embed/embedding", "params/levels/0/blocks/mlp/w_gate",
                          "params/levels/0/blocks/attn/wq"}
  assert all("(embed, size 30)" in line and "fsdp=4" in line for line in derived.unshardable)
  # the stacked `layers` dimension comes first in a level's leaves: the width is dimension 1
  assert "dimension 1 (embed" in by_leaf["params/levels/0/blocks/mlp/w_gate"]
  # the optimizer's moments follow their parameters' declarations and are reported with them
  assert any(name.startswith("opt_state/") and name.endswith("mu/embed/embedding")
             for name in by_leaf)
  # norms are declared replicated: never reported
  assert not any("norm" in name for name in by_leaf)
  assert derived.shardings["params"]["embed"]["embedding"].spec == P(None, None)


def test_a_width_fsdp_divides_shards_every_matrix():
  derived = _plain_state_spec(tiny_config())  # embed_dim 32 on fsdp 4
  assert derived.unshardable == ()
  params = derived.shardings["params"]
  assert params["embed"]["embedding"].spec == P(None, "fsdp")
  assert params["levels"][0]["blocks"]["mlp"]["w_gate"].spec == P(None, "fsdp", None)
  assert params["levels"][0]["blocks"]["mlp"]["w_down"].spec == P(None, None, "fsdp")
  assert params["final_norm"]["scale"].spec == P(None)
