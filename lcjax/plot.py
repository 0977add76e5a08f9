"""Plots of a run's metrics: `python -m lcjax.plot --workdir=DIR`.

Reads DIR/metrics.jsonl (metrics.read_records: a torn last line is dropped, as training does)
and writes beside it loss.png (train and eval loss against steps and against tokens; DiPaCo:
one line per path), tokens_per_s.png and memory.png (the start record's compiled memory per
device, and the peak memory in use where the backend reports it). A resumed run's restarts are
dotted vertical lines; DiLoCo/DiPaCo runs get their outer steps on a second axis.

Figures are built with matplotlib's object API (no pyplot), so importing this module never
changes the backend of a notebook that displays them.
"""
import dataclasses
import math
import pathlib
import re
import sys

import numpy as np
from absl import flags
from matplotlib import ticker
from matplotlib.figure import Figure

from lcjax import cli
from lcjax import metrics as metrics_lib

_PATH_KEY = re.compile(r"^(train|eval)/loss/path(\d+)$")
_COMPILED = ("compile/argument_bytes", "compile/temp_bytes", "compile/output_bytes",
             "compile/alias_bytes", "compile/host_argument_bytes", "compile/host_temp_bytes",
             "compile/step_bytes")


@dataclasses.dataclass(frozen=True)
class Series:
  """One plotted line: steps, values, and tokens seen by each step (None without a start
  record)."""
  steps: np.ndarray
  values: np.ndarray
  tokens: np.ndarray | None


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def start_records(records) -> list[dict]:
  """The start records of the run (one per start or resume), dry runs left out."""
  return [r for r in records if "model/tokens_per_step" in r and not r.get("dry_run")]


def resume_steps(records) -> list[int]:
  """The steps at which the run was resumed: those of its start records after the first."""
  return [r["step"] for r in start_records(records)[1:]]


def tokens_at(records, steps) -> np.ndarray | None:
  """Tokens trained on by each of `steps`: piecewise, each start record's model/tokens_per_step
  from its step on (a resume may change the batch). None if no start record says it."""
  starts = sorted((r["step"], r["model/tokens_per_step"]) for r in start_records(records))
  if not starts:
    return None
  tokens = []
  for step in steps:
    total, prev_step, prev_rate = 0, 0, starts[0][1]  # steps count from 0
    for start_step, rate in starts[1:]:
      if start_step > step:
        break
      total += (start_step - prev_step) * prev_rate
      prev_step, prev_rate = start_step, rate
    tokens.append(total + (step - prev_step) * prev_rate)
  return np.asarray(tokens, np.int64)


def series(records, key) -> Series | None:
  """`key`'s finite values by step (a later record of the same step wins); None if it has
  none."""
  by_step = {r["step"]: r[key] for r in records if _number(r.get(key))}
  if not by_step:
    return None
  steps = np.array(sorted(by_step), np.int64)
  return Series(steps, np.array([by_step[s] for s in steps], np.float64), tokens_at(records, steps))


def loss_keys(records) -> list[str]:
  """train/loss, eval/loss, then the per-path losses: train ones, eval ones, in path order."""
  def order(key):
    kind, path = _PATH_KEY.match(key).groups()
    return kind != "train", int(path)

  return ["train/loss", "eval/loss"] + sorted({k for r in records for k in r if _PATH_KEY.match(k)},
                                              key=order)


_BINARY = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1))


def _binary_bytes(value, _=None) -> str:
  unit, size = next(((u, s) for u, s in _BINARY if abs(value) >= s), _BINARY[-1])
  return f"{value / size:g} {unit}"


class _BinaryLocator(ticker.MaxNLocator):
  """Ticks at round numbers of KiB, MiB or GiB (not at round numbers of bytes)."""

  def tick_values(self, vmin, vmax):
    size = next((s for _, s in _BINARY if max(abs(vmin), abs(vmax)) >= s), 1)
    return super().tick_values(vmin / size, vmax / size) * size


def _bytes_axis(axis):
  axis.set_major_locator(_BinaryLocator(nbins=5))
  axis.set_major_formatter(ticker.FuncFormatter(_binary_bytes))


def _style(key):
  kind, path = key.split("/")[0], _PATH_KEY.match(key)
  if path:
    return {"linewidth": 0.8, "alpha": 0.7, "linestyle": "-" if kind == "train" else "--",
            "marker": None if kind == "train" else "."}
  return {"linewidth": 1.8, "marker": None if kind == "train" else "o"}


def _legend(ax):
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize="small")


def _mark_resumes(ax, steps):
  for i, step in enumerate(steps):
    ax.axvline(step, color="grey", linestyle=":", linewidth=1, label="resumed" if i == 0 else None)


def outer_step_axis(records):
  """(step -> outer step, outer step -> step), interpolated from the records that carry
  outer/step (DiLoCo, DiPaCo); None without an outer loop."""
  outer = series(records, "outer/step")
  if outer is None or len(outer.steps) < 2:
    return None
  steps, outer_steps = outer.steps.astype(float), outer.values
  return (lambda x: np.interp(x, steps, outer_steps), lambda y: np.interp(y, outer_steps, steps))


def _outer_axis(ax, records):
  functions = outer_step_axis(records)
  if functions is not None:
    ax.secondary_xaxis("top", functions=functions).set_xlabel("outer step")


