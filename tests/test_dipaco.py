"""DiPaCo's outer loop (lcjax/outer/dipaco.py): hand-computed outer steps per module on a
separable quadratic model (2x2 grid with a private embedding; a flat MoE), DiLoCo's losses bit for
bit with one module per level, a flat MoE's zero bytes, bad configs, resume mid-round, paths with
ring attention and offload, paths in rounds. Routing: tests/test_routing.py."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax import config as config_lib
from lcjax import mesh as mesh_lib
from lcjax import parts as parts_lib
from lcjax import program as program_lib
from lcjax.optim import inner as inner_lib
from lcjax.outer import dipaco, paths, routing
from lcjax.state_spec import Decl
from lcjax.train import train_and_evaluate
from conftest import killed_and_resumed, read_losses, tiny_config, tiny_outer_config

DIM, R, ROWS = 4, 4, 8


def _leaves(levels):
  return ("embed", *(f"levels/{l}" for l in range(levels)), "final_norm")


def _tree(values, levels):
  """The model's tree shape, {"embed": {"w"}, "levels": {l: {"w"}}, "final_norm": {"w"}}, from
  a dict by leaf name."""
  return {"embed": {"w": values["embed"]},
          "levels": {l: {"w": values[f"levels/{l}"]} for l in range(levels)},
          "final_norm": {"w": values["final_norm"]}}


def _flat(tree):
  return {"embed": tree["embed"]["w"], "final_norm": tree["final_norm"]["w"],
          **{f"levels/{l}": v["w"] for l, v in tree["levels"].items()}}


def _quadratic_inner(mesh, inner_lr, levels):
  """Every leaf w of the model-shaped tree pulled to the masked mean of the batch rows by
  sum_leaves |w - x|^2 / 2 (one independent quadratic per leaf), plain SGD."""
  def loss_fn(params, batch):
    m = batch["mask"]
    sq = sum(0.5 * jnp.sum((w[None] - batch["x"]) ** 2, axis=1)
             for w in jax.tree.leaves(params))
    loss = jnp.sum(m * sq) / jnp.sum(m)
    return loss, (loss, jnp.sum(m))

  abstract = _tree({k: jax.ShapeDtypeStruct((DIM,), jnp.float32) for k in _leaves(levels)},
                   levels)
  parts = parts_lib.Parts(
      graphdef=None, abstract_params=abstract,
      param_decls=jax.tree.map(lambda _: Decl((None,)), abstract),
      create_params=lambda: _tree({k: jnp.full((DIM,), i, jnp.float32)
                                   for i, k in enumerate(_leaves(levels))}, levels),
      loss_fn=loss_fn, eval_step=lambda params, batch: loss_fn(params, batch)[1],
      batch_sharding=NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
  return inner_lib.Plain(parts, optax.sgd(inner_lr), lambda step: jnp.float32(inner_lr))


def _run(grid, batches, shard_tokens, inner_lr, evaluations=(), **outer):
  """`evaluations`: {step: [per-path held-out losses, ...]} fed to early stopping after it."""
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(
      dict(replica=R, data=-1, fsdp=1, ring=1, ulysses=1, tensor=1)))
  c = config_lib.base_config().outer
  c.update(kind="dipaco", **outer)
  with jax.set_mesh(mesh):
    inner = _quadratic_inner(mesh, inner_lr, len(grid.modules))
    stage = dipaco.DiPaCo(inner, c, R, mesh, grid, shard_tokens)
    program = program_lib.Program(stage, inner.parts, inner.tx, mesh)
    state, records = program.init(program_lib.Scratch())[0], []
    for step, batch in enumerate(batches, 1):
      state, _ = program.step(state, jax.device_put(batch, program.batch_sharding))
      for losses in dict(evaluations).get(step, ()):
        state = program.early_stop(state, {f"eval/loss/path{p}": v for p, v in enumerate(losses)})
      records.append(jax.device_get(state))
  return records, stage


@pytest.mark.parametrize("modules, private, stop", [("2x2", "embed", False),
                                                    ("4", "embed,head", False),
                                                    ("2x2", "embed", True), ("4", "embed,head", True)])
def test_outer_steps_per_module_match_a_hand_computation(modules, private, stop):
  """Two rounds of H inner steps; each module's delta uses only the paths through it, weighted
  by tokens x relative shard size, rescaled by sqrt(paths through it / P); Nesterov per module;
  private modules (never averaged) still take the outer step. With early stopping, path 1's
  held-out loss rises after round 1: in round 2 its islands weigh nothing and the modules only
  it goes through stay where they are (a path without held-out loss, inf, runs on)."""
  levels = len(modules.split("x"))
  grid = paths.PathGrid(paths.parse_modules(modules, levels),
                        paths.parse_private(private, levels, tie_embeddings=True))
  H, lr, mu, inner_lr = 2, 0.7, 0.9, 0.1
  shard_tokens = [1.0, 2.0, 3.0, 2.0]
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2 * H):
    mask = np.ones(ROWS, np.float32)
    mask[[1, 5]] = 0.0  # islands 0 and 2 train on one row, 1 and 3 on two: unequal tokens
    batches.append({"x": rng.normal(size=(ROWS, DIM)).astype(np.float32), "mask": mask})
  evaluations = {H: [[1.0, 1.0, 1.0, np.inf], [0.5, 2.0, 0.5, np.inf]]} if stop else {}
  records, stage = _run(grid, batches, shard_tokens, inner_lr, evaluations, inner_steps=H,
                        lr=lr, momentum=mu, nesterov=True, modules=modules, private=private,
                        early_stopping=stop)
  running = np.ones(R)
  scale = np.array(shard_tokens) / np.mean(shard_tokens)
  leaves = _leaves(levels)
  group = {"embed": grid.group("embed"), "final_norm": grid.group("final_norm"),
           **{f"levels/{l}": grid.group("levels", l) for l in range(levels)}}
  modules_of = {k: np.stack([np.full(DIM, i, np.float64)] * grid.count(group[k]))
                for i, k in enumerate(leaves)}
  momentum = {k: np.zeros_like(v) for k, v in modules_of.items()}
  islands = [{k: modules_of[k][grid.module_of(group[k], r)].copy() for k in leaves}
             for r in range(R)]
  for round_ in range(2):
    tokens = np.zeros(R)
    for step in range(round_ * H, (round_ + 1) * H):
      b = batches[step]
      for r in range(R):
        rows = slice(2 * r, 2 * r + 2)
        x, m = b["x"][rows], b["mask"][rows]
        target = (m[:, None] * x).sum(0) / m.sum()
        for k in leaves:
          islands[r][k] = islands[r][k] - inner_lr * (islands[r][k] - target)
        tokens[r] += m.sum()
    for k in leaves:
      g = group[k]
      delta = np.zeros_like(modules_of[k])
      for module in range(grid.count(g)):
        through = [r for r in range(R) if grid.module_of(g, r) == module]
        c = np.array([tokens[r] * scale[r] * running[r] for r in through])
        for w, r in zip(c / max(c.sum(), 1e-30), through):
          delta[module] += w * (modules_of[k][module] - islands[r][k])
        delta[module] *= np.sqrt(len(through) / grid.num_paths)
      momentum[k] = delta + mu * momentum[k]
      live = np.array([any(running[r] for r in range(R) if grid.module_of(g, r) == module)
                       for module in range(grid.count(g))], np.float64)[:, None]
      modules_of[k] = modules_of[k] - live * lr * (delta + mu * momentum[k])
    islands = [{k: modules_of[k][grid.module_of(group[k], r)].copy() for k in leaves}
               for r in range(R)]
    got = records[(round_ + 1) * H - 1]
    got_modules, got_islands = _flat(got["outer"]["params"]), _flat(got["params"])
    for k in leaves:
      np.testing.assert_allclose(got_modules[k], modules_of[k], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got_islands[k], np.stack([isl[k] for isl in islands]),
                                 rtol=1e-5, atol=1e-6)
    assert int(got["outer"]["step"]) == round_ + 1
    if stop:
      running[1] = 0.0
      np.testing.assert_array_equal(got["outer"]["paths"]["stopped"], [0, 1, 0, 0])
  if modules == "4":  # the flat MoE: every module has one island, nothing is exchanged
    assert stage.bytes_per_sync == 0


def test_one_module_per_level_is_diloco_bit_for_bit(tmp_path):
  """Two levels of one module each: one path, every island trains it on DiLoCo's data split;
  every logged loss (train, per island, eval) is DiLoCo's exactly."""
  records = {}
  for kind in ("diloco", "dipaco"):
    c = tiny_outer_config(kind, **({"modules": "1x1"} if kind == "dipaco" else {}))
    c.model.num_levels = 2
    train_and_evaluate(c, tmp_path / kind)
    records[kind] = read_losses(tmp_path / kind)
  assert records["dipaco"] == records["diloco"]
  assert len(records["diloco"]) >= 6


