"""DiLoCo (arXiv 2311.08105), the outer loop DiPaCo (arXiv 2403.10616) builds on, over the
`replica` mesh axis: R islands each train their own copy of the model for H inner steps, then
sync once.

State (every leaf sharded as the plain step's, island leaves with a leading [R] over `replica`):
  step        inner steps done
  params      [R, ...] each island's parameters
  opt_state   [R, ...] each island's inner optimizer state, kept across rounds
  tokens      [R] target tokens each island trained on since the last sync
  outer       {"params": the shared parameters theta, "opt_state": the outer optimizer's,
               "step": syncs done}

One jitted step. Every island runs the unchanged inner train step (step.Parts.train_step) on its
share of the global batch, inside a shard_map that is manual over `replica` only, so data, fsdp,
ring, ulysses and tensor parallelism work inside an island as they do without DiLoCo. After every
H-th inner step the islands sync:
  delta_r = theta - theta_r                       (the pseudo-gradient; it points away from r)
  delta   = sum_r w_r delta_r,  w_r = tokens_r / sum of tokens over the islands not dropped
  theta  <- theta + outer_tx(delta)               (optax: SGD with Nesterov momentum, or Adam)
  theta_r <- theta for every island, dropped ones included.
delta is exchanged compressed (outer.compression; compression.py) and summed in float32.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax import mesh as mesh_lib
from lcjax import step as step_lib
from lcjax.outer import compression

AXIS = "replica"


def parse_drops(spec: str, replicas: int) -> dict:
  """outer.drop_replicas, "r@k,r@k,...": island r is left out of outer step k (counted from 1)
  -> {k: {r, ...}}; ValueError naming the bad entry."""
  drops = {}
  for entry in filter(None, (e.strip() for e in spec.split(","))):
    try:
      replica, step = (int(v) for v in entry.split("@"))
    except ValueError:
      raise ValueError(f"outer.drop_replicas entry {entry!r} must read REPLICA@OUTER_STEP, "
                       "e.g. '1@2' leaves island 1 out of the second sync") from None
    if not 0 <= replica < replicas or step < 1:
      raise ValueError(f"outer.drop_replicas entry {entry!r}: the island must be in "
                       f"[0, {replicas}) (mesh.replica={replicas}) and the outer step >= 1")
    drops.setdefault(step, set()).add(replica)
  for step, dropped in drops.items():
    if len(dropped) == replicas:
      raise ValueError(f"outer.drop_replicas leaves every island out of outer step {step}; "
                       "keep at least one")
  return drops


def outer_optimizer(outer_config) -> optax.GradientTransformation:
  o = outer_config
  if o.optimizer == "sgd":
    return optax.sgd(o.lr, momentum=o.momentum or None, nesterov=o.nesterov and o.momentum > 0)
  if o.optimizer == "adam":
    return optax.adam(o.lr, b1=o.momentum)
  raise ValueError(f"outer.optimizer must be sgd or adam; got {o.optimizer!r}")


def _alive_table(drops, replicas):
  """[last dropped step + 2, R] float32: 1 where island r takes part in outer step k (rows past
  the table's end read its last row, all ones)."""
  last = max(drops, default=0)
  table = np.ones((last + 2, replicas), np.float32)
  for step, dropped in drops.items():
    table[step, sorted(dropped)] = 0.0
  return jnp.asarray(table)


def _per_island(sharding):
  """The sharding of an island-stacked leaf: `replica` first, then the leaf's own spec."""
  return NamedSharding(sharding.mesh, P(AXIS, *sharding.spec))


def build(parts, config, mesh):
  o = config.outer
  R, H, fmt = mesh.shape[AXIS], o.inner_steps, o.compression
  outer_tx = outer_optimizer(o)
  alive_table = _alive_table(parse_drops(o.drop_replicas, R), R)
  replicated = mesh_lib.replicated(mesh)
  sh = parts.state_shardings

  def create_state():
    return from_plain(parts.create_state())

  def from_plain(base):
    """Every island and theta start from one plain state {"step", "params", "opt_state"}."""
    stack = lambda x: jnp.broadcast_to(x, (R,) + x.shape)
    return {"step": base["step"], "params": jax.tree.map(stack, base["params"]),
            "opt_state": jax.tree.map(stack, base["opt_state"]),
            "tokens": jnp.zeros((R,), jnp.float32),
            "outer": {"params": base["params"], "opt_state": outer_tx.init(base["params"]),
                      "step": jnp.zeros((), jnp.int32)}}

  abstract = jax.eval_shape(create_state)
  outer_opt_sh = step_lib.mirror_shardings(abstract["outer"]["opt_state"], sh["params"],
                                           abstract["outer"]["params"], mesh)
  shardings = {"step": replicated,
               "params": jax.tree.map(_per_island, sh["params"]),
               "opt_state": jax.tree.map(_per_island, sh["opt_state"]),
               "tokens": NamedSharding(mesh, P(AXIS)),
               "outer": {"params": sh["params"], "opt_state": outer_opt_sh, "step": replicated}}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  island_specs = {"step": P(), "params": P(AXIS), "opt_state": P(AXIS), "tokens": P(AXIS),
                  "outer": P()}

  def sync(params, tokens, outer):
    """One outer step, from inside an island; returns (island params, tokens, outer)."""
    number = outer["step"] + 1
    alive = alive_table[jnp.minimum(number, alive_table.shape[0] - 1), jax.lax.axis_index(AXIS)]
    contribution = alive * tokens[0]
    weight = contribution / jax.lax.psum(contribution, AXIS)
    delta = jax.tree.map(
        lambda theta, mine: compression.weighted_sum(theta - mine[0], weight, fmt, AXIS, R),
        outer["params"], params)
    updates, opt_state = outer_tx.update(delta, outer["opt_state"], outer["params"])
    shared = optax.apply_updates(outer["params"], updates)
    return (jax.tree.map(lambda x: x[None], shared), jnp.zeros_like(tokens),
            {"params": shared, "opt_state": opt_state, "step": number})

  def island_step(state, batch):
    local = {"step": state["step"], "params": jax.tree.map(lambda x: x[0], state["params"]),
             "opt_state": jax.tree.map(lambda x: x[0], state["opt_state"])}
    new, metrics = parts.train_step(local, batch)
    params = jax.tree.map(lambda x: x[None], new["params"])
    tokens = state["tokens"] + metrics["train/tokens"]
    params, tokens, outer = jax.lax.cond(
        new["step"] % H == 0, sync, lambda *args: args, params, tokens, state["outer"])
    state = {"step": new["step"], "params": params,
             "opt_state": jax.tree.map(lambda x: x[None], new["opt_state"]), "tokens": tokens,
             "outer": outer}
    return state, {k: v[None] for k, v in metrics.items()}

  per_island = jax.shard_map(island_step, mesh=mesh, in_specs=(island_specs, P(AXIS)),
                             out_specs=(island_specs, P(AXIS)), axis_names={AXIS},
                             check_vma=False)

  def train_step(state, batch):
    state, m = per_island(state, batch)
    tokens = m["train/tokens"]
    metrics = {"train/loss": jnp.sum(m["train/loss"] * tokens) / jnp.sum(tokens),
               "train/grad_norm": jnp.mean(m["train/grad_norm"]),
               "train/tokens": jnp.sum(tokens), "train/lr": m["train/lr"][0],
               "outer/step": state["outer"]["step"]}
    metrics.update({f"train/loss/replica{r}": m["train/loss"][r] for r in range(R)})
    return state, metrics

  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["outer"]["params"])]
  per_sync = compression.bytes_sent(sizes, fmt, R)
  per_data_parallel_step = compression.ring_all_reduce_bytes(sizes, R)

  def annotate(step, record):
    return {**record, "outer/bytes_communicated": int(record["outer/step"]) * per_sync,
            "outer/bytes_data_parallel": step * per_data_parallel_step}

  def describe():
    return {"outer/replicas": R, "outer/inner_steps": H, "outer/compression": fmt,
            "outer/optimizer": o.optimizer, "outer/bytes_per_sync": per_sync,
            "outer/bytes_data_parallel_per_step": per_data_parallel_step}

  batch_sh = parts.batch_sharding
  train = jax.jit(train_step, in_shardings=(shardings, batch_sh),
                  out_shardings=(shardings, replicated), donate_argnums=0)
  return step_lib.Steps(
      graphdef=parts.graphdef, abstract_state=abstract, state_shardings=shardings,
      batch_sharding=batch_sh, mesh=mesh,
      init=jax.jit(create_state, out_shardings=shardings), train=train,
      trace=lambda batch: train.trace(abstract, batch),
      eval=jax.jit(parts.eval_step, in_shardings=(sh["params"], batch_sh),
                   out_shardings=replicated),
      eval_params=lambda state: state["outer"]["params"], describe=describe, annotate=annotate,
      from_plain=(parts.abstract_state, jax.jit(from_plain, out_shardings=shardings)))

