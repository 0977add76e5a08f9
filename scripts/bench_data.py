"""Host-side cost of the data pipeline (docs/scaling.md): start-up to the first batch, the time
to build a batch, peak memory (RSS), and what prefetching leaves of the wait. One process per
measurement, so its peak RSS is the pipeline's:

  python scripts/bench_data.py --make_corpus=/tmp/corpus --copies=100   # stdlib x100 into files
  python scripts/bench_data.py --paths='/tmp/corpus/**/*.py' --seq_len=256 --batch_size=8
  python scripts/bench_data.py --seq_len=131072 --batch_size=8 --rows=0:4 --steps=3
  python scripts/bench_data.py --seq_len=256 --batch_size=8 --device_step_s=0.5 --prefetch=2

Prints one JSON line. --paths='' reads the default corpus (the standard library); a directory
from scripts/prepare_data.py is read with --source=arrayrecord.
"""
import json
import os
import pathlib
import resource
import shutil
import statistics
import sys
import time

from absl import app, flags

_MAKE = flags.DEFINE_string("make_corpus", "", "write the stdlib sources --copies times here")
_COPIES = flags.DEFINE_integer("copies", 10, "copies of the stdlib sources for --make_corpus")
_SOURCE = flags.DEFINE_string("source", "", "data.source (default: text with --paths, else stdlib)")
_PATHS = flags.DEFINE_string("paths", "", "data.paths")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
_BATCH = flags.DEFINE_integer("batch_size", 8, "global sequences per step")
_ROWS = flags.DEFINE_string("rows", "", "this process's rows 'a:b' ('' = all)")
_STEPS = flags.DEFINE_integer("steps", 20, "steps timed after the first batch")
_DEVICE_STEP = flags.DEFINE_float("device_step_s", 0.0, "with --prefetch: the device's step, "
                                  "simulated by sleeping (0 = time batches only)")
_PREFETCH = flags.DEFINE_integer("prefetch", 0, "prefetch depth (0 = batches built in the loop)")


def make_corpus(root: pathlib.Path, copies: int):
  """copies x the standard library's .py files, one directory per copy."""
  from lcjax.data.sources import stdlib_files
  files = stdlib_files()
  for c in range(copies):
    for key, path in files:
      dst = root / f"copy{c:03d}" / key
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(path, dst)
  size = sum(p.stat().st_size for p in root.rglob("*.py"))
  print(json.dumps({"corpus": str(root), "files": copies * len(files), "bytes": size}))


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure() -> dict:
  from lcjax import config as config_lib
  from lcjax import data as data_lib
  c = config_lib.base_config().data
  c.source = _SOURCE.value or ("text" if _PATHS.value else "stdlib")
  c.paths = _PATHS.value
  B, rows = _BATCH.value, None
  if _ROWS.value:
    lo, hi = (int(x) for x in _ROWS.value.split(":"))
    rows = range(lo, hi)

  def batch(step):  # the old loader (before rows) is measured with rows=''
    args = (step * B, B) if rows is None else (step * B, B, rows)
    return datasets.train_batch(*args)

  rss_before = _peak_rss_mb()
  started = time.perf_counter()
  datasets = data_lib.build(c, _SEQ_LEN.value, seed=0)
  built = time.perf_counter()
  batch(0)
  first = time.perf_counter()
  record = {"source": c.source, "paths": c.paths, "seq_len": _SEQ_LEN.value, "batch_size": B,
            "rows": _ROWS.value or "all", "train_documents": len(getattr(
                datasets.train, "documents", getattr(datasets.train, "_pairs", []))),
            "train_tokens": datasets.train.num_pairs, "build_s": built - started,
            "first_batch_s": first - built, "startup_s": first - started}
  if _DEVICE_STEP.value:
    with data_lib.Prefetcher(batch, 1, 1 + _STEPS.value, depth=_PREFETCH.value) as batches:
      waits = []
      for _ in batches:
        waits.append(batches.take_wait_s())
        time.sleep(_DEVICE_STEP.value)  # the device computing the step
    record.update(prefetch=_PREFETCH.value, device_step_s=_DEVICE_STEP.value,
                  wait_s_median=statistics.median(waits), wait_s_max=max(waits))
  else:
    times = []
    for step in range(1, 1 + _STEPS.value):
      t0 = time.perf_counter()
      batch(step)
      times.append(time.perf_counter() - t0)
    record.update(batch_s_median=statistics.median(times), batch_s_max=max(times))
  record.update(peak_rss_mb=_peak_rss_mb(), rss_before_build_mb=rss_before)
  if hasattr(datasets, "stats"):
    record.update(datasets.stats())
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MAKE.value:
    make_corpus(pathlib.Path(_MAKE.value), _COPIES.value)
    return
  print(json.dumps({**measure(), "python": sys.version.split()[0], "cpus": os.cpu_count()}))


if __name__ == "__main__":
  app.run(main)
