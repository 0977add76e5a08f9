"""Pre-tokenized corpora in ArrayRecord shards: written once (scripts/prepare_data.py), read by
record with random access (array_record.s ArrayRecordDataSource), never tokenized again.

A prepared directory holds
  index.json                     format, tokenizer identity, per split: shards, documents, tokens
  {split}-{k:05d}.array_record   documents in order, one record each: int32 little-endian tokens
  {split}-lengths.npy            int64 [N] tokens per document (what packing needs up front)
for split in (train, eval). The train/held-out split is the one the text source makes
(sources.scan), so a prepared corpus gives exactly the batches of its text.
"""
import json
import pathlib

import numpy as np
import tqdm

from lcjax.data.store import ArrayRecordStore, ReadCounter

FORMAT = "lcjax-arrayrecord-1"
SPLITS = ("train", "eval")


def write(out_dir, corpus, tokenizer, identity: dict, docs_per_shard: int = 65536,
          progress: bool = True) -> dict:
  """Tokenizes the documents of `corpus` (a sources.Corpus) into ArrayRecord shards in
  `out_dir` and writes their index; returns the index."""
  from array_record.python.array_record_module import ArrayRecordWriter
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if (out / "index.json").exists():
    raise ValueError(f"{out} already holds a prepared corpus (index.json); choose an empty "
                     "--output directory")
  index = {"format": FORMAT, "tokenizer": identity, "splits": {}}
  total = len(corpus.train_refs) + len(corpus.eval_refs)
  bar = tqdm.tqdm(total=total, desc="tokenize", unit="doc", disable=not progress, mininterval=2)
  for split in SPLITS:
    refs = corpus.train_refs if split == "train" else corpus.eval_refs
    shards, lengths, writer = [], np.zeros(len(refs), np.int64), None
    for i, ref in enumerate(refs):
      if i % docs_per_shard == 0:
        if writer is not None:
          writer.close()
        shards.append(f"{split}-{len(shards):05d}.array_record")
        # group_size 1: each record is its own chunk, so one document reads without its neighbours
        writer = ArrayRecordWriter(str(out / shards[-1]), "group_size:1")
      tokens = np.asarray(tokenizer.encode(corpus.read(ref)), "<i4")
      writer.write(tokens.tobytes())
      lengths[i] = len(tokens)
      bar.update(1)
    if writer is not None:
      writer.close()
    np.save(out / f"{split}-lengths.npy", lengths)
    index["splits"][split] = {"shards": shards, "documents": len(refs),
                              "tokens": int(lengths.sum())}
  bar.close()
  (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
  return index


def read_index(path) -> dict:
  """The index of a prepared directory; ValueError naming data.paths when there is none."""
  index_path = pathlib.Path(path) / "index.json"
  if not index_path.is_file():
    raise ValueError(f"data.paths={str(path)!r} has no index.json: data.source='arrayrecord' "
                     "reads a directory written by scripts/prepare_data.py --output=DIR")
  index = json.loads(index_path.read_text())
  if index.get("format") != FORMAT:
    raise ValueError(f"{index_path} is format {index.get('format')!r}, not {FORMAT!r}; "
                     "prepare the corpus again with scripts/prepare_data.py")
  return index


def open_stores(data_config, identity: dict, counter: ReadCounter):
  """(train store, eval store) of the prepared directory data.paths, checked to be tokenized
  by the tokenizer the config names (`identity`)."""
  root = pathlib.Path(data_config.paths)
  index = read_index(root)
  if index["tokenizer"] != identity:
    raise ValueError(f"{root} was tokenized by {index['tokenizer']}, but the config's tokenizer "
                     f"is {identity}; set data.tokenizer/data.tokenizer_path to the one it was "
                     "prepared with, or prepare it again")
  stores = []
  for split in SPLITS:
    entry = index["splits"][split]
    lengths = np.load(root / f"{split}-lengths.npy")
    assert len(lengths) == entry["documents"], (split, len(lengths), entry["documents"])
    if not len(lengths):
      raise ValueError(f"{root} has no {split} document; prepare it with a corpus that has some")
    lengths = lengths[:data_config.max_documents or None]
    stores.append(ArrayRecordStore([str(root / s) for s in entry["shards"]], lengths, counter))
  return tuple(stores)