def test_a_flat_moe_sends_nothing_and_2x2_sends_less_than_diloco(tmp_path):
  got = {}
  for name, outer in (("diloco", {}), ("moe", dict(modules="4", private="embed,head")),
                      ("2x2", dict(modules="2x2"))):
    c = tiny_outer_config("diloco" if name == "diloco" else "dipaco", **outer)
    c.model.num_levels = 1 if name != "2x2" else 2
    c.train.steps = 2
    got[name] = train_and_evaluate(c, tmp_path / name, dry_run=True)
  assert got["moe"]["outer/bytes_per_sync"] == 0
  assert got["moe"]["outer/paths"] == 4
  assert 0 < got["2x2"]["outer/bytes_per_sync"] < got["diloco"]["outer/bytes_per_sync"]


@pytest.mark.parametrize("update, message", [
    (dict(modules="2x2"), r"outer.modules='2x2' gives 2 levels but the model has "
                          r"model.num_levels=1"),
    (dict(modules="3"), r"gives 3 paths; mesh.replica \(4\) must be a multiple"),
    (dict(modules="2xa"), r"outer.modules must read K1xK2x"),
    (dict(modules="0"), r"outer.modules must read K1xK2x"),
    (dict(modules="2", private="level1"), r"outer.private: unknown parts \['level1'\]"),
    (dict(modules="2", private="head"), r"the head is the embedding"),
    (dict(routing="nearest"), r"outer.routing must be"),
    (dict(routing="kmeans"), r"set outer.base_from to a plain run's workdir"),
    (dict(modules="4", routing="product_kmeans", base_from="/tmp/x"), r"needs a 2-level grid"),
    (dict(routing="kmeans", base_from="/tmp/x", route_prefix=32),
     r"outer.route_prefix must be in \[1, train.seq_len=32\)"),
    (dict(routing="discriminative", base_from="/tmp/x"),
     r"set outer.init_from to that run's workdir and outer.router_fraction > 0"),
    (dict(router_fraction=1.0), r"outer.router_fraction must be in \[0, 1\)"),
    (dict(modules="2", overlap=3), r"outer.overlap must be in \[1, P=2\]"),
    (dict(routing="kmeans", base_from="/tmp/x", route_prefix=8),
     r"reads the first outer.route_prefix=8 tokens of every held-out document: set "
     r"data.eval_skip_prefix=8"),
])
def test_bad_dipaco_config_stops_at_validation(update, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(tiny_outer_config("dipaco", **update))


def test_base_from_is_dipacos():
  with pytest.raises(ValueError, match=r"outer.base_from starts DiPaCo's modules"):
    config_lib.validate(tiny_outer_config("diloco", base_from="/tmp/x"))


def test_resume_mid_round_is_exact_with_paths(tmp_path, crash_on_evaluation, capsys):
  """2x2 paths, H=2, checkpoints at 3 (mid-round) and 6: a run killed at its second evaluation
  resumes from step 3 and logs the uninterrupted run's losses, per path and routed eval; a
  changed routing is refused; sampling the run routes the prompt and runs its path."""
  c = tiny_outer_config("dipaco", modules="2x2")
  c.model.num_levels = 2
  c.checkpoint.every = 3
  straight, resumed = killed_and_resumed(c, tmp_path, crash_on_evaluation)
  assert read_losses(resumed) == read_losses(straight)
  other_routing = tiny_outer_config("dipaco", modules="2x2", overlap=2)
  other_routing.model.num_levels = 2
  with pytest.raises(ValueError, match=r"holds a run with outer.overlap=1, but this config has 2"):
    train_and_evaluate(other_routing, resumed)  # another routing: other documents per path
  from lcjax import sample
  text = sample.sample_from_workdir(straight, "def f", 4, temperature=0.0)
  assert text.startswith("def f")
  path = routing.route_text(config_lib.validate(c), "def f")
  assert f"routed to path {path} of 4" in capsys.readouterr().err
  records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
  start = records[0]
  assert start["outer/paths"] == 4 and start["outer/modules"] == "2x2"
  assert len(start["outer/shard_tokens"]) == 4 and min(start["outer/shard_tokens"]) > 0
  last_eval = [r for r in records if "eval/loss/path3" in r][-1]
  per_path = [last_eval[f"eval/loss/path{p}"] for p in range(4)]
  assert min(per_path) <= last_eval["eval/loss"] <= max(per_path)  # the routed mixture
  assert any(f"train/loss/path{p}" in r for r in records for p in range(4))


def test_paths_compose_with_ring_attention_and_offload_inside_the_islands(tmp_path):
  """2x2 paths with ring attention (ring 2) and offloaded AdamW state inside every island
  train as with neither."""
  losses = {}
  for name in ("plain", "ring_offload"):
    c = tiny_outer_config("dipaco", modules="2x2")
    c.model.num_levels = 2
    c.train.update(steps=4, eval_every=4)
    if name == "ring_offload":
      c.mesh.update(data=1, ring=2)
      c.optim.update(offload=True, subgroup_mb=0.01)
    else:  # the end-of-run sample runs the prompt's path
      c.train.update(sample_prompt="def ", sample_tokens=3)
    train_and_evaluate(c, tmp_path / name)
    losses[name] = read_losses(tmp_path / name)
  assert (tmp_path / "plain" / "sample.txt").read_text().startswith("def ")
  np.testing.assert_allclose(list(losses["ring_offload"].values()),
                             list(losses["plain"].values()), rtol=1e-4)


def _eval_records(workdir):
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in records if "eval/loss" in r}


