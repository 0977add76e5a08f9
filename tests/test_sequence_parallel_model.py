"""Sequence parallelism wired into the model: a step on (data 2, ring 2, ulysses 2) gives the loss
and gradients of the same global batch on (data 8); the training loop runs with it; invalid
splits fail at config time."""
import jax
import numpy as np
import pytest
from flax import nnx

from lcjax import config as config_lib
from lcjax import parts as parts_lib
from lcjax.train import prepare, train_and_evaluate
from conftest import read_losses as _losses, scratch_program, tiny_config


def sp_config(strategy="usp", layout="zigzag", ring=2, ulysses=2):
  c = tiny_config()
  c.mesh.update(data=2, fsdp=1, ring=ring, ulysses=ulysses)
  c.sp.update(strategy=strategy, layout=layout)
  return c


def _loss_and_grads(config):
  prepared = prepare(config)
  with jax.set_mesh(prepared.mesh):
    program, state = scratch_program(prepared)
    params = state["params"]
    batch = parts_lib.device_batch(prepared.datasets.train_batch(0, prepared.config.train.batch_size),
                                   program.batch_sharding)

    @jax.jit
    def loss_and_grads(params, batch):
      def loss(p):
        _, cross_entropy, count = nnx.merge(program.parts.graphdef, p).loss_sums(batch)
        return cross_entropy / count
      return jax.value_and_grad(loss)(params)

    return jax.device_get(loss_and_grads(params, batch))


@pytest.mark.parametrize("strategy, layout, chunks", [
    ("usp", "zigzag", 1), ("ring", "contiguous", 1),
    ("usp", "zigzag", 3)])  # MsT mini-sequences on the local shard (3 does not divide it)
def test_step_matches_data_parallel(strategy, layout, chunks):
  plain = tiny_config()
  plain.mesh.update(data=8, fsdp=1)
  ref_loss, ref_grads = _loss_and_grads(plain)
  config = sp_config(strategy, layout)
  config.model.update(mlp_chunks=chunks, loss_chunks=chunks)
  loss, grads = _loss_and_grads(config)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    err = np.linalg.norm(g - r) / np.linalg.norm(r)
    assert err < 2e-5, (jax.tree_util.keystr(path), err)


def test_training_loop_with_sequence_parallelism(tmp_path):
  plain = tiny_config()
  plain.train.steps = 3
  plain.mesh.update(data=8, fsdp=1)
  sp = sp_config()
  sp.train.steps = 3
  a = train_and_evaluate(plain, tmp_path / "plain")
  b = train_and_evaluate(sp, tmp_path / "sp")
  la, lb = _losses(tmp_path / "plain"), _losses(tmp_path / "sp")
  np.testing.assert_allclose([lb[s] for s in sorted(lb)], [la[s] for s in sorted(la)], rtol=1e-4)
  assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-4)


@pytest.mark.parametrize("update, message", [
    (lambda c: c.train.update(seq_len=36), "36"),                      # zigzag needs S % 8 == 0
    (lambda c: c.mesh.update(data=1, ring=1, ulysses=8), "8"),         # 4 heads over 8 Ulysses ranks
    (lambda c: c.sp.update(strategy="spiral"), "unknown sequence-parallel strategy"),
])
def test_invalid_splits_fail_at_config_time(update, message):
  c = sp_config()
  update(c)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)
