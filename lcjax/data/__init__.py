"""Data: tokenizers, document sources, packing, and the resumable train/eval streams."""
import dataclasses

import numpy as np

from lcjax.data.packing import FIELDS, PackedSequences, empty_batch_rows
from lcjax.data.sources import load_documents
from lcjax.data.tokenizers import make_tokenizer


@dataclasses.dataclass
class Datasets:
  tokenizer: object
  train: PackedSequences
  eval: PackedSequences
  # Sequence parallelism stores tokens in a layout (ops.sequence_layout): every field of a
  # batch is permuted alike, so the model only ever sees stored order. None = natural order.
  layout: np.ndarray | None = None

  def _stored(self, batch: dict) -> dict:
    return batch if self.layout is None else {f: v[:, self.layout] for f, v in batch.items()}

  def train_batch(self, first_sequence: int, batch_size: int) -> dict:
    """Sequences first .. first+B-1 of the shuffled train stream (step s starts at s*B)."""
    return self._stored(self.train.batch(first_sequence, batch_size))

  def eval_batches(self, batch_size: int, max_batches: int):
    """Held-out batches in a fixed order (no shuffle); the last one padded with empty rows."""
    n = self.eval.num_sequences
    count = -(-n // batch_size)
    if max_batches:
      count = min(count, max_batches)
    for b in range(count):
      first = b * batch_size
      keep = min(batch_size, n - first)
      batch = self.eval.batch(first, batch_size)
      yield self._stored(batch if keep == batch_size else empty_batch_rows(batch, keep))

  def unigram_entropy(self) -> float:
    """Cross-entropy (nats/token) of held-out targets under train-target unigram frequencies."""
    vocab = self.tokenizer.vocab_size
    counts = np.ones(vocab)  # add-one smoothing: unseen held-out tokens keep a finite cost
    for g in range(self.train.num_sequences):
      s = self.train.sequence(g)
      counts += np.bincount(s["targets"][s["loss_mask"] > 0], minlength=vocab)[:vocab]
    log_p = np.log(counts / counts.sum())
    held = np.zeros(vocab)
    for g in range(self.eval.num_sequences):
      s = self.eval.sequence(g)
      held += np.bincount(s["targets"][s["loss_mask"] > 0], minlength=vocab)[:vocab]
    return float(-(held * log_p).sum() / held.sum())


def build(data_config, seq_len: int, seed: int, layout: np.ndarray | None = None) -> Datasets:
  tokenizer = make_tokenizer(data_config)
  train_docs, eval_docs = load_documents(data_config)
  special = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  train = PackedSequences([tokenizer.encode(d) for d in train_docs], seq_len, seed=seed,
                          shuffle=True, **special)
  held_out = PackedSequences([tokenizer.encode(d) for d in eval_docs], seq_len, seed=seed,
                             shuffle=False, skip_prefix=data_config.eval_skip_prefix, **special)
  return Datasets(tokenizer, train, held_out, layout)
