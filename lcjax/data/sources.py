"""Where documents come from: the standard library's sources (default), text files, JSONL.

Splits into train and held-out eval by a hash of each file's path (or of each JSONL document),
so the split is the same on every machine and for every mesh.
"""
import glob
import json
import os
import pathlib
import sysconfig
import zlib

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> list[tuple[str, str]]:
  """(key, path) of the running interpreter's standard-library .py files, tests excluded."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if not _SKIP_DIRS.intersection(rel.parts[:-1]):
      files.append((rel.as_posix(), str(path)))
  return sorted(files)


def _glob_files(patterns: str, key: str) -> list[tuple[str, str]]:
  files = []
  for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
    matches = sorted(m for m in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(m))
    if not matches:
      raise ValueError(f"{key}: the glob {pattern!r} matches no file; fix the path")
    files.extend((m, m) for m in matches)
  return files


def _held_out(key: str, fraction: float) -> bool:
  return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


def _read_text(path) -> str | None:
  """The file's text, or None for a binary (a NUL byte) or non-UTF-8 file."""
  with open(path, "rb") as f:
    data = f.read()
  if b"\0" in data:
    return None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return None


def _jsonl_documents(files, field):
  for _, path in files:
    with open(path, "rb") as f:
      for line_no, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(f"{path}:{line_no} is not UTF-8 text (byte {e.start}); re-encode the "
                           "file as UTF-8 or remove the line") from None
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_no} is not valid JSON ({e.msg}); fix or remove the "
                           "line") from None
        if not isinstance(record, dict):
          raise ValueError(f"{path}:{line_no} is a JSON {type(record).__name__}, not an object "
                           f"with a {field!r} field; fix or remove the line")
        if field not in record:
          raise ValueError(f"{path}:{line_no} has no field {field!r}; set data.text_field")
        if not isinstance(record[field], str):
          raise ValueError(f"{path}:{line_no}: field {field!r} is a JSON "
                           f"{type(record[field]).__name__}, not a string; fix the line or set "
                           "data.text_field")
        yield f"{path}:{line_no}", record[field]


def _documents(files, data_config, skipped: list):
  """Yields (key, text); the key decides the train/eval split. Binary and non-UTF-8 text files
  are not trained on: their paths go to `skipped`."""
  if data_config.source == "jsonl":
    yield from _jsonl_documents(files, data_config.text_field)
  else:
    for key, path in files:
      text = _read_text(path)
      if text is None:
        skipped.append(path)
      else:
        yield key, text


def load_documents(data_config) -> tuple[list[str], list[str]]:
  """(train documents, eval documents) as text, in a fixed order."""
  if data_config.source == "stdlib":
    files = stdlib_files()
  else:
    files = _glob_files(data_config.paths, "data.paths")
  eval_files = _glob_files(data_config.eval_paths, "data.eval_paths") if data_config.eval_paths else []
  train, held_out, skipped = [], [], []
  for key, text in _documents(files, data_config, skipped):
    if not text:
      continue
    (held_out if not eval_files and _held_out(key, data_config.eval_fraction) else train).append(text)
  for _, text in _documents(eval_files, data_config, skipped):
    if text:
      held_out.append(text)
  if data_config.max_documents:
    train, held_out = train[:data_config.max_documents], held_out[:data_config.max_documents]
  where = "the standard library" if data_config.source == "stdlib" else repr(data_config.paths)
  note = (f" ({len(skipped)} binary or non-UTF-8 files skipped, e.g. {skipped[0]})"
          if skipped else "")
  if skipped and train and held_out:
    print(f"[lcjax] data: skipped {len(skipped)} binary or non-UTF-8 files, e.g. {skipped[0]}")
  if not train:
    raise ValueError(f"the corpus from {where} has no non-empty training document{note}; "
                     "point data.paths at files with UTF-8 text")
  if not held_out:
    raise ValueError(f"the corpus from {where} has no held-out document{note}; raise "
                     "data.eval_fraction or set data.eval_paths")
  return train, held_out
