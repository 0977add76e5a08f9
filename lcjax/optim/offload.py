"""Deep Optimizer States (arXiv 2410.21316): the fp32 master parameters and AdamW moments live in
host memory (memory kind pinned_host), split into subgroups of about optim.subgroup_mb; each
subgroup updates either on the host or streamed through the device, as `perf_model` decides.

The state keeps the layout of the on-device optimizer ({"params", "opt_state"} of optax.adamw
after global-norm clipping), only placed in host memory, so checkpoints are interchangeable.
The update equals optax.adamw: with g the clipped gradient, n the update count after this step,
  mu = (1-b1) g + b1 mu,  nu = (1-b2) g^2 + b2 nu,
  p  = p - lr(n-1) * ( mu/(1-b1^n) / (sqrt(nu/(1-b2^n)) + eps) + wd * mask * p ).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax import optim
from lcjax.optim import perf_model

HOST, DEVICE = "pinned_host", "device"


def _on_host(fn):
  """`fn` traced to run on the host. On the CPU backend host memory is the device's own RAM,
  so a plain jit over pinned_host arrays already computes there; on accelerators the body is
  annotated with compute_on("device_host") (context-manager form, jax <= 0.11; PITFALLS.md),
  which is unverified on a GPU in this repository."""
  if jax.default_backend() == "cpu":
    return fn
  from jax.experimental.compute_on import compute_on

  def on_host(*args):
    with compute_on("device_host"):
      return fn(*args)
  return on_host


def _adamw(o, lr_schedule, decay, compute_dtype, params, grads, mu, nu, step):
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

  def __init__(self, config, abstract_params, abstract_opt_state, compute_dtype, mesh):
    o = config.optim
    self.mesh = mesh
    leaves, self.params_def = jax.tree.flatten(abstract_params)
    self.opt_def = jax.tree.structure(abstract_opt_state)
    self.roles = _leaf_roles(abstract_opt_state, len(leaves))
    self.device_sh = [x.sharding.with_memory_kind(DEVICE) for x in leaves]
    self.host_sh = [x.sharding.with_memory_kind(HOST) for x in leaves]
    self.scalar_device = NamedSharding(mesh, P(), memory_kind=DEVICE)
    self.scalar_host = NamedSharding(mesh, P(), memory_kind=HOST)
    decay = jax.tree.leaves(optim.decay_mask(abstract_params))
    self.param_bytes = [int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves]
    self.groups = subgroups(self.param_bytes, o.subgroup_mb)
    self.group_bytes = [sum(self.param_bytes[i] for i in g) for g in self.groups]
    lr_schedule = optim.schedule(config.train)

    def jitted(group, kind):
      sh = [(self.host_sh if kind == HOST else self.device_sh)[i] for i in group]
      scalar = self.scalar_host if kind == HOST else self.scalar_device
      flags = tuple(bool(decay[i]) for i in group)
      fn = lambda p, g, m, v, s: _adamw(o, lr_schedule, flags, compute_dtype, p, g, m, v, s)
      fn = _on_host(fn) if kind == HOST else fn
      return jax.jit(fn, in_shardings=(sh, sh, sh, sh, scalar), out_shardings=(sh, sh, sh, sh))

    self._host_update = [jitted(g, HOST) for g in self.groups]
    self._device_update = [jitted(g, DEVICE) for g in self.groups]
    self.figures = self._figures(o, lr_schedule, compute_dtype)
    self.on_device, self.predicted_s = self._placement(o.update_on)

  def _placement(self, update_on):
    n = len(self.groups)
    if update_on == "auto":
      return perf_model.choose(self.figures, self.group_bytes)
    on_device = {"host": [False] * n, "device": [True] * n,
                 "alternate": [i % 2 == 0 for i in range(n)]}[update_on]
    return on_device, perf_model.predicted_time(self.figures, self.group_bytes, on_device)

  def _figures(self, o, lr_schedule, compute_dtype):
    """Configured figures; those set to 0 are measured on a probe of about one subgroup."""
    given = {"h2d_bps": o.h2d_gbps, "d2h_bps": o.d2h_gbps, "host_update_bps": o.host_update_gbps,
             "device_update_bps": o.device_update_gbps}
    if all(v > 0 for v in given.values()):
      return perf_model.Figures(**{k: v * 1e9 for k, v in given.items()})
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
    for key, sh, x, scalar in (("host_update_bps", host, x_host, self.scalar_host),
                               ("device_update_bps", dev, x_dev, self.scalar_device)):
      fn = lambda p, g, m, v, s: _adamw(o, lr_schedule, (True,), compute_dtype, p, g, m, v, s)
      fn = jax.jit(_on_host(fn) if sh is host else fn, in_shardings=([sh],) * 4 + (scalar,),
                   out_shardings=([sh],) * 4)
      step = jax.device_put(jnp.zeros((), jnp.int32), scalar)
      measured[key] = 3 * nbytes / perf_model.median_seconds(
          lambda: jax.block_until_ready(fn([x], [x], [x], [x], step)))
    return perf_model.Figures(**{k: (v * 1e9 if v > 0 else measured[k]) for k, v in given.items()})

  def to_host(self, params, opt_state):
    """Places a {"params", "opt_state"} pair (from init or a checkpoint) in host memory."""
    params = self.params_def.unflatten(
        [jax.device_put(x, s) for x, s in zip(jax.tree.leaves(params), self.host_sh)])
    opt = []
    for x, (role, i) in zip(jax.tree.leaves(opt_state), self.roles):
      opt.append(jax.device_put(x, self.scalar_host if role == "count" else self.host_sh[i]))
    return params, self.opt_def.unflatten(opt)

  def compute_copy(self, params_host, compute_dtype):
    """The device's compute-dtype copy of host master parameters."""
    return self.params_def.unflatten([
        jax.device_put(x, s).astype(compute_dtype)
        for x, s in zip(jax.tree.leaves(params_host), self.device_sh)])

  def update(self, step, grads, params, opt_state):
    """(params, opt_state) in host memory, the clipped `grads` on the device, `step` the count
    before this update -> (new params, new opt_state, new compute copy on the device).
    Device-lane subgroups are dispatched first so their transfers overlap the host updates."""
    p_all = jax.tree.leaves(params)
    g_all = jax.tree.leaves(grads)
    opt_leaves = jax.tree.leaves(opt_state)
    mu_all, nu_all = [None] * len(p_all), [None] * len(p_all)
    for x, (role, i) in zip(opt_leaves, self.roles):
      if role == "mu":
        mu_all[i] = x
      elif role == "nu":
        nu_all[i] = x
    new_p, new_mu, new_nu, new_c = ([None] * len(p_all) for _ in range(4))
    step_host = jax.device_put(step, self.scalar_host)
    order = sorted(range(len(self.groups)), key=lambda k: not self.on_device[k])
    for k in order:
      group = self.groups[k]
      take = lambda xs, sh: [jax.device_put(xs[i], sh[i]) for i in group]
      if self.on_device[k]:  # stream the state through the device
        dev = self.device_sh
        p, m, v, c = self._device_update[k](take(p_all, dev), [g_all[i] for i in group],
                                            take(mu_all, dev), take(nu_all, dev), step)
        p, m, v = (take_back(xs, group, self.host_sh) for xs in (p, m, v))
      else:  # gradients down, update on the host, compute copy up
        p, m, v, c = self._host_update[k]([p_all[i] for i in group], take(g_all, self.host_sh),
                                          [mu_all[i] for i in group], [nu_all[i] for i in group],
                                          step_host)
        c = take_back(c, group, self.device_sh)
      for j, i in enumerate(group):
        new_p[i], new_mu[i], new_nu[i], new_c[i] = p[j], m[j], v[j], c[j]
    count = jax.device_put(step + 1, self.scalar_host)
    opt = [count if role == "count" else (new_mu if role == "mu" else new_nu)[i]
           for role, i in self.roles]
    return (self.params_def.unflatten(new_p), self.opt_def.unflatten(opt),
            self.params_def.unflatten(new_c))

  def measure_update_s(self, state, repeats: int = 3) -> float:
    """Median wall time of one whole offloaded update on the live state (its result discarded)."""
    grads = jax.tree.map(lambda c: c.astype(jnp.float32), state["compute"])
    return perf_model.median_seconds(lambda: jax.block_until_ready(
        self.update(state["step"], grads, state["params"], state["opt_state"])), repeats)

  def abstract_host(self, abstract_state):
    """The abstract {"params", "opt_state"} as they live with offload (dry run's start record)."""
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = [place(x, s) for x, s in zip(jax.tree.leaves(abstract_state["params"]), self.host_sh)]
    opt = [place(x, self.scalar_host if role == "count" else self.host_sh[i])
           for x, (role, i) in zip(jax.tree.leaves(abstract_state["opt_state"]), self.roles)]
    return {"params": self.params_def.unflatten(params), "opt_state": self.opt_def.unflatten(opt)}

  def describe(self) -> dict:
    """The performance model's inputs, its choice and prediction, for the start record."""
    f = self.figures
    return {"optim/h2d_gbps": f.h2d_bps / 1e9, "optim/d2h_gbps": f.d2h_bps / 1e9,
            "optim/host_update_gbps": f.host_update_bps / 1e9,
            "optim/device_update_gbps": f.device_update_bps / 1e9,
            "optim/subgroups": len(self.groups), "optim/subgroup_bytes": self.group_bytes,
            "optim/device_subgroups": [k for k, d in enumerate(self.on_device) if d],
            "optim/predicted_update_s": self.predicted_s}


def take_back(xs, group, shardings):
  """Leaves of one subgroup (in group order) moved to the given per-leaf shardings."""
  return [jax.device_put(x, shardings[i]) for x, i in zip(xs, group)]
