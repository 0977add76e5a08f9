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
    if replicas % P:
      raise ValueError(f"outer.modules gives {P} paths; mesh.replica ({replicas}) must be a "
                       "multiple of it (every path trains on mesh.replica / P islands)")
    self.grid, self.P, self.islands_per_path = grid, P, replicas // P
    self.groups = paths_lib.groups_of(inner.parts.abstract_params, grid)
    self.shard_tokens = list(shard_tokens) if shard_tokens is not None else None
    sizes = np.asarray(shard_tokens if shard_tokens is not None else [1.0] * P, np.float64)
    self.shard_scale = (sizes / sizes.mean()).astype(np.float32)  # s_p; all 1.0 when equal
    super().__init__(inner, outer_config, replicas, mesh)

  # -- the modules ---------------------------------------------------------------------------

  def _outer_params(self, tree, stack):
    return modules_of(tree, self.groups, self.grid, stack)

  def path_params(self, modules, path):
    """Path `path`'s parameters (the model's tree) assembled from the modules."""
    return assemble_path(modules, self.groups, self.grid, path)

  def _path(self):
    """Inside the shard_map: the path this island trains."""
    return jax.lax.axis_index(AXIS) // self.islands_per_path

  def _island_params(self, outer_params):
    return self.path_params(outer_params, self._path())

  def _outer_gradient(self, modules, mine, contribution):
    path = self._path()
    contribution = contribution * jnp.asarray(self.shard_scale)[path]

    def one(theta, m, group):
      count, table = self.grid.count(group), jnp.asarray(self.grid.table(group))
      own = jax.nn.one_hot(table[path], count, dtype=jnp.float32)  # [modules]
      through = jax.lax.psum(own * contribution, AXIS)  # [modules]: sum of c over each module
      weight = contribution / jnp.maximum(through[table[path]], jnp.finfo(jnp.float32).tiny)
      if count == 1:  # one module: DiLoCo's exchange, term for term
        delta = compression.weighted_sum(theta[0] - m, weight, self.fmt, AXIS, self.R)[None]
      else:
        mask = own.reshape((count,) + (1,) * m.ndim)
        delta = compression.weighted_sum(mask * (theta[table[path]] - m)[None], weight,
                                         self.fmt, AXIS, self.R)
      rescale = np.sqrt(self.grid.paths_through(group) / self.P).astype(np.float32)
      return delta * jnp.asarray(rescale).reshape((count,) + (1,) * m.ndim)

    return jax.tree.map(one, modules, mine, self.groups)

  # -- what a step reports ---------------------------------------------------------------------

  def _metrics(self, m, state):
    metrics = super()._metrics(m, state)
    loss, tokens = m["train/loss"], m["train/tokens"]
    for p in range(self.P):
      islands = slice(p * self.islands_per_path, (p + 1) * self.islands_per_path)
      metrics[f"train/loss/path{p}"] = (jnp.sum(loss[islands] * tokens[islands])
                                        / jnp.maximum(jnp.sum(tokens[islands]), 1.0))
    return metrics

  def model_params(self, state):
    """Path 0's parameters (evaluation and sampling take a path: `path_params`)."""
    return self.path_params(state["outer"]["params"], 0)

  def _bytes_per_sync(self, abstract_params) -> int:
    """The most one island sends per sync when each module's islands all-reduce it alone."""
    def island_bytes(r):
      path = r // self.islands_per_path
      total = 0
      for x, g in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(self.groups)):
        islands = self.grid.paths_through(g)[self.grid.module_of(g, path)] * self.islands_per_path
        total += compression.bytes_sent([math.prod(x.shape)], self.fmt, int(islands))
      return total
    return max(island_bytes(r) for r in range(self.R))

  def _bytes_on_wire(self, abstract_params) -> int:
    """What one island sends per sync in this program's masked exchange."""
    sizes = [math.prod(x.shape) * self.grid.count(g) for x, g in
             zip(jax.tree.leaves(abstract_params), jax.tree.leaves(self.groups))]
    return compression.bytes_sent(sizes, self.fmt, self.R)

  def annotate(self, step, record):
    record = super().annotate(step, record)
    wire = self._bytes_on_wire(self.inner.parts.abstract_params)
    return {**record, "outer/bytes_on_wire": int(record["outer/step"]) * wire}

  def describe(self) -> dict:
    return {**super().describe(), "outer/modules": "x".join(map(str, self.grid.modules)),
            "outer/paths": self.P, "outer/private": ",".join(sorted(self.grid.private)),
            "outer/islands_per_path": self.islands_per_path,
            "outer/shard_tokens": self.shard_tokens,  # None: built without data (equal)
            "outer/shard_scale": [float(s) for s in self.shard_scale],
            "outer/bytes_on_wire_per_sync": self._bytes_on_wire(self.inner.parts.abstract_params)}
