"""Data: tokenizers, document sources, packing, and the resumable train/eval streams.

A batch is a pure function of (seed, first sequence): the same global batch whatever the mesh
and whichever process asks, so each process builds only its `rows` and resumes from one
integer. Documents are read and tokenized lazily (store.py), so memory holds every document's
length but only the tokens of the documents recent sequences touched.
"""
import dataclasses

import numpy as np

from lcjax.data.arrayrecord import open_stores as _open_arrayrecord
from lcjax.data.packing import FIELDS, PackedSequences, empty_rows, row_range
from lcjax.data.prefetch import Prefetcher
from lcjax.data.sources import load_documents, scan
from lcjax.data.store import ReadCounter, TextStore
from lcjax.data.tokenizers import identity, make_tokenizer


@dataclasses.dataclass
class Datasets:
  tokenizer: object
  train: PackedSequences
  eval: PackedSequences
  # Sequence parallelism stores tokens in a layout (ops.sequence_layout): every field of a
  # batch is permuted alike, so the model only ever sees stored order. None = natural order.
  layout: np.ndarray | None = None
  counter: ReadCounter = dataclasses.field(default_factory=ReadCounter)

  def _stored(self, batch: dict) -> dict:
    return batch if self.layout is None else {f: v[:, self.layout] for f, v in batch.items()}

  def train_batch(self, first_sequence: int, batch_size: int, rows=None) -> dict:
    """Rows `rows` (a range or slice of range(batch_size); None = all) of the global batch of
    sequences first .. first+B-1 of the shuffled train stream (step s starts at s*B): int32
    [len(rows), T] arrays equal to those rows of the full batch."""
    rows = row_range(rows, batch_size)
    return self._stored(self.train.batch(first_sequence, batch_size, rows))

  def eval_batches(self, batch_size: int, max_batches: int, rows=None):
    """Held-out batches in a fixed order (no shuffle), each restricted to `rows` as in
    train_batch; rows past the last held-out sequence are empty (loss mask 0)."""
    rows = row_range(rows, batch_size)
    n = self.eval.num_sequences
    count = -(-n // batch_size)
    if max_batches:
      count = min(count, max_batches)
    for b in range(count):
      first = b * batch_size
      batch = self.eval.batch(first, batch_size, rows)
      past = np.array([first + r >= n for r in rows], bool)
      yield self._stored(empty_rows(batch, past) if past.any() else batch)

  def stats(self) -> dict:
    """What this process loaded so far: documents tokenized (text sources) or token records
    read (ArrayRecord), and their bytes (of UTF-8 text, or of records)."""
    return {"data/documents_loaded": self.counter.documents,
            "data/bytes_loaded": self.counter.bytes}

  def unigram_entropy(self, max_documents: int = 20_000) -> float:
    """Cross-entropy (nats/token) of held-out targets under train-target unigram frequencies
    (scored targets only). Exact when each split has at most `max_documents` documents, else
    estimated on `max_documents` evenly spaced documents of each (it reads what it counts)."""
    vocab = self.tokenizer.vocab_size
    counts = np.ones(vocab)  # add-one smoothing: unseen held-out tokens keep a finite cost
    counts += _target_counts(self.train, vocab, max_documents)
    held = _target_counts(self.eval, vocab, max_documents)
    log_p = np.log(counts / counts.sum())
    return float(-(held * log_p).sum() / held.sum())


def _target_counts(packed: PackedSequences, vocab: int, max_documents: int) -> np.ndarray:
  """[vocab] counts of the scored targets of (a spread of) the documents: every target of a
  document ([tokens] + [EOS]) from its skip_prefix-th on, as the packed sequences score them."""
  n = len(packed.documents)
  docs = np.arange(n) if n <= max_documents else np.linspace(0, n - 1, max_documents).astype(int)
  counts = np.zeros(vocab)
  for doc in docs:
    scored = int(packed.documents.lengths[doc]) + 1 - packed.skip_prefix
    if scored > 0:
      targets = packed.window(doc, 1 + packed.skip_prefix, scored)
      counts += np.bincount(targets, minlength=vocab)[:vocab]
  return counts


def _text_stores(data_config, tokenizer, counter):
  """(train, eval) stores of text/JSONL/stdlib documents. One scan keeps each document's length:
  the UTF-8 byte count for the bytes tokenizer (nothing tokenized); other tokenizers tokenize
  every document once for it (counted) -- prepare such corpora as ArrayRecord instead."""
  if tokenizer.is_bytes:
    def length_of(text):
      return len(text.encode("utf-8"))
  else:
    def length_of(text):
      counter.add(len(text.encode("utf-8")))
      return len(tokenizer.encode(text))
  corpus = scan(data_config, length_of)
  return (TextStore(corpus.train_refs, corpus.read, tokenizer, corpus.train_lengths, counter),
          TextStore(corpus.eval_refs, corpus.read, tokenizer, corpus.eval_lengths, counter))


def build(data_config, seq_len: int, seed: int, layout: np.ndarray | None = None) -> Datasets:
  """The train (shuffled) and held-out streams of data_config's corpus, read lazily."""
  tokenizer = make_tokenizer(data_config)
  counter = ReadCounter()
  if data_config.source == "arrayrecord":
    train_docs, eval_docs = _open_arrayrecord(data_config, identity(data_config, tokenizer),
                                              counter)
  else:
    train_docs, eval_docs = _text_stores(data_config, tokenizer, counter)
  special = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  train = PackedSequences(train_docs, seq_len, seed=seed, shuffle=True, **special)
  held_out = PackedSequences(eval_docs, seq_len, seed=seed, shuffle=False,
                             skip_prefix=data_config.eval_skip_prefix, **special)
  return Datasets(tokenizer, train, held_out, layout, counter)


__all__ = ["FIELDS", "Datasets", "PackedSequences", "Prefetcher", "build", "load_documents",
           "make_tokenizer", "row_range"]
