"""DiLoCo (arXiv 2311.08105), the outer loop DiPaCo (arXiv 2403.10616) builds on, over the
`replica` mesh axis: R islands each train their own copy of the model for H inner steps, then
sync once.

An outer stage of the train program (lcjax/program.py): `DiLoCo(inner, ...)` wraps any inner
update that runs in one traced function (plain optax, or offloaded AdamW with every subgroup on
the device lane) and exposes the same stage interface.

State: the inner state's leaves with a leading [R] over `replica` (islands; "step" stays one
scalar), plus
  tokens      [R] target tokens each island trained on since the last sync
  outer       {"params": the shared parameters theta, "opt_state": the outer optimizer's,
               "step": syncs done}
Every leaf's sharding comes from its declaration (state_spec.py): the inner's, with the
`islands` axis in front.

One traced step. Every island runs the unchanged inner update on its share of the global batch,
inside a shard_map that is manual over `replica` only, so data, fsdp, ring, ulysses and tensor
parallelism (and host-resident optimizer state) work inside an island as they do without
DiLoCo. After every H-th inner step the islands sync:
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
from jax.sharding import PartitionSpec as P

from lcjax import state_spec
from lcjax.config import parse_drops
from lcjax.outer import compression
from lcjax.state_spec import Decl

AXIS = "replica"


def outer_optimizer(outer_config) -> optax.GradientTransformation:
  o = outer_config
  if o.optimizer == "sgd":
    return optax.sgd(o.lr, momentum=o.momentum or None, nesterov=o.nesterov and o.momentum > 0)
  if o.optimizer == "adam":
    return optax.adam(o.lr, b1=o.momentum)
  raise ValueError(f"outer.optimizer must be sgd or adam; got {o.optimizer!r}")


def _alive_table(drops, replicas):
  """[last dropped step + 2, R] float32 (numpy: a constant of the traced step, never an array on
  the mesh's devices, which compile-only targets lack): 1 where island r takes part in outer
  step k (rows past the table's end read its last row, all ones)."""
  last = max(drops, default=0)
  table = np.ones((last + 2, replicas), np.float32)
  for step, dropped in drops.items():
    table[step, sorted(dropped)] = 0.0
  return table


def _stack(tree, replicas):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (replicas,) + x.shape), tree)


def _abstract_stack(tree, replicas):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((replicas,) + x.shape, x.dtype), tree)


