"""The model's side of every train program: parameters (with their declarations), the loss the
inner update differentiates, the evaluation sums, and how batches are laid out on the mesh.

The model has no stochastic layers, so no RNG state is carried: all randomness (the
initialisation) derives from train.seed.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lcjax import mesh as mesh_lib
from lcjax import model as model_lib
from lcjax import state_spec
from lcjax.data import FIELDS


@dataclasses.dataclass(frozen=True)
class Parts:
  graphdef: nnx.GraphDef | None
  abstract_params: dict     # ShapeDtypeStructs, no shardings
  param_decls: dict         # state_spec.Decl per parameter
  create_params: callable   # () -> params (float32)
  loss_fn: callable         # (params, batch) -> (objective / tokens, (cross entropy / tokens, tokens))
  eval_step: callable       # (params, batch) -> (cross-entropy sum, token count)
  batch_sharding: jax.sharding.NamedSharding


def model_parts(model_cfg, seed: int, mesh) -> Parts:
  create = lambda: model_lib.create(model_cfg, seed)
  abstract_model = nnx.eval_shape(create)
  graphdef = nnx.graphdef(abstract_model)

  def loss_fn(params, batch):
    objective, cross_entropy, count = nnx.merge(graphdef, params).loss_sums(batch)
    count = jnp.maximum(count, 1.0)
    return objective / count, (cross_entropy / count, count)

  def eval_step(params, batch):
    _, cross_entropy, count = nnx.merge(graphdef, params).loss_sums(batch)
    return cross_entropy, count

  return Parts(graphdef=graphdef,
               abstract_params=nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)),
               param_decls=state_spec.param_decls(abstract_model),
               create_params=lambda: nnx.to_pure_dict(nnx.state(create(), nnx.Param)),
               loss_fn=loss_fn, eval_step=eval_step,
               batch_sharding=mesh_lib.batch_sharding(mesh))


def train_metrics(loss, grads, count, lr) -> dict:
  return {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads), "train/tokens": count,
          "train/lr": lr}


def abstract_batch(batch_size, seq_len, sharding):
  return {f: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding)
          for f in FIELDS}


def device_batch(batch_np, sharding, share=None):
  """Host numpy batch -> sharded global arrays: the one host-to-device transfer of the loop,
  allowed here under its transfer guard. `batch_np` is the whole global batch, or, with a
  `RowShare`, only the rows this process's devices hold (a multi-process run)."""
  with jax.transfer_guard_host_to_device("allow"):
    if share is None:
      return {f: jax.make_array_from_callback(v.shape, sharding, functools.partial(v.__getitem__))
              for f, v in batch_np.items()}
    return {f: jax.make_array_from_callback((share.batch_size,) + v.shape[1:], sharding,
                                            functools.partial(share.block, v))
            for f, v in batch_np.items()}


@dataclasses.dataclass(frozen=True)
class RowShare:
  """The rows of the global [batch_size, ...] batch that this process's devices hold: the span
  the process builds on its host (none of the other processes' rows)."""
  span: range               # global rows first .. last held here (a process's are contiguous
  batch_size: int           # on the meshes mesh.py builds; a gap would only be built idle)

  @classmethod
  def of(cls, sharding, batch_size: int, seq_len: int) -> "RowShare":
    blocks = sharding.addressable_devices_indices_map((batch_size, seq_len)).values()
    rows = [r for index in blocks for r in range(*index[0].indices(batch_size))]
    return cls(range(min(rows), max(rows) + 1), batch_size)

  def block(self, span_rows, index):
    """The block `index` (global slices) of the global batch, from the rows of this span."""
    rows = np.arange(self.batch_size)[index[0]] - self.span.start
    assert rows.min() >= 0 and rows.max() < len(self.span), (index, self.span)
    return span_rows[rows][(slice(None),) + tuple(index[1:])]