def loss_figure(records) -> Figure:
  """Loss against steps (left) and tokens (right)."""
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  by_step, by_tokens = fig.subplots(1, 2)
  for key in loss_keys(records):
    s = series(records, key)
    if s is None:
      continue
    by_step.plot(s.steps, s.values, label=key, **_style(key))
    if s.tokens is not None:
      by_tokens.plot(s.tokens, s.values, label=key, **_style(key))
  _mark_resumes(by_step, resume_steps(records))
  _outer_axis(by_step, records)
  by_step.set_xlabel("step")
  by_tokens.set_xlabel("tokens")
  by_tokens.xaxis.set_major_formatter(ticker.EngFormatter())
  for ax in (by_step, by_tokens):
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
  _legend(by_step)
  if not by_tokens.lines:
    by_tokens.text(0.5, 0.5, "no start record: tokens per step unknown", ha="center",
                   transform=by_tokens.transAxes)
  return fig


def throughput_figure(records) -> Figure:
  fig = Figure(figsize=(6, 4), layout="constrained")
  ax = fig.subplots()
  s = series(records, "train/tokens_per_s")
  if s is not None:
    ax.plot(s.steps, s.values, marker=".", label="train/tokens_per_s")
  _mark_resumes(ax, resume_steps(records))
  ax.set_xlabel("step")
  ax.set_ylabel("tokens/s (whole mesh)")
  ax.yaxis.set_major_formatter(ticker.EngFormatter())
  ax.grid(alpha=0.3)
  _legend(ax)
  return fig


def compiled_memory(records) -> dict:
  """The compile/* figures (bytes per device) of the latest start record."""
  starts = start_records(records)
  return {k: starts[-1][k] for k in _COMPILED if starts and _number(starts[-1].get(k))}


def memory_figure(records) -> Figure | None:
  """Compiled memory per device (bars) and the peak in use over steps; None if the run has
  neither."""
  compiled, peak = compiled_memory(records), series(records, "train/peak_memory_bytes")
  if not compiled and peak is None:
    return None
  fig = Figure(figsize=(12, 4), layout="constrained")
  bars, over_time = fig.subplots(1, 2)
  names = [k.removeprefix("compile/").removesuffix("_bytes") for k in compiled]
  bars.barh(names, list(compiled.values()))
  _bytes_axis(bars.xaxis)
  bars.set_title("compiled train step, per device (memory_analysis)", fontsize="medium")
  bars.invert_yaxis()
  if peak is not None:
    over_time.plot(peak.steps, peak.values, marker=".", label="train/peak_memory_bytes")
  if "compile/step_bytes" in compiled:
    over_time.axhline(compiled["compile/step_bytes"], color="C1", linestyle="--",
                      label="compile/step_bytes")
  _mark_resumes(over_time, resume_steps(records))
  if peak is None:
    over_time.text(0.5, 0.6, "this backend reports no memory in use\n(the CPU has no "
                   "memory_stats)", ha="center", transform=over_time.transAxes)
    trained = series(records, "train/loss")
    if trained is not None and trained.steps[-1] > 0:
      over_time.set_xlim(0, trained.steps[-1])
  _bytes_axis(over_time.yaxis)
  over_time.set_xlabel("step")
  over_time.set_title("peak memory in use, largest over devices", fontsize="medium")
  over_time.grid(alpha=0.3)
  _legend(over_time)
  return fig


def figures(records) -> dict[str, Figure]:
  """{file name: figure} of the records; ValueError if they hold no train record."""
  if series(records, "train/loss") is None and not any(
      _PATH_KEY.match(k) and k.startswith("train/") for r in records for k in r):
    raise ValueError("no train records (train/loss) yet")
  built = {"loss.png": loss_figure(records), "tokens_per_s.png": throughput_figure(records),
           "memory.png": memory_figure(records)}
  return {name: fig for name, fig in built.items() if fig is not None}


def read_run(workdir) -> list[dict]:
  """The records of DIR/metrics.jsonl; ValueError in one line if there are none to plot."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise ValueError(f"--workdir={workdir}: no such directory; give the workdir of a training run")
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    raise ValueError(f"{path} not found; train first (python -m lcjax.main --config=... "
                     f"--workdir={workdir})")
  return metrics_lib.read_records(path)


def plot_run(workdir, out_dir=None) -> list[pathlib.Path]:
  """Writes the PNGs of DIR's metrics into out_dir (default DIR); returns their paths."""
  records = read_run(workdir)
  try:
    built = figures(records)
  except ValueError as e:
    raise ValueError(f"{pathlib.Path(workdir) / 'metrics.jsonl'} has {e}; plot after the first "
                     "train.log_every steps") from None
  out_dir = pathlib.Path(out_dir or workdir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for name, fig in built.items():
    fig.savefig(out_dir / name, dpi=100)
    written.append(out_dir / name)
  return written


def _main(argv):
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "directory of a training run (holds metrics.jsonl)",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "directory for the PNGs; default: the workdir", flag_values=fv)
  cli.parse_flags(fv, argv, required=("workdir",), doc=__doc__)
  for path in plot_run(fv.workdir, fv.out):
    print(path)


def main(argv=None) -> int:
  return cli.run(_main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
