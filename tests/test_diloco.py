"""DiLoCo: hand-computed outer steps on a quadratic model (Nesterov, token weights, two rounds),
the pseudo-gradient's sign, a dropped island, the compressed exchange, equality with data
parallelism at H=1, resume mid-round, and sequence parallelism inside the islands."""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lcjax import checkpoint as checkpoint_lib
from lcjax import config as config_lib
from lcjax import mesh as mesh_lib
from lcjax import parts as parts_lib
from lcjax import program as program_lib
from lcjax.optim import inner as inner_lib
from lcjax.state_spec import Decl
from lcjax.outer import compression, diloco
from lcjax.train import prepare, train_and_evaluate
from conftest import killed_and_resumed, read_losses as _losses, tiny_config, train_steps

DIM = 6


def _quadratic_parts(mesh, inner_lr):
  """A step.Parts whose model is the quadratic loss sum_i m_i |w - x_i|^2 / 2 / sum_i m_i over
  the batch rows x_i with mask m_i, trained by plain SGD: gradient w - (masked mean of x)."""
  tx = optax.sgd(inner_lr)
  replicated = mesh_lib.replicated(mesh)
  batch_sh = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))

  def loss_fn(params, batch):
    m = batch["mask"]
    sq = 0.5 * jnp.sum((params["w"][None] - batch["x"]) ** 2, axis=1)
    return jnp.sum(m * sq) / jnp.sum(m), (jnp.sum(m * sq) / jnp.sum(m), jnp.sum(m))

  abstract = {"w": jax.ShapeDtypeStruct((DIM,), jnp.float32)}
  parts = parts_lib.Parts(
      graphdef=None, abstract_params=abstract, param_decls={"w": Decl((None,))},
      create_params=lambda: {"w": jnp.zeros((DIM,), jnp.float32)}, loss_fn=loss_fn,
      eval_step=lambda params, batch: loss_fn(params, batch)[1], batch_sharding=batch_sh)
  return inner_lib.Plain(parts, tx, lambda step: jnp.float32(inner_lr))


def _outer_config(**outer):
  c = ml_collections.ConfigDict({"outer": config_lib.base_config().outer})
  c.outer.update(kind="diloco", **outer)
  return c


def _quadratic_run(batches, inner_lr=0.1, replicas=2, **outer):
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(
      dict(replica=replicas, data=-1, fsdp=1, ring=1, ulysses=1, tensor=1)))
  with jax.set_mesh(mesh):
    inner = _quadratic_parts(mesh, inner_lr)
    program = program_lib.Program(diloco.DiLoCo(inner, _outer_config(**outer).outer, replicas, mesh),
                                  inner.parts, inner.tx, mesh)
    state, records = program.init(program_lib.Scratch())[0], []
    for batch in batches:
      state, metrics = program.step(state, jax.device_put(batch, program.batch_sharding))
      records.append(jax.device_get(state))
  return records


