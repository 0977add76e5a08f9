"""DiPaCo (arXiv 2403.10616): DiLoCo's outer loop over paths composed of shared modules.

The grid (paths.py): level l of the model has K_l candidate modules, a path picks one per level,
P = K_1 ... K_L paths. The islands (`mesh.replica` = R, a multiple of P) train the paths, R / P
islands per path, island r training path r // (R / P) on its share of that path's shard of the
data (routing.py). With one module per level there is one path, every island trains it: that is
DiLoCo, exactly (the same arithmetic, in the same order).

State: DiLoCo's, except that the outer parameters are the *modules*: every parameter leaf with a
leading dimension of its group's module count (1 shared, K_l for level l, P private), each
module held once, with its outer optimizer state. An island holds one path.

The outer step, every H inner steps, per module m (a slice of a group's leading dimension):
  delta_m = sqrt(n_m / P) sum_{r through m} w_r (theta_m - theta_r),
            w_r = c_r / sum_{r' through m} c_r',  c_r = tokens_r x s_path(r)
where theta_r is island r's copy of module m, tokens_r the target tokens it trained on since the
last sync (0 for an island dropped from this step), s_p the size of path p's shard relative to
the mean shard (shards of unequal size weigh in proportion) and n_m the number of paths through
m. The paper rescales the averaged outer gradient of a module by sqrt(n_m) (averaging n pseudo-
gradients shrinks their noise by sqrt(n)); dividing by sqrt(P) leaves a module every path shares
unscaled, so one module per level is DiLoCo at the same outer learning rate. Then the outer
optimizer (Nesterov SGD per element: per module) steps every module, private ones included, and
every island takes its path's modules.

The exchange: each island contributes its deltas into a [modules, ...] tensor that is zero
outside its own modules, summed over all islands (compression.weighted_sum, compressed as
`outer.compression`). That moves every module to every island; the method needs only module m's
islands to meet (a grouped all-reduce per module). `outer/bytes_communicated` counts the
method's (per module, over the islands through it: zero for a module only one island trains);
`outer/bytes_on_wire` what this program's collective sends.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.outer import compression
from lcjax.outer import paths as paths_lib
from lcjax.outer.diloco import AXIS, DiLoCo


def modules_of(tree, groups, grid: paths_lib.PathGrid, stack):
  """The modules' tree from a tree of the model's: `stack(leaf, count)` gives each leaf its
  group's leading module dimension."""
  return jax.tree.map(lambda x, g: stack(x, grid.count(g)), tree, groups)


def assemble_path(modules, groups, grid: paths_lib.PathGrid, path):
  """Path `path`'s parameters (the model's tree) from the modules (`path` may be traced)."""
  return jax.tree.map(lambda m, g: m[jnp.asarray(grid.table(g))[path]], modules, groups)


