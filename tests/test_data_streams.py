"""Streams for many processes: a process's rows equal those rows of the global batch; lazy
documents are tokenized once between the processes that share a batch; ArrayRecord gives the
text path's batches exactly; the prefetcher yields the direct batches and stops cleanly."""
import json
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import tiny_config
from lcjax import config as config_lib
from lcjax import data as data_lib
from lcjax.data import Prefetcher

REPO = pathlib.Path(__file__).resolve().parents[1]


def _corpus(tmp_path, n=400, seed=0):
  """n text files of 50-350 bytes of varied (multi-byte) text."""
  rng = np.random.default_rng(seed)
  words = ["def", "return", "λx", "naïve", "class", "import", "∑", "yield", "0x1f", "\n"]
  root = tmp_path / "corpus"
  root.mkdir()
  for i in range(n):
    text = " ".join(rng.choice(words, rng.integers(10, 60)))
    (root / f"doc{i:04d}.txt").write_text(f"# {i}\n{text}\n")
  return root


def _config(**overrides):
  c = config_lib.base_config().data
  c.update(overrides)
  return c


def _equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for f in a:
    np.testing.assert_array_equal(a[f], b[f], err_msg=f)


def _concat(parts):
  return {f: np.concatenate([p[f] for p in parts]) for f in parts[0]}


