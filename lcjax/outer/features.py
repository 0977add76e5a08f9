"""DiPaCo's routing feature of a document: the mean of a base model's last hidden state (after
the final norm) over the document's first `route_prefix` input positions ([BOS] + its first
route_prefix - 1 tokens), in float32. The base model is another run's checkpoint
(`outer.base_from`), read onto this machine's devices, whatever mesh trained it.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lcjax import mesh as mesh_lib
from lcjax import model as model_lib
from lcjax import parts as parts_lib
from lcjax import state_spec

BATCH = 64  # documents per forward pass


def base_params(config, model_cfg, mesh):
  """(step, parameters) of the base run (outer.base_from, at outer.init_step or its latest)."""
  from lcjax import checkpoint as checkpoint_lib
  parts = parts_lib.model_parts(model_cfg, config.train.seed, mesh)
  abstract = state_spec.derive(parts.param_decls, parts.abstract_params, mesh).abstract
  checkpointer = checkpoint_lib.Checkpointer(config.outer.base_from, config, read_only=True)
  try:
    saved = checkpointer.manager.all_steps()
    step = config.outer.init_step or max(saved, default=None)
    if step not in saved:
      raise ValueError(f"outer.base_from={config.outer.base_from!r} holds no checkpoint of step "
                       f"{step} (it has {sorted(saved)}); train the base run first or fix "
                       "outer.base_from / outer.init_step")
    return step, checkpointer.restore_part(step, {"params": abstract})["params"]
  finally:
    checkpointer.close()


def local_mesh():
  """Every local device on the data axis: the features are a forward pass, nothing else."""
  return mesh_lib.make_mesh(ml_collections.ConfigDict(
      {"replica": 1, "data": -1, "fsdp": 1, "ring": 1, "ulysses": 1, "tensor": 1}))


def prefix_features(model_cfg, params, mesh, token_docs, prefix: int, bos_id: int,
                    pad_id: int) -> np.ndarray:
  """[N, E] float32 features of the tokenized documents (module docstring)."""
  model_cfg = dataclasses.replace(model_cfg, sp_strategy=None)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.create(model_cfg, 0)))
  rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      mesh_lib.BATCH_AXES))
  sharding = mesh_lib.batch_sharding(mesh)

  @jax.jit
  def features(params, tokens_BT, lengths_B):
    positions = jnp.broadcast_to(jnp.arange(prefix)[None], tokens_BT.shape)
    valid = (positions < lengths_B[:, None]).astype(jnp.float32)
    h = nnx.merge(graphdef, params).hidden(tokens_BT, positions, valid.astype(jnp.int32))
    return jnp.sum(h.astype(jnp.float32) * valid[..., None], 1) / jnp.sum(valid, 1)[:, None]

  rows = -(-BATCH // mesh.devices.size) * mesh.devices.size
  out = []
  for first in range(0, len(token_docs), rows):
    docs = token_docs[first:first + rows]
    tokens = np.full((rows, prefix), pad_id, np.int32)
    lengths = np.ones(rows, np.int32)  # padding rows: BOS alone (their features are dropped)
    tokens[:, 0] = bos_id
    for i, doc in enumerate(docs):
      head = np.asarray(doc[:prefix - 1], np.int32)
      tokens[i, 1:1 + len(head)] = head
      lengths[i] = 1 + len(head)
    got = features(params, jax.device_put(tokens, sharding), jax.device_put(lengths, rows_sharding))
    out.append(np.asarray(jax.device_get(got))[:len(docs)])
  return np.concatenate(out) if out else np.zeros((0, model_cfg.embed_dim), np.float32)