def _batches(rng, n, rows=8):
  out = []
  for _ in range(n):
    mask = np.ones((rows,), np.float32)
    mask[rows // 2 + 1:] = 0.0  # island 1 trains on 1 row, island 0 on 4: unequal weights
    out.append({"x": rng.normal(size=(rows, DIM)).astype(np.float32), "mask": mask})
  return out


def _hand_inner(w, batch, rows_of_island, inner_lr):
  x, m = batch["x"][rows_of_island], batch["mask"][rows_of_island]
  target = (m[:, None] * x).sum(0) / m.sum()
  return w - inner_lr * (w - target), m.sum()


def test_two_rounds_of_nesterov_match_a_hand_computation():
  H, lr, mu, inner_lr = 3, 0.7, 0.9, 0.1
  batches = _batches(np.random.default_rng(0), 2 * H)
  records = _quadratic_run(batches, inner_lr, inner_steps=H, lr=lr, momentum=mu, nesterov=True)
  theta, momentum = np.zeros(DIM), np.zeros(DIM)
  islands = [np.zeros(DIM), np.zeros(DIM)]
  for round_ in range(2):
    tokens = [0.0, 0.0]
    for step in range(round_ * H, (round_ + 1) * H):
      for r in range(2):
        islands[r], t = _hand_inner(islands[r], batches[step], slice(4 * r, 4 * r + 4), inner_lr)
        tokens[r] += t
    weights = np.array(tokens) / sum(tokens)
    assert weights[0] == pytest.approx(0.8)  # 4 of 5 target rows per step are island 0's
    delta = sum(w * (theta - isl) for w, isl in zip(weights, islands))
    momentum = delta + mu * momentum
    theta = theta - lr * (delta + mu * momentum)  # Nesterov SGD
    islands = [theta.copy(), theta.copy()]
    got = records[(round_ + 1) * H - 1]
    np.testing.assert_allclose(got["outer"]["params"]["w"], theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["params"]["w"], np.stack(islands), rtol=1e-5, atol=1e-6)
    assert int(got["outer"]["step"]) == round_ + 1
  mid_round = records[H]  # one inner step into round two: the islands differ, theta does not move
  assert not np.allclose(mid_round["params"]["w"][0], mid_round["params"]["w"][1])
  np.testing.assert_array_equal(mid_round["outer"]["params"]["w"], records[H - 1]["outer"]["params"]["w"])


def test_outer_step_moves_the_shared_parameters_toward_the_islands():
  batches = _batches(np.random.default_rng(1), 2)
  last = _quadratic_run(batches, inner_steps=2, lr=0.5, momentum=0.0)[-1]
  before = np.zeros(DIM)  # theta at init
  islands = [before.copy(), before.copy()]
  tokens = [0.0, 0.0]
  for batch in batches:
    for r in range(2):
      islands[r], t = _hand_inner(islands[r], batch, slice(4 * r, 4 * r + 4), 0.1)
      tokens[r] += t
  average = sum(t * isl for t, isl in zip(tokens, islands)) / sum(tokens)
  theta = last["outer"]["params"]["w"]
  np.testing.assert_allclose(theta, before + 0.5 * (average - before), rtol=1e-5, atol=1e-6)
  assert np.linalg.norm(theta - average) < np.linalg.norm(before - average)


def test_a_dropped_island_is_left_out_then_reset():
  batches = _batches(np.random.default_rng(2), 4)
  records = _quadratic_run(batches, inner_steps=2, lr=1.0, momentum=0.0, drop_replicas="1@1")
  island0 = np.zeros(DIM)
  for batch in batches[:2]:
    island0, _ = _hand_inner(island0, batch, slice(0, 4), 0.1)
  first_sync = records[1]
  # outer lr 1, no momentum: theta becomes island 0's parameters alone
  np.testing.assert_allclose(first_sync["outer"]["params"]["w"], island0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(first_sync["params"]["w"][1], island0, rtol=1e-5, atol=1e-6)
  second_sync = records[3]  # both islands take part again: theta is their weighted average
  islands = [island0.copy(), island0.copy()]
  tokens = [0.0, 0.0]
  for batch in batches[2:]:
    for r in range(2):
      islands[r], t = _hand_inner(islands[r], batch, slice(4 * r, 4 * r + 4), 0.1)
      tokens[r] += t
  expect = sum(t * isl for t, isl in zip(tokens, islands)) / sum(tokens)
  np.testing.assert_allclose(second_sync["outer"]["params"]["w"], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", compression.FORMATS)
def test_quantize_round_trip_within_half_a_step(fmt):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 50)).astype(np.float32))
  q, scale = compression.quantize(x, fmt)
  back = compression.dequantize(q, scale, fmt)
  err = np.abs(np.asarray(back - x))
  if fmt == "float32":
    assert err.max() == 0
  elif fmt == "bfloat16":  # round to nearest: relative error at most the unit roundoff 2^-8
    assert np.all(err <= np.abs(np.asarray(x)) * 2 ** -8)
    assert err.max() > 0
  else:
    level = {"int8": 127, "int4": 7}[fmt]
    step = np.abs(np.asarray(x)).max() / level
    assert float(scale) == pytest.approx(step)
    assert err.max() <= step / 2 * (1 + 1e-5)
    assert err.max() > step / 10  # it really is quantised
    assert q.dtype == (jnp.int8 if fmt == "int8" else jnp.uint8)
    assert q.size == x.size // (2 if fmt == "int4" else 1)


