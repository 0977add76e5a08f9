"""The inner update with offloaded AdamW state (Deep Optimizer States; optim/offload.py), a stage
of the train program (lcjax/program.py).

One traced update holds the backward pass and the device lane, so XLA can start a subgroup's
transfers and update as soon as its operands exist, overlapping the rest of the backward:

  compute copy, batch, master params and moments (pinned_host)
    -> loss, gradients (fp32), global-norm clipping over the whole gradient (the norm must be
       complete before any update; the state transfers in do not depend on it)
    -> per device-lane subgroup: state pinned_host -> device, AdamW, pinned_host
    -> per host-lane subgroup: its gradients -> pinned_host
then, outside the jit (`finish`), the host lanes update their subgroups (optim/host_lane.py).
Inside an outer loop's island every subgroup takes the device lane: the island's whole update
must be one traced function.

State: {"step", "params", "opt_state", "compute"}: params and opt_state live in pinned_host
(built there at init and restored there from a checkpoint); "compute" is the device's
compute-dtype copy of the parameters, derived, not saved.
"""
import jax
import jax.numpy as jnp
import optax

from lcjax import parts as parts_lib
from lcjax import state_spec
from lcjax.optim import inner as inner_lib
from lcjax.optim import offload as offload_lib


class Offloaded:
  name = "offload"

  def __init__(self, parts, config, tx, lr_schedule, mesh, compute_dtype, *, host_lanes=True,
               measure_links=True):
    self.parts, self.lr_schedule, self.clip = parts, lr_schedule, config.optim.clip_norm
    plain_abstract, plain_decls = inner_lib.plain_state(parts, tx)
    on_device = state_spec.derive(plain_decls, plain_abstract, mesh).abstract
    self.opt = offload_lib.OffloadedAdamW(config, on_device["params"], on_device["opt_state"],
                                          compute_dtype, mesh, host_lanes=host_lanes,
                                          measure_links=measure_links)
    self._plain = inner_lib.Plain(parts, tx, lr_schedule)
    host = offload_lib.HOST
    self.decls = {"step": plain_decls["step"],
                  "params": state_spec.in_memory(plain_decls["params"], host),
                  "opt_state": state_spec.in_memory(plain_decls["opt_state"], host),
                  "compute": parts.param_decls}
    self.abstract = {**plain_abstract, "compute": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, compute_dtype), parts.abstract_params)}
    self.saved_keys = ("step", "params", "opt_state")
    self.model_param_decls = parts.param_decls
    self.model_params_saved_path = ("params",)

  @property
  def extra_shardings(self):
    return self.opt.host_lane_shardings()

  def create_base(self):
    return self._plain.create_base()

  def from_base(self, base):
    """A plain state (device) -> this state; the jit's output shardings move it to the host."""
    return {**base, "compute": self.opt.compute_copy(base["params"])}

  def complete(self, saved):
    return {**saved, "compute": self.opt.compute_copy(saved["params"])}

  def update(self, state, batch):
    opt, step = self.opt, state["step"]
    (_, (loss, count)), grads = jax.value_and_grad(self.parts.loss_fn, has_aux=True)(
        state["compute"], batch)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    metrics = parts_lib.train_metrics(loss, grads, count, self.lr_schedule(step))
    if self.clip > 0:  # as in optax's chain: from the whole gradient, before any update
      grads, _ = optax.clip_by_global_norm(self.clip).update(grads, optax.EmptyState())
    out = opt.in_jit(step, jax.tree.leaves(grads),
                     opt.device_lane_state(state["params"], state["opt_state"]))
    params, opt_state, compute = opt.merge_device_lane(state["params"], state["opt_state"],
                                                       state["compute"], out)
    new = {"step": step + 1, "params": params, "opt_state": opt_state, "compute": compute}
    return new, metrics, opt.host_lane_inputs(out)

  def finish(self, state, extra):
    params, opt_state, compute = self.opt.run_host_lanes(state["params"], state["opt_state"],
                                                         state["compute"], extra)
    return {**state, "params": params, "opt_state": opt_state, "compute": compute}

  def master_params(self, state):
    """The fp32 master parameters, moved to the device (an outer loop computes with them)."""
    return jax.tree.map(lambda p: jax.device_put(p, jax.memory.Space.Device), state["params"])

  def with_params(self, state, params):
    host = jax.tree.map(lambda p: jax.device_put(p, jax.memory.Space.Host), params)
    return {**state, "params": host,
            "compute": jax.tree.map(lambda p: p.astype(self.opt.compute_dtype), params)}

  def model_params(self, state):
    return state["compute"]

  def annotate(self, step, record):
    return record

  def describe(self) -> dict:
    return self.opt.describe()

  def measure(self, state) -> dict:
    """Start-record fields measured on the live state: one whole offloaded update's time."""
    return {"optim/measured_update_s": self.opt.measure_update_s(state)}
