"""The planner (lcjax/plan.py, scripts/plan.py): its cost model's orderings, the candidate space,
and a search that compiles for a TPU target and finds a configuration that fits where the plain
one does not; scripts/fit.py and scripts/plan.py for a target from the command line."""
import subprocess
import sys

import pytest

from lcjax import plan, targets
from lcjax.model import ModelConfig

needs_libtpu = pytest.mark.skipif(not targets.have_tpu_compiler(),
                                  reason=f"libtpu is not installed: {targets.INSTALL}")
LLAMA3_8B = ModelConfig(vocab_size=128256, num_layers=32, embed_dim=4096, num_heads=32,
                        num_kv_heads=8, head_dim=128, mlp_dim=14336)


def _predict(target="tpu:v5p:2x2x2", **kw):
  c = plan.Candidate(**{"ring": 1, "ulysses": 1, "fsdp": 8, "mst": False, "remat": "none",
                        "offload": False, **kw})
  return plan.predict(c, LLAMA3_8B, targets.parse(target), 8, 131072, LLAMA3_8B.param_count())


def test_cost_model_charges_what_each_technique_recomputes_or_moves():
  none, dots, full = (_predict(remat=r) for r in ("none", "dots", "full"))
  assert none.compute_s < dots.compute_s < full.compute_s
  assert _predict(mst=True).compute_s > none.compute_s
  assert none.host_exposed_s == 0 < _predict(offload=True).host_exposed_s
  assert none.attention_comm_s == 0
  ring = _predict(ring=8, fsdp=1)
  assert ring.attention_comm_s > 0  # K/V rotations the attention compute does not hide
  # the same step on 8 times the chips: an eighth of the compute per chip
  assert _predict("tpu:v5p:4x4x4", fsdp=64).compute_s == pytest.approx(none.compute_s / 8)


def test_candidates_respect_the_heads_and_the_batch():
  cands = plan.candidates(8, LLAMA3_8B, batch_size=2)
  assert cands and all(LLAMA3_8B.num_heads % c.ulysses == 0 for c in cands)
  assert all(2 % c.fsdp == 0 and c.ring * c.ulysses * c.fsdp == 8 for c in cands)
  assert {(c.ring, c.ulysses) for c in cands} >= {(4, 1), (2, 2), (1, 4), (8, 1), (1, 8)}
  assert len({c.remat for c in cands}) == 4 and {c.mst for c in cands} == {False, True}


def test_memory_dominance_is_a_partial_order_over_one_split():
  c = lambda **kw: plan.Candidate(**{"ring": 2, "ulysses": 2, "fsdp": 2, "mst": True,
                                     "remat": "full", "offload": True, **kw})
  frugal = c(remat="offload")
  assert plan.needs_at_least(c(), frugal) and not plan.needs_at_least(frugal, c())
  assert plan.needs_at_least(c(mst=False, offload=False, remat="none"), c())
  assert not plan.needs_at_least(c(mst=False, remat="offload"), c())  # offload remat keeps less
  assert not plan.needs_at_least(c(ring=4, fsdp=1), c())  # another split: no conclusion
  assert plan.needs_at_least(c(), c())


def _wide_config():
  from conftest import wide_config
  return wide_config(256)


@needs_libtpu
def test_search_finds_a_fitting_plan_where_the_plain_step_does_not():
  """tpu:v5e:2x2 at 512 tokens with a 40 MiB budget: the plain step (no MsT, no remat; about
  71 MiB), the fastest predicted, does not fit; the planner compiles the next fastest until one
  fits and returns it first; slower ones are not compiled."""
  budget = 40 * 2**20
  rows = plan.search(_wide_config(), targets.parse("tpu:v5e:2x2"), 512, budget_bytes=budget,
                     remats=("full", "none"), offloads=(False,), splits=[(1, 1)])
  plain = next(r for r in rows if not r.candidate.mst and r.candidate.remat == "none")
  best = rows[0]
  assert plain.memory is not None and plain.memory.total > budget and not plain.fits
  assert best.fits and best.memory.total <= budget and best.candidate != plain.candidate
  compiled = [r for r in rows if r.memory is not None]
  assert all(r.prediction.step_s >= best.prediction.step_s for r in rows if r.fits)
  assert 2 <= len(compiled) < len(rows)
  assert all(r.note.startswith("not compiled") for r in rows if r.memory is None)
  assert all(not plan.needs_at_least(r.candidate, plain.candidate) for r in compiled
             if r is not plain)  # nothing that needs the plain step's memory was compiled
  flags = plan.flags(best, plan.model_config(_wide_config()), 512, 4)
  assert f"--config.model.remat={best.candidate.remat}" in flags


def _script(*args):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("script,args,message", [
    ("scripts/plan.py", ["--target=tpu:v9:2x2"], r"plan.py: error: unknown target 'tpu:v9:2x2'"),
    ("scripts/plan.py", ["--target=tpu:v5p:2x2x1", "--margin=1.5"], r"--margin in \[0, 1\)"),
    ("scripts/fit.py", ["--memory_gb=-1"], r"lcjax: error: --memory_gb must be a positive"),
    ("scripts/fit.py", ["--target=gpu:a100:8"], r"lcjax: error: unknown target 'gpu:a100:8'")])
def test_scripts_refuse_bad_input_in_one_line(script, args, message):
  out = _script(script, "--config=experiments/tiny_cpu.py", *args)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert __import__("re").search(message, last), out.stderr[-2000:]


@needs_libtpu
def test_fit_script_plans_for_a_tpu_target():
  out = _script("scripts/fit.py", "--config=experiments/tiny_cpu.py", "--target=tpu:v5e:2x2",
                "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.train.batch_size=4",
                "--remat=none", "--granularity=256", "--max_len=256")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "budget 16 GiB per device; tpu:v5e:2x2, 4 devices" in out.stdout
  assert out.stdout.count("| none | 256 | 0.") == 2  # MsT off and on: the one length tried fits


@needs_libtpu
def test_isolated_compile_reraises_the_childs_error():
  """fit.step_memory_isolated compiles in a spawned child; an error there (here a mesh that does
  not match the target's 4 devices) comes back as the same one-line ValueError."""
  from conftest import tiny_config
  from lcjax import fit
  with pytest.raises(ValueError, match=r"multiply to 8 but there are 4 devices"):
    fit.step_memory_isolated(tiny_config(), 64, "tpu:v5e:2x2")
