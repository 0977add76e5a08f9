"""Document stores: every document's length up front, its tokens only on demand.

Packing across documents needs each document's length in the shuffled epoch order, but a
sequence needs the tokens of only the few documents it cuts. A store therefore holds
`lengths` (int64 [N], tokens per document, without BOS/EOS) and gives `tokens(i)` lazily,
through a small LRU cache bounded in tokens. What was tokenized (or read) is counted in a
`ReadCounter` shared by the stores of one `data.build`, so a process can report how much of
the corpus its rows made it touch (`Datasets.stats()`).

  MemoryStore       token arrays already in memory (tests, DiPaCo's routed shards)
  TextStore         text or JSONL documents read from their files and tokenized on demand
  ArrayRecordStore  token records written once by scripts/prepare_data.py (no tokenizing)
"""
import collections
import dataclasses
import threading

import numpy as np


@dataclasses.dataclass
class ReadCounter:
  """Documents (and their bytes of text, or of token records) turned into tokens on demand."""
  documents: int = 0
  bytes: int = 0
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False,
                                            compare=False)

  def add(self, nbytes: int):
    with self._lock:  # the prefetch thread and the consumer (eval) may both load
      self.documents += 1
      self.bytes += nbytes


class DocumentStore:
  """Base: `lengths` [N] and `tokens(i) -> int32 [lengths[i]]`, cached (`_load` does the work)."""

  def __init__(self, lengths: np.ndarray, counter: ReadCounter | None = None,
               cache_tokens: int = 1 << 24):
    self.lengths = np.asarray(lengths, np.int64)
    self.counter = counter if counter is not None else ReadCounter()
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._cached_tokens, self._cache_tokens = 0, cache_tokens
    self._lock = threading.Lock()  # a prefetch thread and the consumer may both read

  def __len__(self) -> int:
    return len(self.lengths)

  def tokens(self, i: int) -> np.ndarray:
    i = int(i)
    with self._lock:
      if i in self._cache:
        self._cache.move_to_end(i)
        return self._cache[i]
    doc = self._load(i)
    if len(doc) != self.lengths[i]:
      raise ValueError(f"document {i} has {len(doc)} tokens, not the {self.lengths[i]} counted "
                       "when the run started: its file changed; restart the run, or train on a "
                       "corpus prepared with scripts/prepare_data.py")
    with self._lock:
      if i not in self._cache:  # another thread may have loaded it meanwhile
        self._cache[i] = doc
        self._cached_tokens += len(doc)
      while self._cached_tokens > self._cache_tokens and len(self._cache) > 1:
        _, old = self._cache.popitem(last=False)
        self._cached_tokens -= len(old)
    return doc

  def _load(self, i: int) -> np.ndarray:
    raise NotImplementedError


class MemoryStore(DocumentStore):
  """Token arrays held in memory (nothing is counted: nothing is read)."""

  def __init__(self, token_docs):
    self._docs = [np.asarray(d, np.int32) for d in token_docs]
    super().__init__(np.array([len(d) for d in self._docs], np.int64), cache_tokens=0)

  def tokens(self, i: int) -> np.ndarray:
    return self._docs[int(i)]


class TextStore(DocumentStore):
  """Documents given as references (`read_text(ref) -> str`) and tokenized when first needed."""

  def __init__(self, refs, read_text, tokenizer, lengths, counter=None):
    super().__init__(lengths, counter)
    self._refs, self._read_text, self._tokenizer = refs, read_text, tokenizer

  def _load(self, i):
    text = self._read_text(self._refs[i])
    self.counter.add(len(text.encode("utf-8")))
    return self._tokenizer.encode(text)


class ArrayRecordStore(DocumentStore):
  """int32 token records of ArrayRecord shards, read by array_record's ArrayRecordDataSource
  (one index over all shards, random access by record; grain's source of the same name
  subclasses it, and importing grain costs seconds and ~200 MB more for nothing else used)."""

  def __init__(self, shard_paths, lengths, counter=None):
    """lengths: of the first len(lengths) records (all of them, or data.max_documents)."""
    super().__init__(lengths, counter)
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    self._source = ArrayRecordDataSource(list(shard_paths))
    assert len(self._source) >= len(self.lengths), (len(self._source), len(self.lengths))

  def _load(self, i):
    record = self._source[i]
    self.counter.add(len(record))
    return np.frombuffer(record, "<i4").astype(np.int32)


def as_store(documents) -> DocumentStore:
  """A store as is; a list of token arrays as a MemoryStore."""
  return documents if isinstance(documents, DocumentStore) else MemoryStore(documents)
