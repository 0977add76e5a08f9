"""Multi-process runs with real processes: scripts/launch_local.sh starts 2 processes of 4 fake
CPU devices each, joined by jax.distributed (gloo), and their losses are compared with one
process of 8 devices running the same mesh in this test process."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import read_losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # a hung process fails the test instead of the suite

# The tiny model of conftest.tiny_config, as command-line overrides of experiments/tiny_cpu.py.
TINY = {"train.steps": 6, "train.batch_size": 8, "train.seq_len": 32, "train.lr": 1e-2,
        "train.warmup_steps": 2, "train.eval_every": 3, "train.eval_batches": 1,
        "train.log_every": 1, "train.sample_prompt": "", "train.peak_flops": 1e9,
        "checkpoint.every": 2, "checkpoint.keep": 5, "model.num_layers": 2, "model.embed_dim": 32,
        "model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": 8, "model.mlp_dim": 64,
        "data.max_documents": 30}
PLAIN = {"mesh.data": 1, "mesh.dcn_data": 2, "mesh.fsdp": 2, "mesh.ring": 2}
# 10 steps: a SIGTERM after checkpoint 4 is honoured a step or two later (JAX's preemption sync
# point is a step every process has yet to reach), well before the end.
DILOCO = {"mesh.data": 1, "mesh.dcn_replica": 2, "mesh.fsdp": 4, "outer.kind": "diloco",
          "outer.inner_steps": 2, "train.steps": 10, "train.eval_every": 5}


def _one_process_config(overrides):
  """The same run on this process's 8 devices: each dcn_ size folded into its axis."""
  from lcjax import config as config_lib
  c = cli_config(overrides)
  for axis in config_lib.MESH_AXES:
    c.mesh[axis] = config_lib.mesh_size(c.mesh, axis)
    c.mesh[f"dcn_{axis}"] = 1
  return c


def cli_config(overrides):
  from lcjax import cli
  from lcjax import config as config_lib
  return cli.apply_overrides(cli.load_config(str(ROOT / "experiments/tiny_cpu.py")),
                             {k: str(v) for k, v in {**TINY, **overrides}.items()},
                             config_lib.base_config())


def _environment(cache_dir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # One compile shared by a killed run and its relaunch.
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), LCJAX_GRACE_S="20",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def launch(workdir, overrides, cache_dir, *, processes=2):
  """scripts/launch_local.sh with the tiny run: a Popen in a session of its own."""
  args = ["bash", str(ROOT / "scripts/launch_local.sh"), str(processes),
          f"--config={ROOT / 'experiments/tiny_cpu.py'}", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]
  return subprocess.Popen(args, cwd=ROOT, env=_environment(cache_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc) -> str:
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"processes still running after {TIMEOUT_S} s: {proc.communicate()[0][-3000:]}")
  return out


def run_to_end(workdir, overrides, cache_dir) -> str:
  proc = launch(workdir, overrides, cache_dir)
  out = finish(proc)
  assert proc.returncode == 0, out[-3000:]
  return out


def one_process_losses(overrides, workdir):
  from lcjax.train import train_and_evaluate
  train_and_evaluate(_one_process_config(overrides), workdir)
  return read_losses(workdir)


def assert_same_losses(got, want):
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)


def _short_documents(directory, count=600, seed=0):
  """`count` text files of 3-6 words: a sequence of 32 bytes holds about two documents, so the
  rows of the two processes touch different documents (the stdlib's files are longer than many
  sequences, and neighbouring rows share them)."""
  import random
  rng = random.Random(seed)
  words = ["lcjax", "ring", "ulysses", "mesh", "host", "token", "batch", "step", "shard"]
  directory.mkdir()
  for i in range(count):
    (directory / f"doc{i:03d}.txt").write_text(" ".join(rng.choices(words, k=rng.randint(3, 6))))
  return {"data.source": "text", "data.paths": f"{directory}/*.txt", "data.max_documents": 0}


def test_two_processes_log_the_losses_of_one(tmp_path):
  """data across the 2 processes (mesh.dcn_data=2), fsdp 2 x ring 2 inside each; each process
  tokenizes only the documents of its rows."""
  plain = {**PLAIN, **_short_documents(tmp_path / "corpus")}
  out = run_to_end(tmp_path / "two", plain, tmp_path / "cache")
  assert "[process 1] {" not in out, "only process 0 prints the result"
  assert "held-out loss" in out
  metrics = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in metrics]
  assert steps == sorted(steps), "one writer: records in order, none twice"
  start = json.loads(metrics[0])
  assert start["mesh"] == "data=2 x fsdp=2 x ring=2" and start["device/count"] == 8
  assert_same_losses(read_losses(tmp_path / "two"), one_process_losses(plain, tmp_path / "one"))
  # Each process tokenized about half of what one process reading every row did.
  alone = _last(tmp_path / "one", "data/documents_loaded/process0")
  shares = [_last(tmp_path / "two", f"data/documents_loaded/process{i}") for i in (0, 1)]
  assert max(shares) < 0.75 * alone and sum(shares) <= 1.15 * alone, (shares, alone)


