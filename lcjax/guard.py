"""The NaN/Inf guard: no run goes on, or saves, with a non-finite state unnoticed.

train.nan_policy:
  stop  the loss and gradient norm of every step are checked on the host when the loop reads
        them anyway (each log, eval and checkpoint boundary: no extra sync); a non-finite one
        stops the run with one line naming the step and the last finite checkpoint.
  skip  the step itself keeps the state it was given where its loss or gradient norm is not
        finite (the update is dropped, the data position and step move on), and reports
        train/skipped; the loop counts them in train/skipped_steps.
Either way a state is checked to be finite before it is saved, so every checkpoint is finite
and rotation (checkpoint.keep) can never delete the last finite one.
"""
import math

import jax
import jax.numpy as jnp

from lcjax import cli

EXIT_NON_FINITE = 3
WATCHED = ("train/loss", "train/grad_norm", "eval/loss")


class NonFinite(cli.Stop):
  def __init__(self, line: str):
    super().__init__(line, EXIT_NON_FINITE)


def first_non_finite(record: dict):
  """The first watched key of `record` whose value is not finite, or None."""
  for key in WATCHED:
    value = record.get(key)
    if value is not None and not math.isfinite(value):
      return key
  return None


def stop_line(what: str, step: int, policy: str, last_good, directory) -> str:
  where = (f"the last finite checkpoint is step {last_good} in {directory}" if last_good is not None
           else f"no checkpoint was saved in {directory}")
  fix = "set train.nan_policy='skip' to drop such updates, " if policy == "stop" else ""
  return (f"lcjax: error: {what} at step {step} (train.nan_policy={policy!r}); {where}; {fix}"
          "lower train.lr or set optim.clip_norm, and rerun to resume from it")


def device_leaves(tree) -> list:
  """The leaves in device memory: what `all_finite` checks (host-resident leaves of an offloaded
  optimizer come from updates whose loss and gradient norm are checked)."""
  return [x for x in jax.tree.leaves(tree)
          if "host" not in (getattr(x.sharding, "memory_kind", None) or "")]


@jax.jit
def all_finite(tree) -> jax.Array:
  """One boolean: every floating-point leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class SkipNonFinite:
  """A stage (program.py) whose update is dropped where its loss or gradient norm is not
  finite: the state comes back as it went in but for its step count; train/skipped = 1."""
  name = "skip_nonfinite"

  def __init__(self, inner):
    self.inner = inner

  def __getattr__(self, attr):  # everything but the update is the wrapped stage's
    return getattr(self.inner, attr)

  def update(self, state, batch):
    new, metrics, extra = self.inner.update(state, batch)
    ok = jnp.isfinite(metrics["train/loss"]) & jnp.isfinite(metrics["train/grad_norm"])
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    kept["step"] = new["step"]
    return kept, {**metrics, "train/skipped": 1 - ok.astype(jnp.int32)}, extra