class DiPaCo(DiLoCo):
  name = "dipaco"

  def __init__(self, inner, outer_config, replicas: int, mesh, grid: paths_lib.PathGrid,
               shard_tokens=None):
    P = grid.num_paths
    if replicas % P and P % replicas:
      raise ValueError(f"outer.modules gives {P} paths; mesh.replica ({replicas}) must be a "
                       "multiple of it (every path trains on mesh.replica / P islands) or divide "
                       "it (the paths train in P / mesh.replica rounds)")
    self.grid, self.P = grid, P
    self.slots = max(1, P // replicas)  # rounds: island r trains paths r*S .. r*S + S-1 in turn
    self.islands_per_path = replicas * self.slots // P
    self.groups = paths_lib.groups_of(inner.parts.abstract_params, grid)
    self.shard_tokens = list(shard_tokens) if shard_tokens is not None else None
    sizes = np.asarray(shard_tokens if shard_tokens is not None else [1.0] * P, np.float64)
    self.shard_scale = (sizes / sizes.mean()).astype(np.float32)  # s_p; all 1.0 when equal
    self.early_stopping = bool(outer_config.early_stopping)
    super().__init__(inner, outer_config, replicas, mesh)

  # -- the modules ---------------------------------------------------------------------------

  def _outer_params(self, tree, stack):
    return modules_of(tree, self.groups, self.grid, stack)

  def path_params(self, modules, path):
    """Path `path`'s parameters (the model's tree) assembled from the modules."""
    return assemble_path(modules, self.groups, self.grid, path)

  def _path(self, slot=0):
    """Inside the shard_map: the path of the island in `slot`."""
    return self._virtual(slot) // self.islands_per_path

  def _island_params(self, outer_params, slot):
    return self.path_params(outer_params, self._path(slot))

  def _outer_gradient(self, modules, mine, contribution):
    """Per module (the module docstring); `mine` and `contribution` hold one entry per slot.
    With several slots an island sums its slots' weighted terms before the exchange."""
    paths = [self._path(slot) for slot in range(self.slots)]

    def one(theta, group, *mine):
      count, table = self.grid.count(group), jnp.asarray(self.grid.table(group))
      own = [jax.nn.one_hot(table[p], count, dtype=jnp.float32) for p in paths]  # [modules]
      # [modules]: the sum of c over the islands through each module
      through = jax.lax.psum(sum(o * c for o, c in zip(own, contribution)), AXIS)
      weight = [c / jnp.maximum(through[table[p]], jnp.finfo(jnp.float32).tiny)
                for c, p in zip(contribution, paths)]
      shape = (count,) + (1,) * mine[0].ndim
      if self.slots > 1:
        local = sum(w * o.reshape(shape) * (theta[table[p]] - m)[None]
                    for w, o, p, m in zip(weight, own, paths, mine))
        delta = compression.weighted_sum(local, 1.0, self.fmt, AXIS, self.R)
      elif count == 1:  # one module: DiLoCo's exchange, term for term
        delta = compression.weighted_sum(theta[0] - mine[0], weight[0], self.fmt, AXIS,
                                         self.R)[None]
      else:
        delta = compression.weighted_sum(own[0].reshape(shape) * (theta[table[paths[0]]]
                                                                  - mine[0])[None],
                                         weight[0], self.fmt, AXIS, self.R)
      rescale = np.sqrt(self.grid.paths_through(group) / self.P).astype(np.float32)
      return delta * jnp.asarray(rescale).reshape(shape)

    return jax.tree.map(one, modules, self.groups, *mine)

  def _contributions(self, state, alive):
    """c_r = tokens_r x s_path(r) (0 when dropped, or when its path has stopped early)."""
    out = []
    for slot, c in enumerate(super()._contributions(state, alive)):
      path = self._path(slot)
      c = c * jnp.asarray(self.shard_scale)[path]
      if self.early_stopping:
        c = c * (1.0 - state["outer"]["paths"]["stopped"][path])
      out.append(c)
    return out

  # -- early stopping per path ---------------------------------------------------------------

  def _outer_extras(self) -> dict:
    if not self.early_stopping:
      return {}
    return {"paths": {"best": jnp.full((self.P,), jnp.inf, jnp.float32),
                      "stopped": jnp.zeros((self.P,), jnp.float32)}}

  def _frozen(self, updates, outer):
    """A module no running path goes through keeps its parameters (the outer momentum would
    move it on zero pseudo-gradients)."""
    if not self.early_stopping:
      return updates
    running = 1.0 - outer["paths"]["stopped"]  # [P]

    def one(u, group):
      live = jax.ops.segment_sum(running, jnp.asarray(self.grid.table(group)),
                                 num_segments=self.grid.count(group)) > 0
      return u * live.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))

    return jax.tree.map(one, updates, self.groups)

  def early_stop(self, state, losses):
    """After an evaluation: `losses` [P] the held-out loss of each path (inf: none). A path
    whose loss is above its best so far stops for the rest of the run."""
    paths = state["outer"]["paths"]
    worse = jnp.isfinite(losses) & (losses > paths["best"])
    stopped = jnp.maximum(paths["stopped"], worse.astype(jnp.float32))
    paths = {"best": jnp.minimum(paths["best"], losses), "stopped": stopped}
    return {**state, "outer": {**state["outer"], "paths": paths}}

  # -- what a step reports ---------------------------------------------------------------------

  def _metrics(self, m, state):
    """Per path: its islands' loss and tokens this step (zero tokens: not trained this round;
    `annotate` drops its loss)."""
    metrics = super()._metrics(m, state)
    loss, tokens = m["train/loss"], m["train/tokens"]
    slot = 0 if self.slots == 1 else ((state["step"] - 1) // self.H) % self.slots
    path_of = (jnp.arange(self.R) * self.slots + slot) // self.islands_per_path  # [R]
    for p in range(self.P):
      mine = tokens * (path_of == p)
      metrics[f"train/tokens/path{p}"] = jnp.sum(mine)
      metrics[f"train/loss/path{p}"] = jnp.sum(loss * mine) / jnp.maximum(jnp.sum(mine), 1.0)
    if self.early_stopping:
      metrics["outer/paths_stopped"] = jnp.sum(state["outer"]["paths"]["stopped"])
    return metrics

  def model_params(self, state):
    """Path 0's parameters (evaluation and sampling take a path: `path_params`)."""
    return self.path_params(state["outer"]["params"], 0)

  def _bytes_per_sync(self, abstract_params) -> int:
    """The most one island sends per sync when each module's islands all-reduce it alone (an
    island training several paths in rounds sends each of their modules once)."""
    def paths_of(r):
      return {(r * self.slots + k) // self.islands_per_path for k in range(self.slots)}

    def island_bytes(r):
      total = 0
      for x, g in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(self.groups)):
        for module in {self.grid.module_of(g, p) for p in paths_of(r)}:
          islands = sum(any(self.grid.module_of(g, p) == module for p in paths_of(q))
                        for q in range(self.R))
          total += compression.bytes_sent([math.prod(x.shape)], self.fmt, islands)
      return total
    return max(island_bytes(r) for r in range(self.R))

  def _bytes_on_wire(self, abstract_params) -> int:
    """What one island sends per sync in this program's masked exchange."""
    sizes = [math.prod(x.shape) * self.grid.count(g) for x, g in
             zip(jax.tree.leaves(abstract_params), jax.tree.leaves(self.groups))]
    return compression.bytes_sent(sizes, self.fmt, self.R)

  def annotate(self, step, record):
    record = super().annotate(step, record)
    for p in range(self.P):  # a path trained in another round has no loss this step
      if record.get(f"train/tokens/path{p}") == 0:
        record.pop(f"train/loss/path{p}", None)
    wire = self._bytes_on_wire(self.inner.parts.abstract_params)
    return {**record, "outer/bytes_on_wire": int(record["outer/step"]) * wire}

  def describe(self) -> dict:
    return {**super().describe(), "outer/modules": "x".join(map(str, self.grid.modules)),
            "outer/paths": self.P, "outer/private": ",".join(sorted(self.grid.private)),
            "outer/islands_per_path": self.islands_per_path, "outer/rounds": self.slots,
            "outer/shard_tokens": self.shard_tokens,  # None: built without data (equal)
            "outer/shard_scale": [float(s) for s in self.shard_scale],
            "outer/bytes_on_wire_per_sync": self._bytes_on_wire(self.inner.parts.abstract_params)}