@pytest.mark.parametrize("fmt", compression.FORMATS)
def test_compressed_weighted_sum_over_islands(fmt):
  R = 4
  mesh = jax.make_mesh((R, 2), ("replica", "data"), axis_types=(AxisType.Auto,) * 2)
  rng = np.random.default_rng(4)
  x = rng.normal(size=(R, 7, 5)).astype(np.float32)  # 35 elements: padded to 2R-multiples
  w = rng.uniform(size=(R,)).astype(np.float32)
  w /= w.sum()
  fn = jax.jit(jax.shard_map(
      lambda x, w: compression.weighted_sum(x[0], w[0], fmt, "replica", R)[None], mesh=mesh,
      in_specs=(P("replica"), P("replica")), out_specs=P("replica"), check_vma=False))
  got = np.asarray(fn(x, w))
  exact = np.einsum("r,rij->ij", w, x)
  for r in range(R):  # every island holds the same sum
    np.testing.assert_array_equal(got[r], got[0])
  err = np.abs(got[0] - exact)  # bounds per element: phase 1 (each island's terms), then
  if fmt == "float32":           # phase 2 (the partial sum, which phase 1 may have grown)
    assert err.max() < 1e-6
  elif fmt == "bfloat16":
    phase1 = np.abs(w[:, None, None] * x).sum(0) * 2 ** -8
    assert np.all(err <= (phase1 + (np.abs(exact) + phase1) * 2 ** -8) * (1 + 1e-5))
  else:
    level = {"int8": 127, "int4": 7}[fmt]
    phase1 = sum(np.abs(w[r] * x[r]).max() / level / 2 for r in range(R))
    phase2 = (np.abs(exact).max() + phase1) / level / 2
    assert err.max() <= (phase1 + phase2) * (1 + 1e-5)
  assert fmt == "float32" or err.max() > 0  # the others really are compressed
  sent = compression.bytes_sent([35], fmt, R)
  bits = {"float32": 32, "bfloat16": 16, "int8": 8, "int4": 4}[fmt]
  assert sent == 2 * (R - 1) * (10 * bits // 8 + (4 if bits < 16 else 0))  # chunks of 10


def _diloco_config(**outer):
  c = tiny_config()
  c.mesh.update(replica=2, data=4, fsdp=1)
  c.outer.update(kind="diloco", **outer)
  return c


def _run(config, n_steps=4):
  """(losses, the parameters evaluation uses, the live state) after n_steps."""
  program, state, losses = train_steps(config, n_steps)
  with jax.set_mesh(program.mesh):
    return losses, jax.device_get(program.model_params(state)), state


def test_h1_with_inner_sgd_and_outer_lr_1_equals_data_parallelism():
  def run(config):
    config.optim.update(name="sgd", momentum=0.0, clip_norm=0.0)
    config.train.update(lr=0.5, warmup_steps=1)
    return _run(config)[:2]

  plain = tiny_config()
  plain.mesh.update(data=8, fsdp=1)
  dp_losses, dp_params = run(plain)
  losses, params = run(_diloco_config(inner_steps=1, lr=1.0, momentum=0.0))
  np.testing.assert_allclose(losses, dp_losses, rtol=2e-5)
  assert losses[-1] < losses[0] - 0.05  # it trains
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(dp_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _records(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_resume_mid_round_is_exact_and_records_outer_metrics(tmp_path, crash_on_evaluation):
  config = _diloco_config(inner_steps=4, compression="int8")  # checkpoints at 3 and 6: mid-round
  straight, resumed = killed_and_resumed(config, tmp_path, crash_on_evaluation)
  assert _losses(resumed) == _losses(straight)
  records = _records(straight)
  start = records[0]
  assert start["outer/replicas"] == 2 and start["outer/inner_steps"] == 4
  per_sync = start["outer/bytes_per_sync"]
  assert 0 < per_sync < start["outer/bytes_data_parallel_per_step"] / 3  # int8 vs float32
  by_step = {r["step"]: r for r in records if "train/loss" in r}
  assert by_step[3]["outer/step"] == 0 and by_step[4]["outer/step"] == 1
  assert by_step[6]["outer/bytes_communicated"] == per_sync
  assert by_step[6]["outer/bytes_data_parallel"] == 6 * start["outer/bytes_data_parallel_per_step"]
  for r in (0, 1):
    assert np.isfinite(by_step[6][f"train/loss/replica{r}"])
  assert any("eval/loss" in r for r in records)


def test_sequence_parallel_inside_islands_matches_without(tmp_path):
  losses = {}
  for name, mesh in (("plain", dict(data=4, fsdp=1)),
                     ("usp", dict(data=1, fsdp=1, ring=2, ulysses=2)),
                     ("fsdp_ring", dict(data=1, fsdp=2, ring=2))):
    c = _diloco_config(inner_steps=2)
    c.mesh.update(**mesh)
    c.train.update(steps=4, eval_every=4, log_every=1)
    train_and_evaluate(c, tmp_path / name)
    losses[name] = _losses(tmp_path / name)
  for name in ("usp", "fsdp_ring"):
    np.testing.assert_allclose(list(losses[name].values()), list(losses["plain"].values()),
                               rtol=1e-4)


@pytest.mark.parametrize("update, message", [
    (dict(kind="streaming"), "outer.kind must be"),
    (dict(kind="diloco", compression="fp8"), "outer.compression must be"),
    (dict(kind="diloco", drop_replicas="2@1"), "the island must be in"),
    (dict(kind="diloco", drop_replicas="0@1,1@1"), "every island"),
    (dict(kind="diloco", drop_replicas="one"), "REPLICA@OUTER_STEP"),
    (dict(kind="diloco", inner_steps=0), "outer.inner_steps must be > 0"),
])
def test_bad_outer_config(update, message):
  c = tiny_config()
  c.mesh.update(replica=2, data=4, fsdp=1)
  c.outer.update(**update)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_offload_inside_islands_trains_like_diloco_without_it():
  plain_losses, plain_theta, _ = _run(_diloco_config(inner_steps=2), n_steps=5)
  offloaded = _diloco_config(inner_steps=2)
  offloaded.optim.update(offload=True, subgroup_mb=0.01)
  losses, theta, state = _run(offloaded, n_steps=5)
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(plain_theta)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Every island's master params and moments live in host memory, [R, ...] over replica.
  for x in jax.tree.leaves({"p": state["params"], "o": state["opt_state"]}):
    assert x.sharding.memory_kind == "pinned_host"
    assert x.shape[0] == 2
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state["compute"])} == {"device"}


def test_islands_start_from_a_plain_run(tmp_path):
  plain = tiny_config()
  plain.mesh.update(data=8, fsdp=1)
  plain.checkpoint.every = 3
  train_and_evaluate(plain, tmp_path / "plain")  # 6 steps, checkpoints at 3 and 6
  continued = _diloco_config(inner_steps=2, init_from=str(tmp_path / "plain"))
  continued.train.update(steps=8)
  prepared = prepare(continued)
  with jax.set_mesh(prepared.mesh):
    program = program_lib.build(prepared)
    state, next_sequence = program.init(program_lib.OtherRun(str(tmp_path / "plain")))
    _, saved, position = checkpoint_lib.restore_other(tmp_path / "plain", program.base_abstract())
  state, saved = jax.device_get((state, saved))
  assert int(state["step"]) == 6 and next_sequence == position["next_sequence"] == 48
  for theta, islands, p in zip(jax.tree.leaves(state["outer"]["params"]),
                               jax.tree.leaves(state["params"]), jax.tree.leaves(saved["params"])):
    np.testing.assert_array_equal(theta, p)
    np.testing.assert_array_equal(islands, np.stack([p, p]))
  for islands, m in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(saved["opt_state"])):
    np.testing.assert_array_equal(islands, np.stack([m, m]))
  train_and_evaluate(continued, tmp_path / "diloco")
  records = _records(tmp_path / "diloco")
  assert sorted(_losses(tmp_path / "diloco")) == [7, 8]
  assert [r["outer/step"] for r in records if "train/loss" in r] == [0, 1]


def test_init_from_needs_a_checkpoint_and_starts_a_plain_run_too(tmp_path):
  with pytest.raises(ValueError, match="holds no checkpoint"):
    train_and_evaluate(_diloco_config(init_from=str(tmp_path / "missing")), tmp_path / "run")
  plain = tiny_config()
  plain.mesh.update(data=8, fsdp=1)
  plain.train.steps = 3
  train_and_evaluate(plain, tmp_path / "plain")  # one checkpoint: step 3
  with pytest.raises(ValueError, match=r"no checkpoint of step 2 .*\[3\]"):
    train_and_evaluate(_diloco_config(init_from=str(tmp_path / "plain"), init_step=2),
                       tmp_path / "run2")
  longer = tiny_config()  # a plain run from another plain run's checkpoint (the resume hint)
  longer.mesh.update(data=8, fsdp=1)
  longer.train.update(steps=4, seq_len=64)
  longer.outer.init_from = str(tmp_path / "plain")
  train_and_evaluate(longer, tmp_path / "longer")
  assert list(_losses(tmp_path / "longer")) == [4]  # it went on from the plain run's step 3
