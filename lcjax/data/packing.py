"""Packing tokenized documents into fixed-length training sequences, with random access.

Each document becomes [BOS] + tokens + [EOS], i.e. len+1 (input, target) pairs. An epoch is the
pairs of all documents, in an order shuffled per epoch, cut into sequences of T pairs; a
document cut at a boundary continues as a new segment in the next sequence. Within a
sequence, segment ids count pieces from 1 and positions restart at 0 for each piece; only the
last sequence of an epoch holds padding (segment 0, loss mask 0).

Sequence g of the run is sequence `order_e[g % N]` of epoch e = g // N: a pure function of
(seed, g), so batches do not depend on the mesh and the position to resume from is one integer,
and a process builds only its own rows of a batch. Documents come from a DocumentStore: lengths
up front (to cut the epoch), tokens only for the documents a sequence touches.
"""
import numpy as np

from lcjax.data.store import as_store

FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class PackedSequences:
  def __init__(self, documents, seq_len: int, *, bos_id: int, eos_id: int,
               pad_id: int, seed: int, shuffle: bool, skip_prefix: int = 0):
    """documents: a DocumentStore (lengths up front, tokens on demand) or a list of token
    arrays. skip_prefix: the first `skip_prefix` targets of every document are not scored
    (loss mask 0), e.g. the tokens a DiPaCo router read."""
    self.documents = as_store(documents)
    self.seq_len, self.pad_id, self.seed, self.shuffle = seq_len, pad_id, seed, shuffle
    self.bos_id, self.eos_id, self.skip_prefix = bos_id, eos_id, skip_prefix
    self._pairs = self.documents.lengths + 1  # [BOS] + tokens + [EOS]: len + 1 pairs
    self.num_pairs = int(self._pairs.sum())
    self.num_sequences = -(-self.num_pairs // seq_len)
    self._epoch_cache = (None, None)

  def window(self, doc: int, start: int, size: int) -> np.ndarray:
    """int32 [size]: items start .. start+size-1 of document `doc` framed as [BOS] + tokens +
    [EOS] (the frame is never built: a sequence needs a few hundred tokens of a long one)."""
    tokens = self.documents.tokens(doc)
    assert 0 <= start and start + size <= len(tokens) + 2, (doc, start, size, len(tokens))
    out = np.empty(size, np.int32)
    lo, hi = max(start - 1, 0), min(start - 1 + size, len(tokens))  # the tokens in the window
    out[lo - (start - 1):hi - (start - 1)] = tokens[lo:hi]
    if start == 0:
      out[0] = self.bos_id
    if start + size == len(tokens) + 2:
      out[-1] = self.eos_id
    return out

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
    return {f: v[0] for f, v in self.batch(g, 1).items()}

  def _write(self, g: int, out: dict):
    """Writes sequence g into the int32 [T] arrays `out` (one row of a batch)."""
    epoch, k = divmod(g, self.num_sequences)
    doc_order, ends, seq_order = self._epoch(epoch)
    T = self.seq_len
    out["inputs"][:] = out["targets"][:] = self.pad_id
    for f in ("positions", "segment_ids", "loss_mask"):
      out[f][:] = 0
    lo = int(seq_order[k]) * T
    hi = min(lo + T, self.num_pairs)
    i = int(np.searchsorted(ends, lo, side="right"))
    pos, segment = lo, 0
    while pos < hi:
      doc = doc_order[i]
      doc_lo = int(ends[i] - self._pairs[doc])
      take = min(int(ends[i]), hi) - pos
      src = pos - doc_lo
      dst = slice(pos - lo, pos - lo + take)
      pairs = self.window(doc, src, take + 1)  # inputs and, one later, targets
      segment += 1
      out["inputs"][dst] = pairs[:-1]
      out["targets"][dst] = pairs[1:]
      out["positions"][dst] = np.arange(take)
      out["segment_ids"][dst] = segment
      out["loss_mask"][dst] = np.arange(pos - doc_lo, pos - doc_lo + take) >= self.skip_prefix
      pos += take
      i += 1

  def batch(self, first: int, size: int, rows: range | None = None) -> dict:
    """Rows `rows` (default all) of the batch of sequences first .. first+size-1, stacked into
    [len(rows), T] arrays: row r is sequence first + r, whoever asks for it."""
    rows = range(size) if rows is None else rows
    out = {f: np.empty((len(rows), self.seq_len), np.int32) for f in FIELDS}
    for i, r in enumerate(rows):
      self._write(first + r, {f: v[i] for f, v in out.items()})
    return out


def row_range(rows, batch_size: int) -> range:
  """rows (None = all, a range or a slice of [0, batch_size)) as a range; ValueError if it
  leaves the batch."""
  if rows is None:
    return range(batch_size)
  if isinstance(rows, slice):
    return range(*rows.indices(batch_size))
  if not isinstance(rows, range) or rows.step < 1:
    raise ValueError(f"rows must be an increasing range or slice of the batch's rows; got "
                     f"{rows!r}")
  if len(rows) and (min(rows) < 0 or max(rows) >= batch_size):
    raise ValueError(f"rows {rows} leave the batch of {batch_size} rows; ask for rows within "
                     f"range({batch_size})")
  return rows


def rows_by_part(rows: range, part_size: int) -> list[tuple[int, range]]:
  """[(part, rows within it)] of the consecutive parts of `part_size` rows that increasing
  `rows` touch, in order (a batch concatenated from parts, e.g. DiPaCo's paths)."""
  out = []
  for part in range(rows[0] // part_size, rows[-1] // part_size + 1) if len(rows) else ():
    local = [r - part * part_size for r in rows if 0 <= r - part * part_size < part_size]
    if local:
      out.append((part, range(local[0], local[-1] + 1, rows.step)))
  return out


def empty_rows(batch: dict, empty: np.ndarray) -> dict:
  """Zeroes the loss mask and segments of the rows where `empty` [rows] is True (to pad the
  last eval batch)."""
  out = {f: v.copy() for f, v in batch.items()}
  out["loss_mask"][empty] = 0
  out["segment_ids"][empty] = 0
  return out
