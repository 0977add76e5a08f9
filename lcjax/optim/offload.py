"""Deep Optimizer States (arXiv 2410.21316): the fp32 master parameters and AdamW moments live in
host memory (memory kind pinned_host), split into subgroups of about optim.subgroup_mb; each
subgroup updates either on the host or streamed through the device, as `perf_model` decides.

The state keeps the layout of the on-device optimizer ({"params", "opt_state"} of optax.adamw
after global-norm clipping), only placed in host memory, so checkpoints are interchangeable.
The update equals optax.adamw: with g the clipped gradient, n the update count after this step,
  mu = (1-b1) g + b1 mu,  nu = (1-b2) g^2 + b2 nu,
  p  = p - lr(n-1) * ( mu/(1-b1^n) / (sqrt(nu/(1-b2^n)) + eps) + wd * mask * p ).

One update in two parts (the train step, optim/offload_step.py, fuses the first with the
backward pass):
  `in_jit`  traced inside a jit once the clipped gradients exist: each device-lane subgroup's
            state moves pinned_host -> device, updates, moves back; each host-lane subgroup's
            gradients move to pinned_host. These are memory-space transfers inside one program,
            so XLA may start a subgroup's as soon as its operands exist. On the CPU backend they
            lower to nothing (one RAM); on GPU/TPU to annotate_device_placement custom calls.
  `finish`  after that jit: the host lanes (optim/host_lane.py) update their subgroups, and the
            pieces are put back together in optax's pytree layout.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax import optim
from lcjax.optim import host_lane, perf_model

HOST, DEVICE = "pinned_host", "device"


def _adamw(o, lr_schedule, decay, compute_dtype, step, params, grads, mu, nu):
  """One AdamW step on lists of leaves; `step` is the update count before this step."""
  count = step + 1
  lr = lr_schedule(step)
  c1, c2 = 1 - o.b1 ** count, 1 - o.b2 ** count
  new_p, new_mu, new_nu = [], [], []
  for p, g, m, v, d in zip(params, grads, mu, nu, decay):
    g = g.astype(p.dtype)
    m = (1 - o.b1) * g + o.b1 * m
    v = (1 - o.b2) * (g ** 2) + o.b2 * v
    u = (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype)) + o.eps)
    if d:
      u = u + o.weight_decay * p
    u = jnp.array(-lr, u.dtype) * u
    new_p.append((p + u).astype(p.dtype))
    new_mu.append(m)
    new_nu.append(v)
  return new_p, new_mu, new_nu, [p.astype(compute_dtype) for p in new_p]


def _to(xs, space):
  """Each leaf moved to memory space `space` (jax.memory.Space), its sharding kept: inside a jit a
  memory-space transfer, also inside a shard_map (an outer loop's island)."""
  return [jax.device_put(x, space) for x in xs]


_DEVICE_SPACE, _HOST_SPACE = jax.memory.Space.Device, jax.memory.Space.Host


def _leaf_roles(opt_state, n_params):
  """Per flattened opt_state leaf: ("mu"|"nu", param index) or ("count", None)."""
  roles, seen = [], {"mu": 0, "nu": 0}
  for path, _ in jax.tree_util.tree_leaves_with_path(opt_state):
    names = [getattr(k, "name", None) for k in path]
    role = next((n for n in names if n in ("mu", "nu", "count")), None)
    if role is None:
      raise ValueError(f"optim.offload supports optax adamw state only; found leaf "
                       f"{jax.tree_util.keystr(path)}")
    if role == "count":
      roles.append(("count", None))
    else:
      roles.append((role, seen[role]))
      seen[role] += 1
  assert seen == {"mu": n_params, "nu": n_params}, seen
  return roles


def subgroups(param_bytes, subgroup_mb):
  """Whole leaves, in order, packed into groups of at least subgroup_mb MiB (the last: less)."""
  groups, current, size = [], [], 0
  for i, b in enumerate(param_bytes):
    current.append(i)
    size += b
    if size >= subgroup_mb * 2 ** 20:
      groups.append(current)
      current, size = [], 0
  if current:
    groups.append(current)
  return groups


class OffloadedAdamW:
  """Host-resident AdamW state in subgroups, with a host lane and a device lane."""

  def __init__(self, config, abstract_params, abstract_opt_state, compute_dtype, mesh, *,
               host_lanes: bool = True, measure_links: bool = True):
    """host_lanes=False: every subgroup streams through the device inside the step's jit (what
    an island of an outer loop needs: its whole update is one traced function).
    measure_links=False: unconfigured link figures are not measured (ahead-of-time compiles)."""
    o = config.optim
    self.mesh = mesh
    self.compute_dtype = compute_dtype
    leaves, self.params_def = jax.tree.flatten(abstract_params)
    self.opt_def = jax.tree.structure(abstract_opt_state)
    self.roles = _leaf_roles(abstract_opt_state, len(leaves))
    self.device_sh = [x.sharding.with_memory_kind(DEVICE) for x in leaves]
    self.host_sh = [x.sharding.with_memory_kind(HOST) for x in leaves]
    self.scalar_device = NamedSharding(mesh, P(), memory_kind=DEVICE)
    self.scalar_host = NamedSharding(mesh, P(), memory_kind=HOST)
    self.decay = [bool(d) for d in jax.tree.leaves(optim.decay_mask(abstract_params))]
    self.param_bytes = [int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves]
    self.groups = subgroups(self.param_bytes, o.subgroup_mb)
    self.group_bytes = [sum(self.param_bytes[i] for i in g) for g in self.groups]
    self.host_lane_kind = host_lane.resolve(o.host_lane, mesh)
    self._adamw = functools.partial(_adamw, o, optim.schedule(config.train))
    self._optim_config = o
    self.update_on = "device" if not host_lanes else o.update_on
    self.measure_links = measure_links
    self._update_jit = None

  @functools.cached_property
  def _plan(self):
    """(figures, on_device, predicted_s), made on first use, never at construction: building a
    program to sample from or to compile ahead of time measures nothing."""
    o, n = self._optim_config, len(self.groups)
    configured = self._configured_figures(o)
    if self.update_on == "auto" and configured is None and not self.measure_links:
      # Compiled ahead of time: this machine's links say nothing of the target's; every
      # subgroup streams through the device (the lane that needs device memory).
      return None, [True] * n, float("nan")
    figures = configured
    if figures is None and (self.update_on == "auto" or self.measure_links):
      figures = self._measured_figures(o)
    if self.update_on == "auto":
      return (figures, *perf_model.choose(figures, self.group_bytes))
    on_device = {"host": [False] * n, "device": [True] * n,
                 "alternate": [i % 2 == 0 for i in range(n)]}[self.update_on]
    predicted = (perf_model.predicted_time(figures, self.group_bytes, on_device)
                 if figures is not None else float("nan"))
    return figures, on_device, predicted

  @property
  def figures(self):
    return self._plan[0]

  @property
  def on_device(self):
    return self._plan[1]

  @property
  def predicted_s(self):
    return self._plan[2]

  @functools.cached_property
  def device_leaves(self):
    return [i for k, g in enumerate(self.groups) if self.on_device[k] for i in g]

  @functools.cached_property
  def host_leaves(self):
    return [i for k, g in enumerate(self.groups) if not self.on_device[k] for i in g]

  @functools.cached_property
  def host_lanes(self):
    return {k: self._host_lane(g) for k, g in enumerate(self.groups) if not self.on_device[k]}

  def _update_fn(self, group):
    """(step, p, g, mu, nu) -> (p, mu, nu, compute copy) for the leaves of `group`."""
    return functools.partial(self._adamw, tuple(self.decay[i] for i in group), self.compute_dtype)

  def _host_lane(self, group):
    return host_lane.make(self.host_lane_kind, self._update_fn(group),
                          [self.host_sh[i] for i in group], [self.device_sh[i] for i in group],
                          self.scalar_host)

  @staticmethod
  def _given(o) -> dict:
    return {"h2d_bps": o.h2d_gbps, "d2h_bps": o.d2h_gbps, "host_update_bps": o.host_update_gbps,
            "device_update_bps": o.device_update_gbps}

  def _configured_figures(self, o):
    given = self._given(o)
    if all(v > 0 for v in given.values()):
      return perf_model.Figures(**{k: v * 1e9 for k, v in given.items()})
    return None

  def _measured_figures(self, o):
    """Configured figures; those set to 0 are measured on a probe of about one subgroup."""
    given = self._given(o)
    n_dev = self.mesh.devices.size
    n = max(1, int(min(o.subgroup_mb, 64) * 2 ** 20 / 4 / n_dev)) * n_dev
    host = NamedSharding(self.mesh, P(self.mesh.axis_names), memory_kind=HOST)
    dev = host.with_memory_kind(DEVICE)
    x_host = jax.device_put(jnp.ones((n,), jnp.float32), host)
    x_dev = jax.device_put(x_host, dev)
    nbytes, measured = 4 * n, {}
    measured["h2d_bps"] = nbytes / perf_model.median_seconds(
        lambda: jax.device_put(x_host, dev).block_until_ready())
    measured["d2h_bps"] = nbytes / perf_model.median_seconds(
        lambda: jax.device_put(x_dev, host).block_until_ready())
    update = functools.partial(self._adamw, (True,), self.compute_dtype)
    lane = host_lane.make(self.host_lane_kind, update, [host], [dev], self.scalar_host)
    on_device = jax.jit(update, in_shardings=(self.scalar_device,) + ([dev],) * 4,
                        out_shardings=([dev],) * 4)
    for key, fn, x in (("host_update_bps", lane, x_host), ("device_update_bps", on_device, x_dev)):
      step = jnp.zeros((), jnp.int32)
      measured[key] = 3 * nbytes / perf_model.median_seconds(
          lambda: jax.block_until_ready(fn(step, [x], [x], [x], [x])))
    return perf_model.Figures(**{k: (v * 1e9 if v > 0 else measured[k]) for k, v in given.items()})

  def host_shardings(self) -> dict:
    """Shardings of {"params", "opt_state"} as they live with offload: all in host memory."""
    opt = [self.scalar_host if role == "count" else self.host_sh[i] for role, i in self.roles]
    return {"params": self.params_def.unflatten(self.host_sh),
            "opt_state": self.opt_def.unflatten(opt)}

  def split(self, params, opt_state):
    """(params, mu, nu) as lists of leaves in parameter order."""
    p = jax.tree.leaves(params)
    moments = {"mu": [None] * len(p), "nu": [None] * len(p)}
    for x, (role, i) in zip(jax.tree.leaves(opt_state), self.roles):
      if role != "count":
        moments[role][i] = x
    return p, moments["mu"], moments["nu"]

  def join(self, p, mu, nu, count):
    """The inverse of `split`, every count leaf set to `count`."""
    moments = {"mu": mu, "nu": nu}
    opt = [count if role == "count" else moments[role][i] for role, i in self.roles]
    return self.params_def.unflatten(p), self.opt_def.unflatten(opt)

  def device_lane_state(self, params, opt_state):
    """(params, mu, nu) of the device-lane leaves, in host memory: `in_jit`'s state argument."""
    return tuple([xs[i] for i in self.device_leaves] for xs in self.split(params, opt_state))

  def in_jit(self, step, grads, lane_state):
    """Traced inside a jit: `grads` (clipped, per leaf, on the device) and `lane_state` (from
    `device_lane_state`) -> what `finish` needs. `step` is the count before this update."""
    ins = [dict(zip(self.device_leaves, xs)) for xs in lane_state]
    new = ([], [], [], [])  # params, mu, nu (host memory), compute copy (device memory)
    for k, group in enumerate(self.groups):
      if not self.on_device[k]:
        continue
      p, m, v = (_to([x[i] for i in group], _DEVICE_SPACE) for x in ins)
      p, m, v, c = self._update_fn(group)(step, p, [grads[i] for i in group], m, v)
      for out, xs in zip(new, (*(_to(x, _HOST_SPACE) for x in (p, m, v)), c)):
        out.extend(xs)
    return {"state": new[:3], "compute": new[3],
            "grads": _to([grads[i] for i in self.host_leaves], _HOST_SPACE),
            "step": jax.device_put(step, _HOST_SPACE),
            "count": jax.device_put(step + 1, _HOST_SPACE)}

  def in_jit_shardings(self):
    """(shardings of `in_jit`'s lane_state argument, shardings of its result)."""
    host = [self.host_sh[i] for i in self.device_leaves]
    result = {"state": (host,) * 3, "compute": [self.device_sh[i] for i in self.device_leaves],
              "grads": [self.host_sh[i] for i in self.host_leaves],
              "step": self.scalar_host, "count": self.scalar_host}
    return (host,) * 3, result

  def merge_device_lane(self, params, opt_state, compute, out):
    """Traceable: `in_jit`'s device-lane results written into (params, opt_state, compute copy);
    the host-lane leaves stay as they were (their lanes run in `run_host_lanes`)."""
    p, mu, nu = self.split(params, opt_state)
    c = jax.tree.leaves(compute)
    for j, i in enumerate(self.device_leaves):
      p[i], mu[i], nu[i], c[i] = (xs[j] for xs in (*out["state"], out["compute"]))
    params, opt_state = self.join(p, mu, nu, out["count"])
    return params, opt_state, self.params_def.unflatten(c)

  def host_lane_inputs(self, out):
    """What the host lanes need from `in_jit`'s result (None when there are none)."""
    return {"grads": out["grads"], "step": out["step"]} if self.host_leaves else None

  def host_lane_shardings(self):
    _, result = self.in_jit_shardings()
    return {"grads": result["grads"], "step": result["step"]} if self.host_leaves else None

  def run_host_lanes(self, params, opt_state, compute, inputs):
    """Outside the jit: the host lanes update their subgroups of (params, opt_state, compute)."""
    if inputs is None:
      return params, opt_state, compute
    p, mu, nu = self.split(params, opt_state)
    c = jax.tree.leaves(compute)
    grads = dict(zip(self.host_leaves, inputs["grads"]))
    for k, lane in self.host_lanes.items():
      group = self.groups[k]
      new = lane(inputs["step"], *([xs[i] for i in group] for xs in (p, grads, mu, nu)))
      for j, i in enumerate(group):
        p[i], mu[i], nu[i], c[i] = (xs[j] for xs in new)
    count = next(x for x, (role, _) in zip(jax.tree.leaves(opt_state), self.roles)
                 if role == "count")
    params, opt_state = self.join(p, mu, nu, count)
    return params, opt_state, self.params_def.unflatten(c)

  def update(self, step, grads, params, opt_state, compute):
    """The update alone (no backward pass): `in_jit` in a jit of its own, then the host lanes."""
    if self._update_jit is None:
      lane_sh, out_sh = self.in_jit_shardings()
      self._update_jit = jax.jit(self.in_jit, out_shardings=out_sh,
                                 in_shardings=(self.scalar_device, self.device_sh, lane_sh))
    out = self._update_jit(step, jax.tree.leaves(grads), self.device_lane_state(params, opt_state))
    params, opt_state, compute = self.merge_device_lane(params, opt_state, compute, out)
    return self.run_host_lanes(params, opt_state, compute, self.host_lane_inputs(out))

  def compute_copy(self, params_host):
    """Traceable: the device's compute-dtype copy of host master parameters (moved in, cast)."""
    return jax.tree.map(lambda p: jax.device_put(p, _DEVICE_SPACE).astype(self.compute_dtype),
                        params_host)

  def measure_update_s(self, state, repeats: int = 3) -> float:
    """Median wall time of one whole offloaded update on the live state (its result discarded)."""
    grads = jax.tree.map(lambda c: c.astype(jnp.float32), state["compute"])
    return perf_model.median_seconds(lambda: jax.block_until_ready(
        self.update(state["step"], grads, state["params"], state["opt_state"], state["compute"])),
        repeats)

  def describe(self) -> dict:
    """The performance model's inputs, its choice and prediction, for the start record."""
    f = self.figures
    record = {} if f is None else {
        "optim/h2d_gbps": f.h2d_bps / 1e9, "optim/d2h_gbps": f.d2h_bps / 1e9,
        "optim/host_update_gbps": f.host_update_bps / 1e9,
        "optim/device_update_gbps": f.device_update_bps / 1e9}
    return {**record, "optim/update_on": self.update_on,
            "optim/host_lane": self.host_lane_kind, "optim/subgroups": len(self.groups),
            "optim/subgroup_bytes": self.group_bytes,
            "optim/device_subgroups": [k for k, d in enumerate(self.on_device) if d],
            "optim/predicted_update_s": self.predicted_s}
