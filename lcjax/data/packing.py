"""Packing tokenized documents into fixed-length training sequences, with random access.

Each document becomes [BOS] + tokens + [EOS], i.e. len+1 (input, target) pairs. An epoch is the
pairs of all documents, in an order shuffled per epoch, cut into sequences of T pairs; a
document cut at a boundary continues as a new segment in the next sequence. Within a
sequence, segment ids count pieces from 1 and positions restart at 0 for each piece; only the
last sequence of an epoch holds padding (segment 0, loss mask 0).

Sequence g of the run is sequence `order_e[g % N]` of epoch e = g // N: a pure function of
(seed, g), so batches do not depend on the mesh and the position to resume from is one integer.
"""
import numpy as np

FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class PackedSequences:
  def __init__(self, token_docs: list[np.ndarray], seq_len: int, *, bos_id: int, eos_id: int,
               pad_id: int, seed: int, shuffle: bool, skip_prefix: int = 0):
    """skip_prefix: the first `skip_prefix` targets of every document are not scored (loss
    mask 0), e.g. the tokens a DiPaCo router read."""
    self.seq_len, self.pad_id, self.seed, self.shuffle = seq_len, pad_id, seed, shuffle
    self.skip_prefix = skip_prefix
    lengths = np.array([len(d) + 2 for d in token_docs], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    self._tokens = np.empty(int(lengths.sum()), np.int32)
    for start, doc in zip(self._starts, token_docs):
      self._tokens[start] = bos_id
      self._tokens[start + 1:start + 1 + len(doc)] = doc
      self._tokens[start + 1 + len(doc)] = eos_id
    self._pairs = lengths - 1
    self.num_pairs = int(self._pairs.sum())
    self.num_sequences = -(-self.num_pairs // seq_len)
    self._epoch_cache = (None, None, None)

  def _epoch(self, epoch: int):
    """(document order, cumulative pair ends in that order, sequence order) of an epoch."""
    if self._epoch_cache[0] != epoch:
      n_docs = len(self._pairs)
      if self.shuffle:
        rng = np.random.default_rng([self.seed, epoch])
        doc_order, seq_order = rng.permutation(n_docs), rng.permutation(self.num_sequences)
      else:
        doc_order, seq_order = np.arange(n_docs), np.arange(self.num_sequences)
      self._epoch_cache = (epoch, (doc_order, np.cumsum(self._pairs[doc_order]), seq_order))
    return self._epoch_cache[1]

  def sequence(self, g: int) -> dict:
    """The g-th sequence of the run (epochs follow each other): a dict of int32 [T] arrays."""
    epoch, k = divmod(g, self.num_sequences)
    doc_order, ends, seq_order = self._epoch(epoch)
    T = self.seq_len
    out = {"inputs": np.full(T, self.pad_id, np.int32), "targets": np.full(T, self.pad_id, np.int32),
           "positions": np.zeros(T, np.int32), "segment_ids": np.zeros(T, np.int32),
           "loss_mask": np.zeros(T, np.int32)}
    lo = int(seq_order[k]) * T
    hi = min(lo + T, self.num_pairs)
    i = int(np.searchsorted(ends, lo, side="right"))
    pos, segment = lo, 0
    while pos < hi:
      doc = doc_order[i]
      doc_lo = int(ends[i] - self._pairs[doc])
      take = min(int(ends[i]), hi) - pos
      src = self._starts[doc] + (pos - doc_lo)
      dst = slice(pos - lo, pos - lo + take)
      segment += 1
      out["inputs"][dst] = self._tokens[src:src + take]
      out["targets"][dst] = self._tokens[src + 1:src + 1 + take]
      out["positions"][dst] = np.arange(take)
      out["segment_ids"][dst] = segment
      out["loss_mask"][dst] = np.arange(pos - doc_lo, pos - doc_lo + take) >= self.skip_prefix
      pos += take
      i += 1
    return out

  def batch(self, first: int, size: int) -> dict:
    """Sequences first .. first+size-1 stacked into [size, T] arrays."""
    seqs = [self.sequence(g) for g in range(first, first + size)]
    return {f: np.stack([s[f] for s in seqs]) for f in FIELDS}


def empty_batch_rows(batch: dict, keep: int) -> dict:
  """Zeroes the loss mask and segments of rows >= keep (to pad the last eval batch)."""
  out = {f: v.copy() for f, v in batch.items()}
  out["loss_mask"][keep:] = 0
  out["segment_ids"][keep:] = 0
  return out
