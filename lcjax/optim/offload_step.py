"""The train step with offloaded AdamW state (Deep Optimizer States; optim/offload.py).

One jit holds the backward pass and the device lane, so XLA can start a subgroup's transfers
and update as soon as its operands exist, overlapping the rest of the backward:

  compute copy, batch, device-lane state (pinned_host)
    -> loss, gradients (fp32), global-norm clipping over the whole gradient (the norm must be
       complete before any update; the state transfers in do not depend on it)
    -> per device-lane subgroup: state pinned_host -> device, AdamW, pinned_host
    -> per host-lane subgroup: its gradients -> pinned_host
then, outside the jit, the host lanes update their subgroups (optim/host_lane.py).

State: {"step", "params", "opt_state", "compute"}: params and opt_state are built (init) and
restored (checkpoint) straight into pinned_host shardings; "compute" is the device's
compute-dtype copy of the parameters and is not saved.
"""
import jax
import jax.numpy as jnp
import optax

from lcjax import mesh as mesh_lib
from lcjax import step as step_lib
from lcjax.optim import offload as offload_lib


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def build(parts, config, mesh, compute_dtype) -> step_lib.Steps:
  """Steps for optim.offload=True, from the plain step's parts (their layout is on the device)."""
  abstract, shardings, batch_sharding = parts.abstract_state, parts.state_shardings, parts.batch_sharding
  loss_fn, lr_schedule = parts.loss_fn, parts.lr_schedule
  opt = offload_lib.OffloadedAdamW(config, abstract["params"], abstract["opt_state"],
                                   compute_dtype, mesh)
  replicated = mesh_lib.replicated(mesh)
  compute_sh = shardings["params"]
  state_sh = {"step": shardings["step"], **opt.host_shardings()}
  abstract_state = _with_shardings(abstract, state_sh)
  clip = config.optim.clip_norm

  def grads_and_update(compute_device_lane, compute_host_lane, step, batch, lane_state):
    compute = opt.from_lanes(compute_device_lane, compute_host_lane)
    (_, (loss, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(compute, batch)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    metrics = step_lib.train_metrics(loss, grads, count, lr_schedule(step))
    if clip > 0:  # as in optax's chain: from the whole gradient, before any update
      grads, _ = optax.clip_by_global_norm(clip).update(grads, optax.EmptyState())
    return metrics, step + 1, opt.in_jit(step, jax.tree.leaves(grads), lane_state)

  lane_sh, update_sh = opt.in_jit_shardings()
  # The device lane's compute copy and state are donated: the update writes their successors.
  fused = jax.jit(grads_and_update, donate_argnums=(0, 4),
                  in_shardings=(*opt.by_lane(compute_sh), replicated, batch_sharding, lane_sh),
                  out_shardings=(replicated, replicated, update_sh))

  def train(state, batch):
    lane_state = opt.device_lane_state(state["params"], state["opt_state"])
    metrics, step, out = fused(*opt.by_lane(state["compute"]), state["step"], batch, lane_state)
    params, opt_state, compute = opt.finish(state["params"], state["opt_state"], out)
    return {"step": step, "params": params, "opt_state": opt_state, "compute": compute}, metrics

  def trace(abstract_batch):
    abstract_compute = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, compute_dtype, sharding=x.sharding),
        abstract["params"])
    lane_state = opt.device_lane_state(abstract_state["params"], abstract_state["opt_state"])
    return fused.trace(*opt.by_lane(abstract_compute), abstract_state["step"], abstract_batch,
                       lane_state)

  def create_live_state():
    state = parts.create_state()
    return {**state, "compute": jax.tree.map(lambda p: p.astype(compute_dtype), state["params"])}

  return step_lib.Steps(
      graphdef=parts.graphdef, abstract_state=abstract_state, state_shardings=state_sh,
      batch_sharding=batch_sharding, mesh=mesh,
      init=jax.jit(create_live_state, out_shardings={**state_sh, "compute": compute_sh}),
      train=train,
      eval=jax.jit(parts.eval_step, in_shardings=(compute_sh, batch_sharding),
                   out_shardings=replicated),
      eval_params=lambda state: state["compute"],
      trace=trace, offload=opt, describe=opt.describe,
      saved=lambda state: {k: state[k] for k in ("step", "params", "opt_state")},
      attach=lambda state: {**state, "compute": opt.compute_copy(state["params"])})