def test_paths_in_rounds_train_as_parallel_islands_would(tmp_path, crash_on_evaluation):
  """4 paths on 2 islands train in 2 rounds of H steps before each outer step: with a constant
  learning rate and the same rows per path, outer step k (step 2kH) gives the modules 4
  islands give at step kH, routed eval per path included; killed between the rounds of an
  outer step, the run resumes exactly, and a path is logged only in the steps it trains."""
  parallel = tiny_outer_config("dipaco", modules="2x2")
  parallel.model.num_levels = 2
  parallel.train.update(steps=4, eval_every=2, batch_size=16, warmup_steps=0,
                        end_lr_fraction=1.0)
  train_and_evaluate(parallel, tmp_path / "parallel")
  rounds = tiny_outer_config("dipaco", modules="2x2")
  rounds.model.num_levels = 2
  rounds.mesh.update(replica=2, data=4)
  rounds.train.update(steps=8, eval_every=4, batch_size=8, warmup_steps=0, end_lr_fraction=1.0,
                      eval_batches=2)  # the same held-out rows as one batch of 16
  rounds.checkpoint.every = 3  # step 6: between the two rounds of the second outer step
  straight, resumed = killed_and_resumed(rounds, tmp_path, crash_on_evaluation)
  assert read_losses(resumed) == read_losses(straight)
  a, b = _eval_records(tmp_path / "parallel"), _eval_records(straight)
  for step in (2, 4):
    for key in ["eval/loss"] + [f"eval/loss/path{p}" for p in range(4) if f"eval/loss/path{p}" in a[step]]:
      np.testing.assert_allclose(b[2 * step][key], a[step][key], rtol=2e-5, err_msg=key)
  records = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
  assert records[0]["outer/rounds"] == 2 and records[0]["outer/islands_per_path"] == 1
  trained = {r["step"]: sorted(p for p in range(4) if f"train/loss/path{p}" in r)
             for r in records if "train/loss" in r}
  assert trained[1] == trained[2] == [0, 2] and trained[3] == trained[4] == [1, 3]
  assert [r["outer/step"] for r in records if "outer/step" in r][:4] == [0, 0, 0, 1]


def test_the_experiment_and_every_run_of_its_comparison_validate(tmp_path):
  """experiments/dipaco_cpu.py (the base run and DiPaCo) and each run of
  scripts/compare_dipaco.py are valid configs, over a corpus of three domains."""
  import pathlib
  import runpy
  root = pathlib.Path(__file__).resolve().parent.parent
  experiment = runpy.run_path(str(root / "experiments" / "dipaco_cpu.py"))
  compare = runpy.run_path(str(root / "scripts" / "compare_dipaco.py"))
  for arg, updates, _ in compare["variants"](tmp_path).values():
    config_lib.validate(compare["config_for"](arg, updates))
  globs = experiment["corpus_globs"]().split(",")
  assert [g.rsplit("/", 1)[-1] for g in globs[:3]] == ["*.py", "*.h", "METADATA"]
  with pytest.raises(ValueError, match=r"must be 'base'"):
    experiment["get_config"]("dense")
