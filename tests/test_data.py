"""Data: packing round-trips documents, positions/segments restart per document, no loss on
padding, determinism, random access resume, tokenizers, sources and their errors."""
import json

import numpy as np
import pytest
from ml_collections import ConfigDict

from lcjax import config as config_lib
from lcjax import data as data_lib
from lcjax.data.packing import PackedSequences
from lcjax.data.sources import load_documents, stdlib_files
from lcjax.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer

BOS, EOS, PAD = 257, 258, 256


def _docs(n=7, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, rng.integers(1, 40)).astype(np.int32) for _ in range(n)]


def _pack(docs, T=16, shuffle=False, seed=0):
  return PackedSequences(docs, T, bos_id=BOS, eos_id=EOS, pad_id=PAD, seed=seed, shuffle=shuffle)


def _pieces(packed, epoch=0):
  """Reassembles the (input, target) pairs of each segment of each sequence of an epoch."""
  pieces = []
  for k in range(packed.num_sequences):
    s = packed.sequence(epoch * packed.num_sequences + k)
    for seg in range(1, s["segment_ids"].max() + 1):
      idx = np.nonzero(s["segment_ids"] == seg)[0]
      assert np.all(np.diff(idx) == 1), "a segment is contiguous"
      np.testing.assert_array_equal(s["positions"][idx], np.arange(len(idx)))
      pieces.append((s["inputs"][idx], s["targets"][idx]))
  return pieces


def test_packing_round_trips_documents_in_order():
  docs = _docs()
  packed = _pack(docs)
  inputs = np.concatenate([p[0] for p in _pieces(packed)])
  targets = np.concatenate([p[1] for p in _pieces(packed)])
  stream = np.concatenate([np.concatenate([[BOS], d, [EOS]]) for d in docs])
  # inputs are every token but each document's EOS, targets every token but its BOS
  np.testing.assert_array_equal(inputs, stream[stream != EOS])
  np.testing.assert_array_equal(targets, stream[stream != BOS])
  assert packed.num_pairs == sum(len(d) + 1 for d in docs)


def test_padding_only_at_epoch_end_and_never_in_the_loss():
  packed = _pack(_docs(), T=16)
  for k in range(packed.num_sequences):
    s = packed.sequence(k)
    pad = s["segment_ids"] == 0
    np.testing.assert_array_equal(s["loss_mask"], (~pad).astype(np.int32))
    if k < packed.num_sequences - 1:
      assert not pad.any()
  last = packed.sequence(packed.num_sequences - 1)
  assert (last["segment_ids"] == 0).sum() == packed.num_sequences * 16 - packed.num_pairs


def test_shuffled_epochs_cover_everything_and_differ():
  docs = _docs(12)
  packed = _pack(docs, shuffle=True, seed=3)
  total = sum(len(d) + 1 for d in docs)
  e0, e1 = _pieces(packed, 0), _pieces(packed, 1)
  assert sum(len(p[0]) for p in e0) == sum(len(p[0]) for p in e1) == total
  assert [p[0].tolist() for p in e0] != [p[0].tolist() for p in e1]


