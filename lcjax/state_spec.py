"""The declared state spec: every leaf of a train state names its logical axes and its memory
kind, and its sharding is derived from that declaration by mesh.LOGICAL_RULES, never guessed.

Where the declarations come from:
  parameters        `model.layers.Param(value, axes)` where each is created; the stacked
                    `layers` axis of a level is added by nnx.vmap's transform_metadata
  optimizer leaves  their parameter's declaration, through optax.tree_map_params (moments);
                    every other leaf (counts) is replicated
  islands / paths   an outer loop prepends its axis (`stacked`)
  host residency    `in_memory(decls, "pinned_host")` (Deep Optimizer States)
A dimension whose rule names a mesh axis that its size does not divide is left whole and
reported (`Derived.unshardable`), so the run can say so once at start.
"""
import dataclasses

import jax
import optax
from flax import nnx

from lcjax import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Decl:
  """One leaf's declaration: a logical name (or None) per dimension, and its memory kind."""
  axes: tuple = ()
  memory_kind: str = "device"


def is_decl(x) -> bool:
  return isinstance(x, Decl)


def replicated_like(abstract_tree):
  """Declarations of leaves that are never sharded (counts, scalars)."""
  return jax.tree.map(lambda x: Decl((None,) * len(x.shape)), abstract_tree)


def param_decls(abstract_model) -> dict:
  """Pure-dict tree of the model's parameter declarations, from their variables' metadata."""
  state = nnx.state(abstract_model, nnx.Param)
  return nnx.to_pure_dict(jax.tree.map(lambda v: Decl(tuple(v.get_metadata()["logical_axes"])),
                                       state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def mirror(tx, abstract_opt_state, decls_params):
  """Declarations of an optax state: each moment takes its parameter's; the rest replicated.

  Traced, not run: `tree_map_params` calls `tx.init` on a placeholder, whose scalar counts would
  otherwise be computed on the mesh's devices, which compile-only target devices cannot do."""
  out = []

  def trace():
    out.append(optax.tree_map_params(
        tx, lambda _, decl: decl, abstract_opt_state, decls_params,
        transform_non_params=lambda x: Decl((None,) * len(x.shape)), is_leaf=is_decl))
    return ()

  jax.eval_shape(trace)
  return out[0]


def stacked(decls, name: str):
  """Declarations of the same leaves with a leading dimension named `name` (islands, paths)."""
  return jax.tree.map(lambda d: dataclasses.replace(d, axes=(name,) + tuple(d.axes)), decls,
                      is_leaf=is_decl)


def in_memory(decls, memory_kind: str):
  return jax.tree.map(lambda d: dataclasses.replace(d, memory_kind=memory_kind), decls,
                      is_leaf=is_decl)


@dataclasses.dataclass(frozen=True)
class Derived:
  shardings: object        # the tree of NamedShardings
  abstract: object         # the tree of ShapeDtypeStructs carrying them
  unshardable: tuple       # one line per leaf dimension a rule could not shard


def derive(decls, abstract_tree, mesh, prefix: str = "") -> Derived:
  """Shardings (and sharded abstract leaves) of a state from its declarations."""
  problems = []

  def one(path, decl, x):
    name = prefix + jax.tree_util.keystr(path, simple=True, separator="/")
    assert len(decl.axes) == len(x.shape), (name, decl.axes, x.shape)
    for dim, logical, axes in mesh_lib.unshardable_dims(x.shape, decl.axes, mesh):
      sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
      problems.append(f"{name}: dimension {dim} ({logical}, size {x.shape[dim]}) is not sharded "
                      f"over {sizes}: {x.shape[dim]} is not a multiple of their product")
    sharding = mesh_lib.logical_sharding(x.shape, decl.axes, mesh)
    if decl.memory_kind != "device":
      sharding = sharding.with_memory_kind(decl.memory_kind)
    return sharding

  shardings = jax.tree_util.tree_map_with_path(one, decls, abstract_tree, is_leaf=is_decl)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_tree, shardings)
  return Derived(shardings, abstract, tuple(problems))
