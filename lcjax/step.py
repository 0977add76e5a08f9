"""The sharded training state and the jitted init, train and eval steps.

State: {"step", "params", "opt_state"} as plain pytrees. Parameters are placed by their logical
axes (mesh.LOGICAL_RULES); optimizer leaves inherit the placement of the parameter they mirror.
The model has no stochastic layers, so there is no RNG state to carry: all randomness (the
initialisation) derives from train.seed.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lcjax import mesh as mesh_lib
from lcjax import model as model_lib
from lcjax import optim
from lcjax.data import FIELDS
from lcjax.optim import offload as offload_lib


def _param_shardings(abstract_model, mesh):
  """Pure-dict tree of NamedShardings for the model's parameters, from their logical axes."""
  def sharding(variable):
    axes = variable.get_metadata()["logical_axes"]
    if len(variable.shape) == len(axes) + 1:  # stacked blocks of a level
      axes = ("layers",) + tuple(axes)
    return mesh_lib.logical_sharding(variable.shape, axes, mesh)

  state = nnx.state(abstract_model, nnx.Param)
  return nnx.to_pure_dict(jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def mirror_shardings(tree, param_shardings, params, mesh):
  """Shardings for a tree whose leaves mirror parameters (optimizer moments): matched by the
  tail of their path and their shape; anything else (counts, scalars) is replicated."""
  by_path = {}
  for path, s in jax.tree_util.tree_leaves_with_path(param_shardings):
    by_path[tuple(str(k) for k in path)] = s
  shapes = {tuple(str(k) for k in p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}

  def sharding(path, leaf):
    keys = tuple(str(k) for k in path)
    for start in range(len(keys)):
      tail = keys[start:]
      if tail in by_path and shapes[tail] == leaf.shape:
        return by_path[tail]
    return mesh_lib.replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding, tree)


@dataclasses.dataclass
class Steps:
  graphdef: nnx.GraphDef
  abstract_state: dict      # ShapeDtypeStructs carrying their shardings (and memory kinds)
  state_shardings: dict
  batch_sharding: jax.sharding.NamedSharding
  init: callable            # () -> state, placed by its shardings from the start
  train: callable           # (state, batch) -> (state, metrics); state donated
  eval: callable            # (params, batch) -> (loss_sum, token_count)
  mesh: jax.sharding.Mesh
  trace: callable           # abstract batch -> jax.stages.Traced of the train step's jit
  eval_params: callable = lambda state: state["params"]  # what evaluation and sampling use
  describe: callable = lambda: {}          # extra fields of the start record
  annotate: callable = lambda step, record: record  # host-side fields added to a train record
  # DiLoCo: (abstract plain state, plain state -> this state) to start from a plain run
  from_plain: tuple | None = None
  # With optim.offload the live state also holds "compute" (the device's compute-dtype copy of
  # the parameters) and keeps params/opt_state in host memory; `saved` drops "compute" for a
  # checkpoint (the same layout either way) and `attach` completes a restored state.
  offload: offload_lib.OffloadedAdamW | None = None
  saved: callable = lambda state: state
  attach: callable = lambda state: state

  def compile(self, abstract_batch):
    """(runner, compiled): runner(state, batch) -> (state, metrics); compiled for memory stats.
    With offload the runner is `train` (the jit plus the host lanes after it)."""
    compiled = self.trace(abstract_batch).lower().compile()
    return (compiled if self.offload is None else self.train), compiled


def train_metrics(loss, grads, count, lr) -> dict:
  return {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads), "train/tokens": count,
          "train/lr": lr}


@dataclasses.dataclass(frozen=True)
class Parts:
  """The pure (unjitted) pieces every variant of the step (plain, offloaded, DiLoCo) composes."""
  graphdef: nnx.GraphDef
  abstract_state: dict      # {"step", "params", "opt_state"}: ShapeDtypeStructs with shardings
  state_shardings: dict
  batch_sharding: jax.sharding.NamedSharding
  create_state: callable    # () -> state
  loss_fn: callable         # (params, batch) -> (objective / tokens, (cross entropy, tokens))
  train_step: callable      # (state, batch) -> (state, metrics)
  eval_step: callable       # (params, batch) -> (cross-entropy sum, token count)
  lr_schedule: callable


def parts(model_cfg, config, mesh) -> Parts:
  tx = optim.make(config)
  lr_schedule = optim.schedule(config.train)
  seed = config.train.seed

  def create_state():
    params = nnx.to_pure_dict(nnx.state(model_lib.create(model_cfg, seed), nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract_model = nnx.eval_shape(lambda: model_lib.create(model_cfg, seed))
  graphdef = nnx.graphdef(abstract_model)
  abstract = jax.eval_shape(create_state)
  param_sh = _param_shardings(abstract_model, mesh)
  shardings = {"step": mesh_lib.replicated(mesh), "params": param_sh,
               "opt_state": mirror_shardings(abstract["opt_state"], param_sh, abstract["params"], mesh)}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)

  def loss_fn(params, batch):
    objective, cross_entropy, count = nnx.merge(graphdef, params).loss_sums(batch)
    count = jnp.maximum(count, 1.0)
    return objective / count, (cross_entropy / count, count)

  def train_step(state, batch):
    (_, (loss, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = train_metrics(loss, grads, count, lr_schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def eval_step(params, batch):
    _, cross_entropy, count = nnx.merge(graphdef, params).loss_sums(batch)
    return cross_entropy, count

  return Parts(graphdef=graphdef, abstract_state=abstract, state_shardings=shardings,
               batch_sharding=mesh_lib.batch_sharding(mesh), create_state=create_state,
               loss_fn=loss_fn, train_step=train_step, eval_step=eval_step,
               lr_schedule=lr_schedule)


def build(model_cfg, config, mesh) -> Steps:
  p = parts(model_cfg, config, mesh)
  if config.outer.kind == "diloco":
    from lcjax.outer import diloco  # the outer loop composes these parts
    return diloco.build(p, config, mesh)
  if config.optim.offload:
    from lcjax.optim import offload_step  # it imports this module for Steps
    return offload_step.build(p, config, mesh, model_cfg.compute_dtype)
  replicated = mesh_lib.replicated(mesh)
  shardings, batch_sh = p.state_shardings, p.batch_sharding
  train = jax.jit(p.train_step, in_shardings=(shardings, batch_sh),
                  out_shardings=(shardings, replicated), donate_argnums=0)
  return Steps(
      graphdef=p.graphdef, abstract_state=p.abstract_state, state_shardings=shardings,
      batch_sharding=batch_sh, mesh=mesh,
      init=jax.jit(p.create_state, out_shardings=shardings), train=train,
      eval=jax.jit(p.eval_step, in_shardings=(shardings["params"], batch_sh),
                   out_shardings=replicated),
      trace=lambda batch: train.trace(p.abstract_state, batch))


def abstract_batch(batch_size, seq_len, sharding):
  return {f: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding)
          for f in FIELDS}


def device_batch(batch_np, sharding):
  """Host numpy batch (the global batch, identical on every process) -> sharded global arrays."""
  return {f: jax.make_array_from_callback(v.shape, sharding, functools.partial(v.__getitem__))
          for f, v in batch_np.items()}