def test_determinism_and_random_access_resume():
  docs = _docs(20)
  a, b = _pack(docs, shuffle=True, seed=5), _pack(docs, shuffle=True, seed=5)
  straight = [a.batch(i * 3, 3) for i in range(8)]
  resumed = [b.batch(i * 3, 3) for i in range(5, 8)]  # a fresh iterator starting at step 5
  for x, y in zip(straight[5:], resumed):
    for f in x:
      np.testing.assert_array_equal(x[f], y[f])
  other = _pack(docs, shuffle=True, seed=6).batch(0, 3)
  assert not np.array_equal(other["inputs"], straight[0]["inputs"])


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  text = "héllo, wörld — ∑ 🙂"
  ids = tok.encode(text)
  assert ids.max() < 256 and tok.decode(ids) == text
  assert {tok.pad_id, tok.bos_id, tok.eos_id} == {PAD, BOS, EOS} and tok.vocab_size == 259


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"])
  tok.train_from_iterator(["def f(x): return x + 1", "class A: pass"] * 20, trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  loaded = HFTokenizer(str(path))
  ids = loaded.encode("def f(x): return x")
  assert ids.dtype == np.int32 and len(ids) > 0
  assert loaded.decode(ids).replace(" ", "") == "deff(x):returnx"
  assert loaded.bos_id == tok.token_to_id("<s>") and loaded.eos_id == tok.token_to_id("</s>")


def test_sentencepiece_model(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(f"def function_{i}(x): return x * {i}" for i in range(200)))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=60, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
  tok = SentencePieceTokenizer(str(tmp_path / "sp.model"))
  assert tok.decode(tok.encode("def function_3(x)")) == "def function_3(x)"
  assert (tok.bos_id, tok.eos_id) == (1, 2)


def _data_config(**overrides):
  c = config_lib.base_config().data
  c.update(overrides)
  return c


def test_stdlib_corpus_excludes_tests_and_site_packages():
  files = stdlib_files()
  assert len(files) > 100
  assert not any("site-packages" in k or k.startswith("test/") for k, _ in files)


def test_text_and_jsonl_sources_and_split(tmp_path):
  for i in range(40):
    (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n")
  train, held = load_documents(_data_config(source="text", paths=str(tmp_path / "*.txt"),
                                            eval_fraction=0.25))
  assert len(train) + len(held) == 40 and held and train
  again, _ = load_documents(_data_config(source="text", paths=str(tmp_path / "*.txt"),
                                         eval_fraction=0.25))
  assert again == train
  lines = [json.dumps({"body": f"row {i}"}) for i in range(30)]
  (tmp_path / "a.jsonl").write_text("\n".join(lines))
  train, held = load_documents(_data_config(source="jsonl", paths=str(tmp_path / "a.jsonl"),
                                            text_field="body", eval_fraction=0.3))
  assert sorted(train + held) == sorted(f"row {i}" for i in range(30))


def test_dedupe_keeps_one_copy_of_each_text_and_none_held_out(tmp_path, capsys):
  """40 distinct files and 3 texts copied 10 times each (licence files do this): with dedupe
  every text is in the corpus once, in the split of its first file, so no held-out document is
  a copy of a train one; without it every copy is there."""
  for i in range(40):
    (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}\n")
  for i in range(30):
    (tmp_path / f"copy{i:02d}.txt").write_text(f"licence {i % 3}\n")
  config = _data_config(source="text", paths=str(tmp_path / "*.txt"), eval_fraction=0.3)
  train, held = load_documents(config)
  assert len(train) + len(held) == 70
  assert set(train) & set(held)  # the split is by file: copies land on both sides
  config.dedupe = True
  train, held = load_documents(config)
  assert sorted(train + held) == sorted({f"document {i}\n" for i in range(40)} |
                                        {f"licence {i}\n" for i in range(3)})
  assert not set(train) & set(held)
  assert "dropped 27 exact copies" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (dict(source="text", paths="/nonexistent/*.txt"), "matches no file"),
    (dict(source="jsonl", paths="JSONL", text_field="missing"), "has no field 'missing'"),
    (dict(source="text", paths="EMPTY"), "no non-empty training document"),
    (dict(tokenizer="hf", tokenizer_path="/nonexistent/tokenizer.json"), "is not a file"),
])
def test_bad_data_configs_raise_clear_errors(tmp_path, overrides, message):
  (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
  (tmp_path / "empty.txt").write_text("")
  subst = {"JSONL": str(tmp_path / "a.jsonl"), "EMPTY": str(tmp_path / "empty.txt")}
  overrides = {k: subst.get(v, v) for k, v in overrides.items()}
  with pytest.raises(ValueError, match=message):
    data_lib.build(_data_config(**overrides), 16, 0)


def test_default_corpus_is_real_and_unigram_entropy_is_sane():
  c = _data_config(max_documents=40)
  ds = data_lib.build(c, 64, 0)
  h = ds.unigram_entropy()
  assert 2.0 < h < np.log(256)  # source code: far from uniform over bytes
  batches = list(ds.eval_batches(4, 0))
  assert sum(int(b["loss_mask"].sum()) for b in batches) == ds.eval.num_pairs
