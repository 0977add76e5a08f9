"""lcjax.evaluate and lcjax.passkey: the loss by position adds up to the run's own eval/loss; the
passkey prompt holds its key at the requested depth; the scoring gives 1 to a model that knows the
key and 0 to one that does not; --hf reads a Hugging Face fixture; bad flags are one line."""
import json
import pathlib

import numpy as np
import pytest

from conftest import tiny_config
from lcjax import evaluate as evaluate_lib
from lcjax import passkey
from lcjax.data.tokenizers import ByteTokenizer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"


def test_bucket_edges():
  assert evaluate_lib.bucket_edges(32) == [0, 1, 2, 4, 8, 16, 32]
  assert evaluate_lib.bucket_edges(48) == [0, 1, 2, 4, 8, 16, 32, 48]


def test_loss_by_position_adds_up_to_the_runs_eval_loss(tmp_path, capsys):
  from lcjax.train import train_and_evaluate
  config = tiny_config()
  config.train.update(steps=3, eval_every=3, eval_batches=2)
  config.checkpoint.every = 3
  train_and_evaluate(config, tmp_path)
  record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if "eval/loss" in line][-1]
  assert evaluate_lib.main(["evaluate", f"--workdir={tmp_path}", "--passkey_lengths=260",
                            "--passkey_depths=0,1", "--passkey_trials=1"]) == 0
  results = json.loads((tmp_path / "evaluate.json").read_text())
  losses = results["loss_by_position"]
  assert losses["edges"] == [0, 1, 2, 4, 8, 16, 32]
  tokens = np.asarray(losses["tokens"])
  assert tokens.sum() == record["eval/tokens"] and (tokens > 0).all()
  # token-weighted mean of the buckets = the overall loss = what training measured
  weighted = sum(l * n for l, n in zip(losses["loss"], tokens)) / tokens.sum()
  assert weighted == pytest.approx(losses["overall"], rel=1e-12)
  assert losses["overall"] == pytest.approx(record["eval/loss"], rel=1e-6)
  keys = results["passkey"]
  assert keys["lengths"] == [260] and np.shape(keys["accuracy"]) == (1, 2)
  assert (tmp_path / "evaluate.png").stat().st_size > 0
  out = capsys.readouterr().out
  assert "held-out loss by position" in out and "passkey accuracy" in out


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_the_passkey_sits_at_the_requested_depth(depth):
  tokenizer = ByteTokenizer()
  ids, at = passkey.make_prompt(tokenizer, 2000, depth, 12345)
  text = tokenizer.decode(ids)
  assert abs(len(ids) - 2000) <= 25  # within one filler sentence
  assert tokenizer.decode(ids[at:]).startswith(passkey.needle(12345))
  assert text.startswith(passkey.INTRO) and text.endswith(passkey.QUESTION)
  filler = len(ids) - 1 - len(passkey.INTRO) - len(passkey.needle(12345)) - len(passkey.QUESTION)
  assert abs((at - 1 - len(passkey.INTRO)) / filler - depth) < 0.02


def test_a_model_that_knows_the_key_scores_one_and_a_guesser_zero():
  tokenizer = ByteTokenizer()

  def knows(prompts, num_tokens):
    assert num_tokens == passkey.NEW_TOKENS
    return [" " + tokenizer.decode(p).split("The pass key is ")[1][:5] + "." for p in prompts]

  right = passkey.evaluate(knows, tokenizer, [300, 600], [0, 0.5, 1], trials=3, seed=7)
  assert right["accuracy"] == [[1.0] * 3] * 2
  wrong = passkey.evaluate(lambda prompts, n: ["12"] * len(prompts), tokenizer, [300], [0.5])
  assert wrong["accuracy"] == [[0.0]]
  assert passkey.is_correct(" 48213. Remember", 48213)
  assert not passkey.is_correct(" 4821 3", 48213) and not passkey.is_correct("none", 48213)
  assert passkey.keys(7, 3) == passkey.keys(7, 3) and passkey.keys(7, 3) != passkey.keys(8, 3)


def test_a_hugging_face_directory(tmp_path):
  assert evaluate_lib.main(["evaluate", f"--hf={FIXTURES / 'qwen2'}", f"--out={tmp_path}",
                            "--seq_len=64", "--max_documents=12", "--eval_batches=1",
                            "--passkey_lengths=0"]) == 0
  losses = json.loads((tmp_path / "evaluate.json").read_text())["loss_by_position"]
  assert losses["edges"][-1] == 64 and losses["overall"] > 0


@pytest.mark.parametrize("argv, message", [
    ([], "give exactly one of --workdir=DIR"),
    (["--workdir=a", "--hf=b"], "give exactly one of --workdir=DIR"),
    (["--hf=/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
  assert evaluate_lib.main(["evaluate", *argv]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("lcjax: error:") and message in err and "\n" not in err
