"""The plain inner update: optax (AdamW or SGD, optim.make) on the device.

Every inner update is a *stage* of the train program (lcjax/program.py states the interface);
this is the simplest one. State {"step", "params", "opt_state"}, all in device memory, all saved.
"""
import jax
import jax.numpy as jnp
import optax

from lcjax import parts as parts_lib
from lcjax import state_spec
from lcjax.state_spec import Decl


def plain_state(parts, tx):
  """(abstract, decls) of {"step", "params", "opt_state"}: the layout every run saves."""
  abstract_opt = jax.eval_shape(tx.init, parts.abstract_params)
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": parts.abstract_params,
              "opt_state": abstract_opt}
  decls = {"step": Decl(), "params": parts.param_decls,
           "opt_state": state_spec.mirror(tx, abstract_opt, parts.param_decls)}
  return abstract, decls


class Plain:
  """optax's update of the parameters in device memory."""
  name = "plain"
  extra_shardings = None

  def __init__(self, parts, tx, lr_schedule):
    self.parts, self.tx, self.lr_schedule = parts, tx, lr_schedule
    self.abstract, self.decls = plain_state(parts, tx)
    self.saved_keys = ("step", "params", "opt_state")
    self.model_param_decls = parts.param_decls
    self.model_params_saved_path = ("params",)

  def create_base(self):
    """The plain state at step 0 (traceable); every stage starts from one (`from_base`)."""
    params = self.parts.create_params()
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

  def from_base(self, base):
    return base

  def complete(self, saved):
    return saved

  def update(self, state, batch):
    (_, (loss, count)), grads = jax.value_and_grad(self.parts.loss_fn, has_aux=True)(
        state["params"], batch)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = parts_lib.train_metrics(loss, grads, count, self.lr_schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics, None

  def finish(self, state, extra):
    return state

  def master_params(self, state):
    return state["params"]

  def with_params(self, state, params):
    return {**state, "params": params}

  def model_params(self, state):
    return state["params"]

  def annotate(self, step, record):
    return record

  def measure(self, state) -> dict:
    """Start-record fields measured on the live state."""
    return {}

  def describe(self) -> dict:
    return {}
