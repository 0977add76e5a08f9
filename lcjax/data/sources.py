"""Where documents come from: the standard library's sources (default), text files, JSONL.

`scan` reads the corpus once and keeps, per document, only a reference (file, JSONL line
offset) and its length in tokens; `Corpus.read` finds a document's text again on demand.

Splits into train and held-out eval by a hash of each file's path (or of each JSONL document),
so the split is the same on every machine and for every mesh.
"""
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
import zlib

import numpy as np

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
  """Yields (key, (file index, byte offset of the line), text) of each JSONL document."""
  for file_index, (_, path) in enumerate(files):
    with open(path, "rb") as f:
      offset = 0
      for line_no, raw in enumerate(f, 1):
        line_offset, offset = offset, offset + len(raw)
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
        yield f"{path}:{line_no}", (file_index, line_offset), record[field]


def _documents(files, data_config, skipped: list):
  """Yields (key, ref, text); the key decides the train/eval split, the ref finds the text again
  (`Corpus.read`). Binary and non-UTF-8 text files are not trained on: their paths go to
  `skipped`."""
  if data_config.source == "jsonl":
    yield from _jsonl_documents(files, data_config.text_field)
  else:
    for file_index, (key, path) in enumerate(files):
      text = _read_text(path)
      if text is None:
        skipped.append(path)
      else:
        yield key, (file_index, -1), text


@dataclasses.dataclass
class Corpus:
  """The train and held-out documents as references into their files, with their lengths in
  tokens; no text is kept. A ref is (file index, byte offset of a JSONL line; -1 = the file)."""
  paths: list            # the files refs point into (train files, then eval files)
  text_field: str        # JSONL: the field holding the text; "" for text files
  train_refs: np.ndarray   # [N, 2] int64
  eval_refs: np.ndarray
  train_lengths: np.ndarray  # [N] int64 tokens per document (no BOS/EOS)
  eval_lengths: np.ndarray

  def read(self, ref) -> str:
    """The text of the document at `ref` (the scan that made the corpus validated it)."""
    file_index, offset = int(ref[0]), int(ref[1])
    if offset < 0:
      return _read_text(self.paths[file_index])
    with open(self.paths[file_index], "rb") as f:
      f.seek(offset)
      return json.loads(f.readline().decode("utf-8"))[self.text_field]


class _FirstCopy:
  """With dedupe on, true for the first document with a given text only (a 16-byte hash of it
  is kept), so that no text is trained on twice or held out as a copy of a train document."""

  def __init__(self, dedupe: bool):
    self.dedupe, self.seen, self.dropped = dedupe, set(), 0

  def __call__(self, text: str) -> bool:
    if not self.dedupe:
      return True
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    if digest in self.seen:
      self.dropped += 1
      return False
    self.seen.add(digest)
    return True


def scan(data_config, length_of) -> Corpus:
  """One pass over the corpus that keeps only where each document is and its length
  (`length_of(text) -> int`), split into train and held-out documents in a fixed order."""
  if data_config.source == "stdlib":
    files = stdlib_files()
  else:
    files = _glob_files(data_config.paths, "data.paths")
  eval_files = _glob_files(data_config.eval_paths, "data.eval_paths") if data_config.eval_paths else []
  split = {"train": ([], []), "eval": ([], [])}
  skipped, first_copy = [], _FirstCopy(data_config.dedupe)
  for key, ref, text in _documents(files, data_config, skipped):
    if text and first_copy(text):
      held = not eval_files and _held_out(key, data_config.eval_fraction)
      refs, lengths = split["eval" if held else "train"]
      refs.append(ref)
      lengths.append(length_of(text))
  for _, (file_index, offset), text in _documents(eval_files, data_config, skipped):
    if text and first_copy(text):
      split["eval"][0].append((len(files) + file_index, offset))
      split["eval"][1].append(length_of(text))
  if first_copy.dropped:
    print(f"[lcjax] data: dropped {first_copy.dropped} exact copies of earlier documents "
          "(data.dedupe)")
  limit = data_config.max_documents or None
  arrays = {name: (np.array(refs[:limit], np.int64).reshape(-1, 2),
                   np.array(lengths[:limit], np.int64))
            for name, (refs, lengths) in split.items()}
  _check_not_empty(data_config, len(arrays["train"][1]), len(arrays["eval"][1]), skipped)
  (train_refs, train_lengths), (eval_refs, eval_lengths) = arrays["train"], arrays["eval"]
  return Corpus([p for _, p in files + eval_files],
                data_config.text_field if data_config.source == "jsonl" else "",
                train_refs, eval_refs, train_lengths, eval_lengths)


def _check_not_empty(data_config, train: int, held_out: int, skipped: list):
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


def load_documents(data_config) -> tuple[list[str], list[str]]:
  """(train documents, eval documents) as text, in a fixed order: the whole corpus in memory
  (DiPaCo's routing reads every text; training reads documents lazily through `scan`)."""
  corpus = scan(data_config, len)
  return ([corpus.read(r) for r in corpus.train_refs], [corpus.read(r) for r in corpus.eval_refs])
