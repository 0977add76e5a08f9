"""lcjax.plot: the lines it draws are the records' values (a hand-written metrics file with a
resume and DiPaCo paths, and a real tiny run resumed once), the PNGs are images, and bad input
is one `lcjax: error:` line."""
import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from conftest import tiny_config
from lcjax import plot

START = {"model/params": 1000, "model/tokens_per_step": 2048, "compile/step_bytes": 5 << 20,
         "compile/temp_bytes": 3 << 20, "compile/argument_bytes": 2 << 20,
         "compile/output_bytes": 2 << 20, "compile/alias_bytes": 2 << 20,
         "compile/host_argument_bytes": 0, "compile/host_temp_bytes": 0}


def _records():
  """A DiPaCo-style run of 2 paths resumed at step 20 with twice the tokens per step."""
  return [
      {"step": 0, **START},
      {"step": 10, "train/loss": 3.0, "train/loss/path0": 3.1, "train/loss/path1": 2.9,
       "train/tokens_per_s": 100.0, "outer/step": 1, "train/peak_memory_bytes": 7 << 20},
      {"step": 20, "train/loss": 2.5, "train/loss/path0": 2.6, "train/loss/path1": 2.4,
       "train/tokens_per_s": 110.0, "outer/step": 2, "train/peak_memory_bytes": 7 << 20},
      {"step": 20, "eval/loss": 2.7, "eval/loss/path0": 2.8, "eval/loss/path1": 2.6},
      {"step": 20, **START, "model/tokens_per_step": 4096, "compile/step_bytes": 6 << 20},
      {"step": 30, "train/loss": None, "train/loss/path0": 2.2, "train/tokens_per_s": 120.0,
       "outer/step": 3},  # a non-finite loss is written as null; path1 trained in another round
      {"step": 40, "train/loss": 2.0, "train/loss/path0": 2.1, "train/loss/path1": 1.9,
       "train/tokens_per_s": 130.0, "outer/step": 4, "train/peak_memory_bytes": 8 << 20},
      {"step": 40, "eval/loss": 2.2, "eval/loss/path0": 2.3, "eval/loss/path1": 2.1},
  ]


def _write(workdir, records, torn=""):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + torn)
  return workdir


def _lines(ax) -> dict:
  """{label: (x, y)} of the labelled lines of an axes."""
  return {line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata()))
          for line in ax.get_lines() if not line.get_label().startswith("_")}


def _expected(records, key):
  """{step: value} of the records that carry a number for key, read independently."""
  return {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}


def _tokens(step):  # 2048 tokens per step up to the resume at 20, 4096 after
  return 2048 * min(step, 20) + 4096 * max(step - 20, 0)


def _assert_png(path):
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_loss_lines_are_the_records():
  records = _records()
  by_step, by_tokens = plot.loss_figure(records).axes[:2]
  lines, token_lines = _lines(by_step), _lines(by_tokens)
  keys = ["train/loss", "eval/loss", "eval/loss/path0", "eval/loss/path1", "train/loss/path0",
          "train/loss/path1"]
  assert sorted(lines) == sorted(keys + ["resumed"])
  for key in keys:
    expected = _expected(records, key)
    np.testing.assert_array_equal(lines[key][0], list(expected))
    np.testing.assert_array_equal(lines[key][1], list(expected.values()))
    np.testing.assert_array_equal(token_lines[key][0], [_tokens(s) for s in expected])
    np.testing.assert_array_equal(token_lines[key][1], list(expected.values()))
  assert list(lines["train/loss"][0]) == [10, 20, 40]  # the null at step 30 is left out
  assert list(lines["train/loss/path1"][0]) == [10, 20, 40]
  assert list(lines["resumed"][0]) == [20, 20]  # a vertical line at the resume
  assert plot.resume_steps(records) == [20]
  outer = by_step.child_axes  # the outer steps on a top axis: 10 -> 1, 40 -> 4
  assert len(outer) == 1 and outer[0].get_xlabel() == "outer step"
  to_outer, to_step = plot.outer_step_axis(records)
  assert to_outer(np.array([10.0, 25.0, 40.0])).tolist() == [1.0, 2.5, 4.0]
  assert to_step(np.array([1.0, 2.5, 4.0])).tolist() == [10.0, 25.0, 40.0]