class DiLoCo:
  name = "diloco"
  extra_shardings = None

  slots = 1  # states each island holds and trains in turn, H steps each (DiPaCo's rounds)

  def __init__(self, inner, outer_config, replicas: int, mesh):
    assert inner.extra_shardings is None, "an island's update must be one traced function"
    o = outer_config
    self.inner, self.R, self.H, self.fmt, self.mesh = inner, replicas, o.inner_steps, o.compression, mesh
    self.V = replicas * self.slots  # virtual islands: island r holds r*S .. r*S + S-1
    self.outer_tx = outer_optimizer(o)
    self.optimizer_name = o.optimizer
    self.alive_table = _alive_table(parse_drops(o.drop_replicas, replicas), replicas)
    self.island_keys = tuple(k for k in inner.abstract if k != "step")
    abstract_theta = self._outer_params(inner.parts.abstract_params, _abstract_stack)
    abstract_outer_opt = jax.eval_shape(self.outer_tx.init, abstract_theta)
    self.abstract = {"step": inner.abstract["step"],
                     **{k: _abstract_stack(inner.abstract[k], self.V) for k in self.island_keys},
                     "tokens": jax.ShapeDtypeStruct((self.V,), jnp.float32),
                     "outer": {"params": abstract_theta, "opt_state": abstract_outer_opt,
                               "step": jax.ShapeDtypeStruct((), jnp.int32),
                               **jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                              self._outer_extras())}}
    theta_decls = self._outer_params(inner.parts.param_decls,
                                     lambda decls, _: state_spec.stacked(decls, None))
    self.decls = {"step": inner.decls["step"],
                  **{k: state_spec.stacked(inner.decls[k], "islands") for k in self.island_keys},
                  "tokens": Decl(("islands",)),
                  "outer": {"params": theta_decls,
                            "opt_state": state_spec.mirror(self.outer_tx, abstract_outer_opt,
                                                           theta_decls),
                            "step": Decl(),
                            **jax.tree.map(lambda x: Decl((None,) * x.ndim),
                                           self._outer_extras())}}
    self.saved_keys = tuple(k for k in self.abstract
                            if k not in inner.abstract or k in inner.saved_keys)
    self.model_param_decls = inner.parts.param_decls
    self.model_params_saved_path = ("outer", "params")
    self.island_specs = {"step": P(), **{k: P(AXIS) for k in self.island_keys},
                         "tokens": P(AXIS), "outer": P()}
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(inner.parts.abstract_params)]
    self.bytes_per_sync = self._bytes_per_sync(inner.parts.abstract_params)
    self.bytes_data_parallel_per_step = compression.ring_all_reduce_bytes(sizes, replicas)

  def _outer_params(self, tree, stack):
    """The outer state's parameters, from a tree of the model's (DiLoCo: theta itself; a
    subclass stores modules with `stack(subtree, count)`)."""
    return tree

  def _bytes_per_sync(self, abstract_params) -> int:
    """Bytes one island sends per sync."""
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params)]
    return compression.bytes_sent(sizes, self.fmt, self.R)

  def create_base(self):
    return self.inner.create_base()

  def from_base(self, base):
    """Every island and theta start from one plain state {"step", "params", "opt_state"}."""
    return self._from_island(self.inner.from_base(base), base["params"])

  def _from_island(self, island, theta):
    outer_params = self._outer_params(theta, _stack)
    return {"step": island["step"],
            **{k: _stack(island[k], self.V) for k in self.island_keys},
            "tokens": jnp.zeros((self.V,), jnp.float32),
            "outer": {"params": outer_params, "opt_state": self.outer_tx.init(outer_params),
                      "step": jnp.zeros((), jnp.int32), **self._outer_extras()}}

  def _outer_extras(self) -> dict:
    """Further leaves of the outer state, at their initial values (replicated)."""
    return {}

  def _island(self, state, slot=0):
    """Inside the shard_map: the inner state in this island's `slot` (its [S, ...] slices)."""
    return {"step": state["step"], **{k: jax.tree.map(lambda x: x[slot], state[k])
                                      for k in self.island_keys}}

  def _restack(self, state, island, slot=0):
    """`state` with `island` in this island's `slot`."""
    put = ((lambda x, v: v[None]) if self.slots == 1 else
           (lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, slot, 0)))
    return {**state, "step": island["step"],
            **{k: jax.tree.map(put, state[k], island[k]) for k in self.island_keys}}

  def _virtual(self, slot):
    """Inside the shard_map: the virtual island in this island's `slot`."""
    return jax.lax.axis_index(AXIS) * self.slots + slot

  def _per_island(self, fn, state, *args, out_extra_specs=()):
    return jax.shard_map(fn, mesh=self.mesh, in_specs=(self.island_specs,) + (P(AXIS),) * len(args),
                         out_specs=(self.island_specs,) + out_extra_specs, axis_names={AXIS},
                         check_vma=False)(state, *args)

  def complete(self, saved):
    if set(self.saved_keys) == set(self.abstract):
      return saved

    def one(state):
      for slot in range(self.slots):
        island = self.inner.complete({k: v for k, v in self._island(state, slot).items()
                                      if k in self.inner.saved_keys})
        state = self._restack(state, island, slot)
      return (state,)

    # The derived leaves enter as zeros so the island specs cover the whole state.
    placeholder = {**saved, **{k: _stack(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), x),
                                         self.V)
                               for k, x in self.inner.abstract.items()
                               if k not in self.inner.saved_keys}}
    return self._per_island(one, placeholder)[0]

  def _sync(self, state):
    """One outer step, from inside an island (its local state: every slot); returns the state."""
    outer = state["outer"]
    number = outer["step"] + 1
    alive = jnp.asarray(self.alive_table)[jnp.minimum(number, self.alive_table.shape[0] - 1),
                             jax.lax.axis_index(AXIS)]
    islands = [self._island(state, slot) for slot in range(self.slots)]
    delta = self._outer_gradient(outer["params"],
                                 [self.inner.master_params(i) for i in islands],
                                 self._contributions(state, alive))
    updates, opt_state = self.outer_tx.update(delta, outer["opt_state"], outer["params"])
    new = optax.apply_updates(outer["params"], self._frozen(updates, outer))
    for slot, island in enumerate(islands):
      state = self._restack(state, self.inner.with_params(island, self._island_params(new, slot)),
                            slot)
    return {**state, "tokens": jnp.zeros_like(state["tokens"]),
            "outer": {**outer, "params": new, "opt_state": opt_state, "step": number}}

  def _contributions(self, state, alive):
    """Per slot: how much its island's pseudo-gradient weighs (its tokens; 0 when dropped)."""
    return [alive * state["tokens"][slot] for slot in range(self.slots)]

  def _frozen(self, updates, outer):
    """The outer updates with those of parameters that must not move zeroed."""
    return updates

  def _outer_gradient(self, theta, mine, contribution):
    """sum_r w_r (theta - theta_r), w_r = contribution_r / its sum over the islands (`mine` and
    `contribution`: one per slot, DiLoCo's one)."""
    (mine,), (contribution,) = mine, contribution
    weight = contribution / jax.lax.psum(contribution, AXIS)
    return jax.tree.map(
        lambda t, m: compression.weighted_sum(t - m, weight, self.fmt, AXIS, self.R), theta, mine)

  def _island_params(self, outer_params, slot):
    """The parameters of the island in `slot` after a sync."""
    return outer_params

  def update(self, state, batch):
    def island_step(state, batch):
      slot = 0 if self.slots == 1 else (state["step"] // self.H) % self.slots  # trains now
      island, metrics, _ = self.inner.update(self._island(state, slot), batch)
      state = self._restack(state, island, slot)
      tokens = (state["tokens"] + metrics["train/tokens"] if self.slots == 1 else
                state["tokens"].at[slot].add(metrics["train/tokens"]))
      state = jax.lax.cond(island["step"] % (self.H * self.slots) == 0, self._sync,
                           lambda s: s, {**state, "tokens": tokens})
      return state, {k: v[None] for k, v in metrics.items()}

    state, m = self._per_island(island_step, state, batch, out_extra_specs=(P(AXIS),))
    return state, self._metrics(m, state), None

  def _metrics(self, m, state):
    """The step's metrics from the islands' [R] ones."""
    tokens = m["train/tokens"]
    metrics = {"train/loss": jnp.sum(m["train/loss"] * tokens) / jnp.sum(tokens),
               "train/grad_norm": jnp.mean(m["train/grad_norm"]),
               "train/tokens": jnp.sum(tokens), "train/lr": m["train/lr"][0],
               "outer/step": state["outer"]["step"]}
    metrics.update({f"train/loss/replica{r}": m["train/loss"][r] for r in range(self.R)})
    return metrics

  def finish(self, state, extra):
    return state

  def model_params(self, state):
    return state["outer"]["params"]

  def annotate(self, step, record):
    """Host-side fields of a train record: bytes the syncs sent so far, and what data
    parallelism would have sent in the same steps."""
    return {**record, "outer/bytes_communicated": int(record["outer/step"]) * self.bytes_per_sync,
            "outer/bytes_data_parallel": step * self.bytes_data_parallel_per_step}

  def measure(self, state) -> dict:
    """Start-record fields measured on the live state."""
    return {}

  def describe(self) -> dict:
    return {"outer/replicas": self.R, "outer/inner_steps": self.H, "outer/compression": self.fmt,
            "outer/optimizer": self.optimizer_name, "outer/bytes_per_sync": self.bytes_per_sync,
            "outer/bytes_data_parallel_per_step": self.bytes_data_parallel_per_step,
            **self.inner.describe()}