def test_rows_of_a_process_equal_those_rows_of_the_global_batch(tmp_path):
  c = _config(source="text", paths=str(_corpus(tmp_path) / "*.txt"), eval_fraction=0.3)
  ds = data_lib.build(c, 64, seed=1)
  ds.layout = np.random.default_rng(0).permutation(64)  # sequence parallel: stored order
  B = 8
  for step in (0, 1, 7, ds.train.num_sequences // B + 3):  # the last: a later epoch
    full = ds.train_batch(step * B, B)
    assert full["inputs"].shape == (B, 64)
    _equal(_concat([ds.train_batch(step * B, B, range(0, 3)),
                    ds.train_batch(step * B, B, range(3, 8))]), full)
    _equal(ds.train_batch(step * B, B, slice(2, 8, 3)), {f: v[2::3] for f, v in full.items()})
  full_eval = list(ds.eval_batches(B, 0))
  # the last batch is padded with empty rows: every held-out target is scored once
  assert sum(int(b["loss_mask"].sum()) for b in full_eval) == ds.eval.num_pairs
  halves = zip(ds.eval_batches(B, 0, range(0, 4)), ds.eval_batches(B, 0, slice(4, None)))
  for full, (low, high) in zip(full_eval, halves, strict=True):
    _equal(_concat([low, high]), full)
  with pytest.raises(ValueError, match="leave the batch of 8 rows"):
    ds.train_batch(0, B, range(4, 9))


def test_two_processes_with_half_the_rows_each_tokenize_about_one_copy(tmp_path):
  c = _config(source="text", paths=str(_corpus(tmp_path) / "*.txt"), eval_fraction=0.1)
  T, B = 2048, 4
  one, low, high = (data_lib.build(c, T, seed=2) for _ in range(3))
  assert one.stats()["data/documents_loaded"] == 0  # the bytes tokenizer's lengths need no tokens
  steps = -(-one.train.num_sequences // B)  # one epoch
  for step in range(steps):
    one.train_batch(step * B, B)
    low.train_batch(step * B, B, range(0, B // 2))
    high.train_batch(step * B, B, range(B // 2, B))
  docs = len(one.train.documents)
  assert one.stats()["data/documents_loaded"] == docs  # each document once
  both = low.stats()["data/documents_loaded"] + high.stats()["data/documents_loaded"]
  # only documents cut between a sequence of one process and one of the other are read twice
  assert docs <= both < 1.15 * docs
  read_bytes = low.stats()["data/bytes_loaded"] + high.stats()["data/bytes_loaded"]
  assert read_bytes < 1.15 * one.stats()["data/bytes_loaded"]


def test_dipaco_path_batches_give_rows_too():
  from lcjax.outer import routing
  c = tiny_config()
  c.mesh.update(replica=4, data=2, fsdp=1)
  c.outer.update(kind="dipaco", modules="4", inner_steps=2)
  paths = routing.build(config_lib.validate(c), 32, 0)
  for step in (0, 3):
    full = paths.train_batch(step * 8, 8)
    _equal(_concat([paths.train_batch(step * 8, 8, range(0, 3)),
                    paths.train_batch(step * 8, 8, range(3, 8))]), full)
  assert paths.stats()["data/documents_loaded"] > 0


def _prepare(input_glob, output, *flags):
  done = subprocess.run([sys.executable, str(REPO / "scripts/prepare_data.py"),
                         f"--input={input_glob}", f"--output={output}", *flags],
                        capture_output=True, text=True, cwd=REPO,
                        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads((pathlib.Path(output) / "index.json").read_text())


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_arrayrecord_gives_exactly_the_batches_of_the_text(tmp_path, kind):
  corpus = _corpus(tmp_path, n=150)
  if kind == "jsonl":
    lines = [json.dumps({"body": p.read_text()}) for p in sorted(corpus.glob("*.txt"))]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    text = _config(source="jsonl", paths=str(tmp_path / "corpus.jsonl"), text_field="body",
                   eval_fraction=0.2, eval_skip_prefix=3)
    flags = ["--text_field=body", "--eval_fraction=0.2", "--docs_per_shard=40"]
  else:
    text = _config(source="text", paths=str(corpus / "*.txt"), eval_fraction=0.2,
                   eval_skip_prefix=3)
    flags = ["--eval_fraction=0.2", "--docs_per_shard=40"]
  index = _prepare(text.paths, tmp_path / "ar", *flags)
  assert len(index["splits"]["train"]["shards"]) > 1 and index["tokenizer"]["kind"] == "bytes"
  stored = _config(source="arrayrecord", paths=str(tmp_path / "ar"), eval_skip_prefix=3)
  a, b = data_lib.build(text, 48, seed=4), data_lib.build(stored, 48, seed=4)
  assert index["splits"]["train"]["documents"] == len(a.train.documents)
  for step in (0, 2, a.train.num_sequences // 4 + 1):
    _equal(a.train_batch(step * 4, 4), b.train_batch(step * 4, 4))
    _equal(a.train_batch(step * 4, 4, range(1, 3)), b.train_batch(step * 4, 4, range(1, 3)))
  for x, y in zip(a.eval_batches(4, 0), b.eval_batches(4, 0), strict=True):
    _equal(x, y)
  assert a.unigram_entropy() == b.unigram_entropy()
  assert b.stats()["data/documents_loaded"] > 0


def test_arrayrecord_refuses_a_missing_index_and_another_tokenizer(tmp_path):
  _prepare(str(_corpus(tmp_path, n=30) / "*.txt"), tmp_path / "ar", "--eval_fraction=0.3")
  with pytest.raises(ValueError, match="has no index.json"):
    data_lib.build(_config(source="arrayrecord", paths=str(tmp_path)), 16, 0)
  index_path = tmp_path / "ar" / "index.json"
  index = json.loads(index_path.read_text())
  index["tokenizer"]["vocab_size"] = 1000
  index_path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match="was tokenized by"):
    data_lib.build(_config(source="arrayrecord", paths=str(tmp_path / "ar")), 16, 0)
  with pytest.raises(ValueError, match="data.eval_paths does not apply"):
    c = config_lib.base_config()
    c.data.update(source="arrayrecord", paths=str(tmp_path / "ar"), eval_paths="x")
    config_lib.validate(c)
  with pytest.raises(ValueError, match="data.dedupe does not apply.*--dedupe"):
    c = config_lib.base_config()
    c.data.update(source="arrayrecord", paths=str(tmp_path / "ar"), dedupe=True)
    config_lib.validate(c)


def _batches(depth, stop=7, make=None):
  make = make or (lambda s: {"inputs": np.full((2, 3), s)})
  with Prefetcher(make, 2, stop, depth=depth) as batches:
    return [(s, b["inputs"].copy()) for s, b in batches]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_yields_the_direct_batches_in_order(tmp_path, depth):
  ds = data_lib.build(_config(max_documents=20), 32, seed=0)
  with Prefetcher(lambda s: ds.train_batch(s * 4, 4, range(1, 3)), 5, 12, depth=depth) as got:
    for step, batch in got:
      _equal(batch, ds.train_batch(step * 4, 4, range(1, 3)))
  assert [s for s, _ in _batches(depth)] == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetcher_raises_the_threads_error_at_its_step_and_stops(depth):
  def make(step):
    if step == 4:
      raise KeyError("no batch 4")
    return {"inputs": np.zeros(1)}

  got = []
  with pytest.raises(KeyError, match="no batch 4"):
    with Prefetcher(make, 2, 10, depth=depth) as batches:
      for step, _ in batches:
        got.append(step)
  assert got == [2, 3]


def test_prefetcher_stops_at_an_early_exit_without_hanging():
  made = []

  def make(step):
    made.append(step)
    return {"inputs": np.zeros(1)}

  before = threading.active_count()
  started = time.perf_counter()
  with Prefetcher(make, 0, 10**9, depth=2) as batches:
    for step, _ in batches:
      if step == 3:
        break  # the producer is blocked on a full queue
  assert time.perf_counter() - started < 5
  assert threading.active_count() == before and len(made) <= 3 + 2 + 2


def test_prefetcher_measures_the_consumers_wait():
  def slow(step):
    time.sleep(0.1)
    return {"inputs": np.zeros(1)}

  with Prefetcher(slow, 0, 4, depth=0) as direct:
    list(direct)
  assert direct.wait_s >= 0.4 and direct.take_wait_s() >= 0.4 and direct.take_wait_s() == 0
  with Prefetcher(slow, 0, 4, depth=4) as ahead:
    time.sleep(1.0)  # the device's step: the batches are ready when asked for
    list(ahead)
  assert ahead.wait_s < direct.wait_s / 4
  with pytest.raises(ValueError, match="data.prefetch"):
    Prefetcher(slow, 0, 4, depth=-1)
