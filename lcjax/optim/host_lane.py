"""The host lane of the offloaded AdamW: one subgroup's update computed by the host CPU.

A lane is called as lane(step, params, grads, mu, nu) on lists of one subgroup's leaves, all in
host memory (memory kind pinned_host), `step` the update count before this step, and returns
(params, mu, nu) in host memory and the compute-dtype copy of the params in device memory.

Which implementation runs where (optim.host_lane; "auto" picks by the mesh's platform):
  "jit"          the CPU backend's default. Its pinned_host memory is the CPU device's own RAM,
                 so a plain jit whose shardings carry memory kind pinned_host computes on the host
                 with no copies. Tested.
  "cpu_backend"  the default on an accelerator (GPU, TPU). XLA's host compute (compute_on) is slow
                 for optimizer math (PITFALLS.md), so the leaves are copied out of the
                 accelerator's pinned host memory through numpy, updated by the same AdamW jitted
                 for jax.devices("cpu")[0], and copied back; the compute copy goes straight to the
                 device. The copies make this lane synchronous with the step that produced the
                 gradients. It needs every state array addressable by this process (one process
                 per mesh). Tested on CPU only (host_lane="cpu_backend" forces it there); not yet
                 run on a GPU or TPU.
"""
import jax
import numpy as np

from lcjax.ops import manual


def resolve(kind: str, mesh) -> str:
  """optim.host_lane with "auto" replaced by the default of the platform of `mesh`'s devices
  (those the program is compiled for, not the host's)."""
  if kind == "auto":
    return "jit" if manual.platform(mesh) == "cpu" else "cpu_backend"
  return kind


def make(kind, update_fn, host_shardings, device_shardings, scalar_host):
  """A lane for one subgroup of the `resolve`d kind; update_fn(step, p, g, mu, nu) -> (p, mu, nu,
  compute copy)."""
  if kind == "jit":
    return JitLane(update_fn, host_shardings, device_shardings, scalar_host)
  return CpuBackendLane(update_fn, host_shardings, device_shardings)


class JitLane:
  """A jit over pinned_host arrays: host compute where host memory is the device's RAM (CPU)."""

  def __init__(self, update_fn, host_shardings, device_shardings, scalar_host):
    host = list(host_shardings)
    self.scalar_host = scalar_host
    self._update = jax.jit(update_fn, in_shardings=(scalar_host, host, host, host, host),
                           out_shardings=(host, host, host, list(device_shardings)))

  def __call__(self, step, params, grads, mu, nu):
    return self._update(jax.device_put(step, self.scalar_host), params, grads, mu, nu)


def require_addressable(shardings):
  """The CPU-backend lane copies whole arrays through numpy, so this process must hold them."""
  for s in shardings:
    if not s.is_fully_addressable:
      raise ValueError(
          f"optim.host_lane='cpu_backend' needs every host-lane state array addressable by this "
          f"process, but sharding {s} spans {jax.process_count()} processes; set "
          "optim.update_on='device' (every subgroup streams through the device, no host lane) "
          "or run one process per mesh")


class CpuBackendLane:
  """The same AdamW jitted for the CPU backend; the leaves move there and back through numpy."""

  def __init__(self, update_fn, host_shardings, device_shardings):
    self.host_shardings = list(host_shardings)
    self.device_shardings = list(device_shardings)
    require_addressable(self.host_shardings)
    self.cpu = jax.devices("cpu")[0]
    # The train step's context mesh spans the accelerators: the update runs under a mesh of
    # this one CPU device instead, its arguments committed there.
    self.cpu_mesh = jax.make_mesh((1,), ("host",), devices=[self.cpu])
    self._update = jax.jit(update_fn)

  def _to_cpu(self, xs):
    return [jax.device_put(np.asarray(x), self.cpu) for x in xs]

  @staticmethod
  def _back(xs, shardings):
    return [jax.device_put(np.asarray(x), s) for x, s in zip(xs, shardings)]

  def __call__(self, step, params, grads, mu, nu):
    with jax.set_mesh(self.cpu_mesh):
      step_cpu = jax.device_put(np.asarray(step), self.cpu)
      p, m, v, c = self._update(step_cpu, *(self._to_cpu(xs) for xs in (params, grads, mu, nu)))
    host = self.host_shardings
    return (self._back(p, host), self._back(m, host), self._back(v, host),
            self._back(c, self.device_shardings))
