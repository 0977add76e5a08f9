"""What DiPaCo's routers read, computed on this machine's devices (whatever mesh trained the
models they come from):
  a document's feature   the mean of a base model's last hidden state (after the final norm)
                         over its first `route_prefix` input positions ([BOS] + its first
                         route_prefix - 1 tokens), in float32; the base model is a plain run's
                         checkpoint (`outer.base_from`)
  a document's loss on each path   the mean cross-entropy of its first train.seq_len tokens
                         under each path of another DiPaCo run (`outer.init_from`): the labels
                         of the discriminative router
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


def _checkpoint_step(checkpointer, step, key, workdir):
  saved = checkpointer.manager.all_steps()
  step = step or max(saved, default=None)
  if step not in saved:
    raise ValueError(f"{key}={workdir!r} holds no checkpoint of step {step} (it has "
                     f"{sorted(saved)}); train that run first or fix {key} / outer.init_step")
  return step


def base_params(config, model_cfg, mesh):
  """(step, parameters) of the base run (outer.base_from, at its latest checkpoint; at
  outer.init_step when the run starts from it)."""
  from lcjax import checkpoint as checkpoint_lib
  parts = parts_lib.model_parts(model_cfg, config.train.seed, mesh)
  abstract = state_spec.derive(parts.param_decls, parts.abstract_params, mesh).abstract
  checkpointer = checkpoint_lib.Checkpointer(config.outer.base_from, config, read_only=True)
  try:
    step = _checkpoint_step(checkpointer, 0 if config.outer.init_from else config.outer.init_step,
                            "outer.base_from", config.outer.base_from)
    return step, checkpointer.restore_part(step, {"params": abstract})["params"]
  finally:
    checkpointer.close()


def path_params(config, model_cfg, mesh, grid):
  """(step, [parameters of each path]) of the DiPaCo run outer.init_from (outer.init_step, 0 =
  its latest), assembled from its saved modules."""
  from lcjax import checkpoint as checkpoint_lib
  from lcjax.outer import dipaco
  from lcjax.outer import paths as paths_lib
  parts = parts_lib.model_parts(model_cfg, config.train.seed, mesh)
  groups = paths_lib.groups_of(parts.abstract_params, grid)
  abstract = dipaco.modules_of(parts.abstract_params, groups, grid, lambda x, n: jax.ShapeDtypeStruct(
      (n,) + x.shape, x.dtype))
  decls = dipaco.modules_of(parts.param_decls, groups, grid,
                            lambda d, _: state_spec.stacked(d, None))
  abstract = state_spec.derive(decls, abstract, mesh).abstract
  checkpointer = checkpoint_lib.Checkpointer(config.outer.init_from, config, read_only=True)
  try:
    step = _checkpoint_step(checkpointer, config.outer.init_step, "outer.init_from",
                            config.outer.init_from)
    modules = checkpointer.restore_part(step, {"outer": {"params": abstract}})["outer"]["params"]
  finally:
    checkpointer.close()
  assemble = jax.jit(lambda m, p: dipaco.assemble_path(m, groups, grid, p))
  return step, [assemble(modules, jnp.int32(p)) for p in range(grid.num_paths)]


def local_mesh():
  """Every local device on the data axis: the features are a forward pass, nothing else."""
  return mesh_lib.make_mesh(ml_collections.ConfigDict(
      {"replica": 1, "data": -1, "fsdp": 1, "ring": 1, "ulysses": 1, "tensor": 1}))


def _rows(model_cfg, mesh, token_docs, length, bos_id, pad_id, fn):
  """fn(tokens [rows, length], lengths [rows]) over the documents in batches: each row is [BOS]
  + the document's first length - 1 tokens; returns the rows' results for the documents, in
  order, as one numpy array."""
  rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      mesh_lib.BATCH_AXES))
  sharding = mesh_lib.batch_sharding(mesh)
  rows = -(-BATCH // mesh.devices.size) * mesh.devices.size
  out = []
  for first in range(0, len(token_docs), rows):
    docs = token_docs[first:first + rows]
    tokens = np.full((rows, length), pad_id, np.int32)
    lengths = np.ones(rows, np.int32)  # padding rows: BOS alone (their results are dropped)
    tokens[:, 0] = bos_id
    for i, doc in enumerate(docs):
      head = np.asarray(doc[:length - 1], np.int32)
      tokens[i, 1:1 + len(head)] = head
      lengths[i] = 1 + len(head)
    got = fn(jax.device_put(tokens, sharding), jax.device_put(lengths, rows_sharding))
    out.append(np.asarray(jax.device_get(got))[:len(docs)])
  return np.concatenate(out) if out else None


def _graphdef(model_cfg):
  model_cfg = dataclasses.replace(model_cfg, sp_strategy=None)
  return nnx.graphdef(nnx.eval_shape(lambda: model_lib.create(model_cfg, 0)))


def prefix_features(model_cfg, params, mesh, token_docs, prefix: int, bos_id: int,
                    pad_id: int) -> np.ndarray:
  """[N, E] float32 features of the tokenized documents (module docstring)."""
  graphdef = _graphdef(model_cfg)

  @jax.jit
  def features(params, tokens_BT, lengths_B):
    positions = jnp.broadcast_to(jnp.arange(prefix)[None], tokens_BT.shape)
    valid = (positions < lengths_B[:, None]).astype(jnp.float32)
    h = nnx.merge(graphdef, params).hidden(tokens_BT, positions, valid.astype(jnp.int32))
    return jnp.sum(h.astype(jnp.float32) * valid[..., None], 1) / jnp.sum(valid, 1)[:, None]

  got = _rows(model_cfg, mesh, token_docs, prefix, bos_id, pad_id,
              lambda t, n: features(params, t, n))
  return got if got is not None else np.zeros((0, model_cfg.embed_dim), np.float32)


def document_losses(model_cfg, params, mesh, token_docs, length: int, bos_id: int,
                    pad_id: int) -> np.ndarray:
  """[N] float32: each document's mean cross-entropy over its first `length` tokens (the
  targets after [BOS] and after each of its first length - 1 tokens)."""
  graphdef = _graphdef(model_cfg)

  @jax.jit
  def losses(params, tokens_BT, lengths_B):
    positions = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1])[None], tokens_BT.shape)
    valid = positions < lengths_B[:, None]
    logits = nnx.merge(graphdef, params)(tokens_BT, positions, valid.astype(jnp.int32))
    targets = jnp.concatenate([tokens_BT[:, 1:], jnp.full_like(tokens_BT[:, :1], pad_id)], 1)
    scored = (positions < lengths_B[:, None] - 1).astype(jnp.float32)  # the last has no target
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    return jnp.sum(nll * scored, 1) / jnp.maximum(jnp.sum(scored, 1), 1.0)

  got = _rows(model_cfg, mesh, token_docs, length + 1, bos_id, pad_id,
              lambda t, n: losses(params, t, n))
  return got if got is not None else np.zeros((0,), np.float32)


def document_features(config, tokenizer, token_lists, *, with_step: bool = False):
  """The features of each list of tokenized documents, by the base model (outer.base_from);
  with_step, the base checkpoint's step last."""
  from lcjax.model import ModelConfig
  model_cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  mesh = local_mesh()
  with jax.set_mesh(mesh):
    step, params = base_params(config, model_cfg, mesh)
    out = [prefix_features(model_cfg, params, mesh, docs, config.outer.route_prefix,
                           tokenizer.bos_id, tokenizer.pad_id) for docs in token_lists]
  return out + [step] if with_step else out


def path_losses(config, grid, token_docs, tokenizer):
  """(step, [N, P]): each document's loss on each path of the DiPaCo run outer.init_from."""
  from lcjax.model import ModelConfig
  model_cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  mesh = local_mesh()
  with jax.set_mesh(mesh):
    step, per_path = path_params(config, model_cfg, mesh, grid)
    losses = [document_losses(model_cfg, params, mesh, token_docs, config.train.seq_len,
                              tokenizer.bos_id, tokenizer.pad_id) for params in per_path]
  return step, np.stack(losses, axis=1)