def _last(workdir, key):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r[key] for r in records if key in r][-1]


def _wait_for_checkpoint(proc, workdir, step):
  deadline = time.monotonic() + TIMEOUT_S
  committed = workdir / "checkpoints" / str(step)
  while not (committed / "_CHECKPOINT_METADATA").exists():
    if proc.poll() is not None:
      pytest.fail(f"the run ended before checkpoint {step}: {proc.communicate()[0][-3000:]}")
    if time.monotonic() > deadline:
      os.killpg(proc.pid, signal.SIGKILL)
      pytest.fail(f"no checkpoint {step} after {TIMEOUT_S} s")
    time.sleep(0.2)


def test_diloco_islands_across_processes_killed_preempted_and_resumed(tmp_path):
  """DiLoCo with one island per process (mesh.dcn_replica=2: the outer sync crosses the slow
  link). Both processes SIGKILLed after checkpoint 2 and relaunched; then SIGTERM to both after
  checkpoint 4: they save the same step together and exit 75; relaunched again, the run ends
  with the losses of one process running straight through."""
  workdir, cache = tmp_path / "two", tmp_path / "cache"
  proc = launch(workdir, DILOCO, cache)
  _wait_for_checkpoint(proc, workdir, 2)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  proc = launch(workdir, DILOCO, cache)
  _wait_for_checkpoint(proc, workdir, 4)
  proc.send_signal(signal.SIGTERM)  # the launcher passes it to both processes
  out = finish(proc)
  assert proc.returncode == 75, out[-3000:]
  assert "resumed from step 2" in out
  preempted = [line for line in out.splitlines() if "lcjax: SIGTERM at step" in line]
  assert len(preempted) == 2 and preempted[0].split("] ")[-1] == preempted[1].split("] ")[-1]
  out = run_to_end(workdir, DILOCO, cache)
  assert "resumed from step" in out
  assert_same_losses(read_losses(workdir), one_process_losses(DILOCO, tmp_path / "one"))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any(r.get("outer/step") for r in records)


def _process(i, workdir, extra, port, cache_dir):
  env = _environment(cache_dir)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  args = [sys.executable, "-m", "lcjax.main", f"--config={ROOT / 'experiments/tiny_cpu.py'}",
          f"--workdir={workdir}", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={i}"] + [f"--config.{k}={v}" for k, v in {**TINY, **PLAIN}.items()]
  return subprocess.Popen(args + extra, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_a_bad_input_on_one_process_stops_both_with_its_line(tmp_path):
  """Process 1 alone is given data that does not exist: both stop with process 1's one line
  (none waits for the other in a collective)."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  missing = tmp_path / "no_such_corpus" / "*.txt"
  procs = [_process(0, tmp_path / "run", [], port, tmp_path / "cache"),
           _process(1, tmp_path / "run", ["--config.data.source=text",
                                           f"--config.data.paths={missing}"], port,
                    tmp_path / "cache")]
  lines = []
  for proc in procs:
    try:
      _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail("a process hung after the other's bad input")
    assert proc.returncode == 1, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("lcjax: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    lines.append(errors[0])
  assert lines[0] == lines[1] and "no_such_corpus" in lines[0]
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_launcher_refuses_a_device_count_it_cannot_split(tmp_path):
  proc = subprocess.run(["bash", str(ROOT / "scripts/launch_local.sh"), "3",
                         f"--workdir={tmp_path}"], cwd=ROOT, env=_environment(tmp_path),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("lcjax: error: LCJAX_DEVICES=8")


def test_processes_from_flags_and_environment():
  from lcjax import distributed
  assert distributed.from_flags(environ={}) is None
  p = distributed.from_flags("10.0.0.1:1234", 4, 3, environ={})
  assert (p.coordinator, p.num_processes, p.process_id) == ("10.0.0.1:1234", 4, 3)
  env = {"LCJAX_COORDINATOR": "h:1", "LCJAX_NUM_PROCESSES": "2", "LCJAX_PROCESS_ID": "1"}
  assert distributed.from_flags(environ=env).process_id == 1
  assert distributed.from_flags(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}).given is False
  assert distributed.from_flags(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.from_flags(environ={"TPU_WORKER_HOSTNAMES": "a,b"}) is not None
  for bad, match in [(("h:1", 2, None), "needs all three"), (("h", 2, 0), "not HOST:PORT"),
                     (("h:1", 2, 2), r"process_id=2 must be in \[0, --num_processes=2\)")]:
    with pytest.raises(ValueError, match=match):
      distributed.from_flags(*bad, environ={})