def test_throughput_and_memory_are_the_records():
  records = _records()
  lines = _lines(plot.throughput_figure(records).axes[0])
  np.testing.assert_array_equal(lines["train/tokens_per_s"][0], [10, 20, 30, 40])
  np.testing.assert_array_equal(lines["train/tokens_per_s"][1], [100, 110, 120, 130])
  bars, over_time = plot.memory_figure(records).axes[:2]
  # The latest start record's compiled figures, one bar each.
  widths = {label.get_text(): patch.get_width()
            for label, patch in zip(bars.get_yticklabels(), bars.patches)}
  assert widths == {k.removeprefix("compile/").removesuffix("_bytes"): v
                    for k, v in {**START, "compile/step_bytes": 6 << 20}.items()
                    if k.startswith("compile/")}
  lines = _lines(over_time)
  np.testing.assert_array_equal(lines["train/peak_memory_bytes"][0], [10, 20, 40])
  np.testing.assert_array_equal(lines["train/peak_memory_bytes"][1], [7 << 20, 7 << 20, 8 << 20])
  np.testing.assert_array_equal(lines["compile/step_bytes"][1], [6 << 20, 6 << 20])


def test_a_run_without_memory_figures_gets_no_memory_png(tmp_path):
  records = [{"step": 0, "model/tokens_per_step": 8}, {"step": 1, "train/loss": 1.0}]
  written = plot.plot_run(_write(tmp_path / "run", records))
  assert [p.name for p in written] == ["loss.png", "tokens_per_s.png"]


def test_cli_writes_pngs_beside_the_metrics(tmp_path, capsys):
  workdir = _write(tmp_path / "run", _records(), torn='{"step": 50, "train/lo')
  assert plot.main(["lcjax.plot", f"--workdir={workdir}"]) == 0
  printed = capsys.readouterr().out.split()
  names = ["loss.png", "tokens_per_s.png", "memory.png"]
  assert printed[-3:] == [str(workdir / n) for n in names]  # after the torn-line warning
  for name in names:
    _assert_png(workdir / name)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
  """A real tiny run of 4 steps, then resumed to 6."""
  from lcjax.train import train_and_evaluate
  workdir = tmp_path_factory.mktemp("plot") / "run"
  config = tiny_config()
  config.train.update(steps=4, eval_every=2, sample_prompt="")
  config.checkpoint.every = 2
  train_and_evaluate(config, workdir)
  config.train.steps = 6
  train_and_evaluate(config, workdir)
  return workdir


def test_a_real_resumed_run(resumed_run):
  records = [json.loads(line) for line in (resumed_run / "metrics.jsonl").read_text().splitlines()]
  assert plot.resume_steps(records) == [4]
  written = plot.plot_run(resumed_run)
  assert [p.name for p in written] == ["loss.png", "tokens_per_s.png", "memory.png"]
  for path in written:
    _assert_png(path)
  lines = _lines(plot.loss_figure(records).axes[0])
  for key in ("train/loss", "eval/loss"):
    expected = _expected(records, key)
    assert list(expected) == ([1, 2, 3, 4, 5, 6] if key == "train/loss" else [2, 4, 6])
    np.testing.assert_array_equal(lines[key][0], list(expected))
    np.testing.assert_array_equal(lines[key][1], list(expected.values()))
  assert not plot.loss_figure(records).axes[0].child_axes  # no outer loop, no outer-step axis
  tokens = _lines(plot.loss_figure(records).axes[1])["train/loss"][0]
  np.testing.assert_array_equal(tokens, np.arange(1, 7) * 8 * 32)  # batch 8 x seq_len 32


def _error_line(capsys, argv):
  assert plot.main(argv) == 1
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("lcjax: error: "), captured.err
  return lines[0]


def test_bad_inputs_are_one_line(tmp_path, capsys):
  assert "--workdir is required" in _error_line(capsys, ["lcjax.plot"])
  assert "no such directory" in _error_line(capsys, ["lcjax.plot", f"--workdir={tmp_path / 'x'}"])
  assert "metrics.jsonl not found" in _error_line(capsys, ["lcjax.plot", f"--workdir={tmp_path}"])
  dry = _write(tmp_path / "dry", [{"step": 0, "dry_run": True, **START}])
  assert "no train records" in _error_line(capsys, ["lcjax.plot", f"--workdir={dry}"])
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "metrics.jsonl").write_text('{"step": 0}\n{not json\n')
  assert "metrics.jsonl:2 is not a JSON record" in _error_line(
      capsys, ["lcjax.plot", f"--workdir={corrupt}"])
  assert "Unknown command line flag" in _error_line(
      capsys, ["lcjax.plot", f"--workdir={tmp_path}", "--nope=1"])
  assert not list(tmp_path.rglob("*.png"))


def test_module_entry_point_reports_one_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "lcjax.plot", f"--workdir={tmp_path / 'x'}"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
  assert result.stderr.startswith("lcjax: error: --workdir=")
