"""The inventory of bad inputs (docs/reliability.md): each runs through a real command-line entry
point (lcjax.main, lcjax.sample, scripts/fit.py) in this process, and must exit non-zero with
exactly one `lcjax: error:` line naming the key, flag or file, print no traceback, and leave
every file of an existing, trained workdir as it was (its lock file aside).

A case is (entry, arguments, what its line must name); arguments may name {cfg} (a tiny config
file), {run} (the trained workdir), {tmp} (this test's directory) and {files} (bad data files).
Every case fails before the step is compiled."""
import fcntl
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil

import pytest

from lcjax import config as config_lib
from lcjax import main as main_lib
from lcjax import sample as sample_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent

CONFIG_FILE = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_config


def get_config():
  c = tiny_config()
  c.train.update(steps=2, eval_every=2)
  c.checkpoint.update(every=2)
  return c
"""


def _fit_main():
  spec = importlib.util.spec_from_file_location("fit_script", ROOT / "scripts" / "fit.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


ENTRIES = {"main": lambda: main_lib.main, "sample": lambda: sample_lib.main, "fit": _fit_main}

RUN = ["--config={cfg}", "--workdir={run}"]
# id: (entry, arguments, what the one line must name)
CASES = {
    # flags and the config file
    "no_config": ("main", ["--workdir={run}"], "--config is required"),
    "no_workdir": ("main", ["--config={cfg}"], "--workdir is required"),
    "unknown_flag": ("main", RUN + ["--bogus=1"], "bogus"),
    "stray_argument": ("main", RUN + ["train"], "unexpected arguments ['train']"),
    "bool_flag_value": ("main", RUN + ["--dry_run=maybe"], "--dry_run"),
    "missing_config_file": ("main", ["--config={tmp}/nope.py", "--workdir={run}"], "nope.py"),
    "config_syntax_error": ("main", ["--config={files}/broken.py", "--workdir={run}"],
                            "broken.py:1: syntax error"),
    "config_without_get_config": ("main", ["--config={files}/no_get.py", "--workdir={run}"],
                                  "no_get.py defines no get_config()"),
    "config_raises": ("main", ["--config={files}/raises.py", "--workdir={run}"],
                      "raises.py: get_config() fails"),
    "config_not_a_configdict": ("main", ["--config={files}/returns_dict.py", "--workdir={run}"],
                                "returns_dict.py: get_config() returned dict"),
    "unknown_key_in_file": ("main", ["--config={files}/typo.py", "--workdir={run}"],
                            "unknown config key 'train.stepz'"),
    "string_for_int_in_file": ("main", ["--config={files}/string_steps.py", "--workdir={run}"],
                               "string_steps.py: get_config() fails"),
    "unknown_override": ("main", RUN + ["--config.train.stepz=3"], "'train.stepz'"),
    "unknown_section": ("main", RUN + ["--config.nosuch.key=1"], "'nosuch.key'"),
    "override_of_a_section": ("main", RUN + ["--config.train=3"], "--config.train names a section"),
    "override_not_an_int": ("main", RUN + ["--config.train.steps=abc"], "--config.train.steps"),
    "override_float_for_int": ("main", RUN + ["--config.train.steps=1.5"], "--config.train.steps"),
    "override_not_a_bool": ("main", RUN + ["--config.model.tie_embeddings=maybe"],
                            "--config.model.tie_embeddings"),
    "override_without_value": ("main", RUN + ["--config.train.steps"], "--config.train.steps"),
    # values
    "lr_inf": ("main", RUN + ["--config.train.lr=inf"], "'train.lr' must be a finite number"),
    "lr_nan": ("main", RUN + ["--config.train.lr=nan"], "'train.lr' must be a finite number"),
    "lr_zero": ("main", RUN + ["--config.train.lr=0"], "train.lr must be > 0"),
    "steps_zero": ("main", RUN + ["--config.train.steps=0"], "train.steps must be > 0"),
    "seq_len_zero": ("main", RUN + ["--config.train.seq_len=0"], "train.seq_len must be > 0"),
    "log_every_zero": ("main", RUN + ["--config.train.log_every=0"], "train.log_every"),
    "eval_batches_negative": ("main", RUN + ["--config.train.eval_batches=-1"],
                              "train.eval_batches must be >= 0"),
    "seed_negative": ("main", RUN + ["--config.train.seed=-1"], "train.seed must be >= 0"),
    "warmup_negative": ("main", RUN + ["--config.train.warmup_steps=-1"], "train.warmup_steps"),
    "peak_flops_negative": ("main", RUN + ["--config.train.peak_flops=-1"], "train.peak_flops"),
    "end_lr_fraction": ("main", RUN + ["--config.train.end_lr_fraction=2"],
                        "train.end_lr_fraction"),
    "nan_policy": ("main", RUN + ["--config.train.nan_policy=ignore"], "train.nan_policy"),
    "nan_skip_with_offload": ("main", RUN + ["--config.train.nan_policy=skip",
                                             "--config.optim.offload=true"], "optim.offload"),
    "batch_not_divisible": ("main", RUN + ["--config.train.batch_size=6"], "train.batch_size (6)"),
    "head_dim_odd": ("main", RUN + ["--config.model.head_dim=63"], "model.head_dim must be even"),
    "kv_heads": ("main", RUN + ["--config.model.num_kv_heads=3"], "model.num_kv_heads"),
    "levels": ("main", RUN + ["--config.model.num_layers=3", "--config.model.num_levels=2"],
               "model.num_levels"),
    "dtype": ("main", RUN + ["--config.model.dtype=float16"], "model.dtype"),
    "remat": ("main", RUN + ["--config.model.remat=sometimes"], "model.remat"),
    "attention": ("main", RUN + ["--config.model.attention=flash"], "model.attention"),
    "vocab_too_small": ("main", RUN + ["--config.model.vocab_size=100"], "vocab"),
    "norm_eps": ("main", RUN + ["--config.model.norm_eps=0"], "model.norm_eps"),
    "rope_theta": ("main", RUN + ["--config.model.rope_theta=-1"], "model.rope_theta"),
    "mlp_chunks": ("main", RUN + ["--config.model.mlp_chunks=1000"], "model.mlp_chunks"),
    "optimizer": ("main", RUN + ["--config.optim.name=lamb"], "optim.name"),
    "clip_norm": ("main", RUN + ["--config.optim.clip_norm=-1"], "optim.clip_norm"),
    "b2": ("main", RUN + ["--config.optim.b2=1.0"], "optim.b2"),
    "offload_sgd": ("main", RUN + ["--config.optim.offload=true", "--config.optim.name=sgd"],
                    "optim.offload"),
    "mesh_size": ("main", RUN + ["--config.mesh.data=3"], "8 devices"),
    "mesh_axis_zero": ("main", RUN + ["--config.mesh.ring=0"], "mesh.ring"),
    "checkpoint_keep": ("main", RUN + ["--config.checkpoint.keep=0"], "checkpoint.keep"),
    "outer_kind": ("main", RUN + ["--config.outer.kind=bogus"], "outer.kind"),
    "drop_without_diloco": ("main", RUN + ["--config.outer.drop_replicas=1@2"],
                            "outer.drop_replicas"),
    "target_without_dry_run": ("main", RUN + ["--target=tpu:v5p:2x2x2"], "--dry_run"),
    "unknown_target": ("main", RUN + ["--dry_run", "--target=tpu:v9:2x2"], "tpu:v9:2x2"),
    # data
    "source": ("main", RUN + ["--config.data.source=parquet"], "data.source"),
    "text_without_paths": ("main", RUN + ["--config.data.source=text"], "data.paths"),
    "glob_matches_nothing": ("main", RUN + ["--config.data.source=text",
                                            "--config.data.paths={tmp}/none/*.txt"],
                             "none/*.txt"),
    "binary_files_only": ("main", RUN + ["--config.data.source=text",
                                         "--config.data.paths={files}/*.bin"], ".bin"),
    "jsonl_bad_json": ("main", RUN + ["--config.data.source=jsonl",
                                      "--config.data.paths={files}/bad_json.jsonl"],
                       "bad_json.jsonl:2"),
    "jsonl_not_object": ("main", RUN + ["--config.data.source=jsonl",
                                        "--config.data.paths={files}/list.jsonl"], "list.jsonl:1"),
    "jsonl_text_not_string": ("main", RUN + ["--config.data.source=jsonl",
                                             "--config.data.paths={files}/number.jsonl"],
                              "number.jsonl:1"),
    "jsonl_missing_field": ("main", RUN + ["--config.data.source=jsonl",
                                           "--config.data.paths={files}/no_text.jsonl"],
                            "no_text.jsonl:1"),
    "jsonl_not_utf8": ("main", RUN + ["--config.data.source=jsonl",
                                      "--config.data.paths={files}/latin1.jsonl"],
                       "latin1.jsonl:2 is not UTF-8"),
    "eval_fraction": ("main", RUN + ["--config.data.eval_fraction=1.5"], "data.eval_fraction"),
    "tokenizer_kind": ("main", RUN + ["--config.data.tokenizer=bpe"], "data.tokenizer"),
    "tokenizer_without_path": ("main", RUN + ["--config.data.tokenizer=hf"],
                               "data.tokenizer_path"),
    "tokenizer_path_missing": ("main", RUN + ["--config.data.tokenizer=hf",
                                              "--config.data.tokenizer_path={tmp}/no.json"],
                               "no.json"),
    "tokenizer_json_broken": ("main", RUN + ["--config.data.tokenizer=hf",
                                             "--config.data.tokenizer_path={files}/tok.json"],
                              "tok.json"),
    "sentencepiece_broken": ("main", RUN + ["--config.data.tokenizer=sentencepiece",
                                            "--config.data.tokenizer_path={files}/sp.model"],
                             "sp.model"),
    "max_documents": ("main", RUN + ["--config.data.max_documents=-1"], "data.max_documents"),
    # the workdir
    "workdir_is_a_file": ("main", ["--config={cfg}", "--workdir={files}/a_file"], "a_file"),
    "workdir_under_a_file": ("main", ["--config={cfg}", "--workdir={files}/a_file/run"], "a_file"),
    "workdir_locked": ("main", RUN, "is in use by process {pid}"),
    "resume_seq_len": ("main", RUN + ["--config.train.seq_len=64"], "train.seq_len=32"),
    "resume_seed": ("main", RUN + ["--config.train.seed=1"], "train.seed=0"),
    "resume_batch_size": ("main", RUN + ["--config.train.batch_size=16"], "train.batch_size=8"),
    "resume_data_key": ("main", RUN + ["--config.data.max_documents=20"], "data.max_documents=30"),
    "resume_tree": ("main", RUN + ["--config.model.embed_dim=64"], "model.embed_dim 32 -> 64"),
    "resume_corrupt_config_json": ("main", ["--config={cfg}", "--workdir={bad_run}"],
                                   "config.json is corrupt"),
    "resume_corrupt_metrics_line": ("main", ["--config={cfg}", "--workdir={bad_metrics}"],
                                    "metrics.jsonl:2 is not a JSON record"),
    # lcjax.sample
    "sample_no_workdir": ("sample", [], "--workdir is required"),
    "sample_temperature_negative": ("sample", ["--workdir={run}", "--temperature=-1"],
                                    "--temperature"),
    "sample_temperature_nan": ("sample", ["--workdir={run}", "--temperature=nan"],
                               "--temperature"),
    "sample_num_tokens": ("sample", ["--workdir={run}", "--num_tokens=0"], "--num_tokens"),
    "sample_unknown_flag": ("sample", ["--workdir={run}", "--temp=1"], "temp"),
    "sample_not_a_run": ("sample", ["--workdir={tmp}"], "config.json not found"),
    "sample_no_checkpoint": ("sample", ["--workdir={files}/config_only"], "no checkpoint yet"),
    "sample_corrupt_config": ("sample", ["--workdir={bad_run}"], "config.json is corrupt"),
    # scripts/fit.py
    "fit_no_config": ("fit", [], "--config is required"),
    "fit_memory_negative": ("fit", ["--config={cfg}", "--memory_gb=-1"], "--memory_gb"),
    "fit_memory_inf": ("fit", ["--config={cfg}", "--memory_gb=inf"], "--memory_gb"),
    "fit_granularity": ("fit", ["--config={cfg}", "--granularity=0"], "--granularity"),
    "fit_max_len": ("fit", ["--config={cfg}", "--max_len=0"], "--max_len"),
    "fit_max_below_granularity": ("fit", ["--config={cfg}", "--max_len=512"], "--max_len (512)"),
    "fit_remat": ("fit", ["--config={cfg}", "--remat=sometimes"], "--remat"),
    "fit_unknown_key": ("fit", ["--config={cfg}", "--config.model.layers=2"], "'model.layers'"),
    "fit_bad_value": ("fit", ["--config={cfg}", "--config.model.head_dim=63"], "model.head_dim"),
    "fit_unknown_target": ("fit", ["--config={cfg}", "--target=gpu:a100:8"], "gpu:a100:8"),
    "fit_missing_config": ("fit", ["--config={tmp}/nope.py"], "nope.py"),
}


def _write_files(files):
  files.mkdir()
  (files / "broken.py").write_text("def get_config(:\n")
  (files / "no_get.py").write_text("x = 1\n")
  (files / "raises.py").write_text("def get_config():\n  return 1 / 0\n")
  (files / "returns_dict.py").write_text("def get_config():\n  return {'train': {}}\n")
  (files / "typo.py").write_text(CONFIG_FILE.replace("return c", "c.train.stepz = 3\n  return c"))
  (files / "string_steps.py").write_text(CONFIG_FILE.replace("steps=2,", "steps='2',"))
  (files / "a.bin").write_bytes(bytes(range(256)) * 4)
  (files / "b.bin").write_bytes(b"\xff\xfe text that is not UTF-8 \x81")
  (files / "bad_json.jsonl").write_text('{"text": "fine"}\n{"text": \n')
  (files / "list.jsonl").write_text('["text", "in a list"]\n')
  (files / "number.jsonl").write_text('{"text": 42}\n')
  (files / "no_text.jsonl").write_text('{"body": "x"}\n')
  (files / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  (files / "tok.json").write_text('{"model": ')
  (files / "sp.model").write_bytes(b"not a sentencepiece model")
  (files / "a_file").write_text("a file, not a directory\n")
  (files / "config_only").mkdir()
  (files / "config_only" / "config.json").write_text(
      json.dumps(config_lib.validate(_tiny()).to_dict()))


def _tiny():
  from conftest import tiny_config
  return tiny_config()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """A tiny config file and a workdir trained with it (2 steps, a checkpoint), plus copies of
  that workdir with a corrupt config.json and a corrupt metrics line."""
  root = tmp_path_factory.mktemp("inventory")
  cfg = root / "tiny.py"
  cfg.write_text(CONFIG_FILE)
  run = root / "run"
  assert main_lib.main(["lcjax", f"--config={cfg}", f"--workdir={run}"]) == 0
  files = root / "files"
  _write_files(files)
  bad_run = root / "bad_run"
  shutil.copytree(run, bad_run)
  (bad_run / "config.json").write_text('{"train": ')
  bad_metrics = root / "bad_metrics"
  shutil.copytree(run, bad_metrics)
  lines = (bad_metrics / "metrics.jsonl").read_text().splitlines(keepends=True)
  (bad_metrics / "metrics.jsonl").write_text("".join([lines[0], "{not json\n"] + lines[1:]))
  return {"cfg": cfg, "run": run, "files": files, "bad_run": bad_run, "bad_metrics": bad_metrics}


def _hashes(*directories) -> dict:
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
          for d in directories for p in sorted(pathlib.Path(d).rglob("*"))
          if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line(name, trained, tmp_path, capsys):
  entry, args, needle = CASES[name]
  places = {**trained, "tmp": tmp_path}
  argv = [entry] + [a.format(**places) for a in args]
  before = _hashes(trained["run"], trained["files"], trained["bad_run"], trained["bad_metrics"])
  holder = None
  if name == "workdir_locked":  # another run holds the workdir: this process, here
    holder = os.open(trained["run"] / ".lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(holder, 0)
    os.write(holder, f"{os.getpid()}\n".encode())
  try:
    code = ENTRIES[entry]()(argv)
  finally:
    if holder is not None:
      os.close(holder)
  out = capsys.readouterr()
  text = out.out + out.err
  errors = [line for line in text.splitlines() if line.startswith("lcjax: error:")]
  assert code != 0, text[-2000:]
  assert len(errors) == 1, text[-2000:]
  assert needle.format(pid=os.getpid()) in errors[0], errors[0]
  assert "Traceback" not in text, text[-3000:]
  assert _hashes(trained["run"], trained["files"], trained["bad_run"],
                 trained["bad_metrics"]) == before


def test_the_inventory_is_large_and_documented():
  doc = (ROOT / "docs" / "reliability.md").read_text()
  assert len(CASES) >= 50
  missing = [name for name in CASES if f"`{name}`" not in doc]
  assert not missing, f"docs/reliability.md lacks {missing}"


def test_cli_run_reports_what_a_user_can_cause_and_keeps_bugs(capsys):
  """The workdir cases the inventory cannot stage as root (permissions) take the same path."""
  from lcjax import cli

  def raising(error):
    def body(argv):
      raise error
    return body

  assert cli.run(raising(PermissionError(13, "Permission denied", "/runs/x")), ["lcjax"]) == 1
  assert capsys.readouterr().err == "lcjax: error: /runs/x: Permission denied\n"
  assert cli.run(raising(KeyboardInterrupt()), ["lcjax"]) == 130
  assert capsys.readouterr().err == "lcjax: interrupted\n"
  assert cli.run(raising(cli.Stop("lcjax: stopped", 75)), ["lcjax"]) == 75
  with pytest.raises(TypeError):  # a bug keeps its traceback
    cli.run(raising(TypeError("bug")), ["lcjax"])
