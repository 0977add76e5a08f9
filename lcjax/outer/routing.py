"""DiPaCo's data: every document routed to a path, each path reading its own shard.

Routing is once per document, offline, before training (the paper's coarse routing):
  uniform   a seeded permutation of the documents dealt round-robin to the P paths (equal
            shards; one path keeps every document in its original order, so P = 1 is the
            unsharded stream DiLoCo reads)

Path p's shard is packed and shuffled like the whole corpus is without DiPaCo
(data.PackedSequences, the run's seed), and read by p's islands: a step's global batch is the
concatenation over the paths of B / P sequences of each shard, sequences s*B/P .. of path p at
step s, so every path's position is a pure function of the step (resumable from one integer,
as without DiPaCo). Held-out documents are routed by the same rule, and each is evaluated with
its own path.
"""
import dataclasses

import numpy as np

from lcjax.data import Datasets, PackedSequences, load_documents, make_tokenizer


def uniform(num_documents: int, num_paths: int, seed: int) -> np.ndarray:
  """[N] int32: the path of each document (equal shards, a seeded deal)."""
  if num_paths == 1:
    return np.zeros(num_documents, np.int32)
  order = np.random.default_rng([seed, 0x0D1BAC0]).permutation(num_documents)
  assignment = np.empty(num_documents, np.int32)
  assignment[order] = np.arange(num_documents) % num_paths
  return assignment


@dataclasses.dataclass
class PathDatasets:
  """The Datasets interface (train_batch, eval_batches, unigram_entropy) over P path shards."""
  tokenizer: object
  paths: list            # Datasets per path: its train shard and its held-out documents
  whole: Datasets        # every document, unsharded (the corpus statistics)
  shard_documents: list  # train documents routed to each path

  @property
  def num_paths(self) -> int:
    return len(self.paths)

  @property
  def shard_tokens(self) -> list[int]:
    """Target tokens in each path's train shard."""
    return [d.train.num_pairs for d in self.paths]

  @property
  def eval(self):
    return self.whole.eval

  def train_batch(self, first_sequence: int, batch_size: int) -> dict:
    """The global batch: path p's rows are sequences first/P .. of its shard."""
    P = self.num_paths
    parts = [d.train_batch(first_sequence // P, batch_size // P) for d in self.paths]
    return {f: np.concatenate([b[f] for b in parts]) for f in parts[0]}

  def eval_batches(self, batch_size: int, max_batches: int, path: int = 0):
    return self.paths[path].eval_batches(batch_size, max_batches)

  def unigram_entropy(self) -> float:
    return self.whole.unigram_entropy()

  def describe(self) -> dict:
    return {"data/shard_tokens": self.shard_tokens,
            "data/shard_documents": self.shard_documents,
            "data/eval_shard_tokens": [d.eval.num_pairs for d in self.paths]}


def build(config, seq_len: int, seed: int, layout=None) -> PathDatasets:
  """The path shards of a DiPaCo run's data (outer.routing)."""
  from lcjax.outer import paths as paths_lib
  o = config.outer
  num_paths = paths_lib.PathGrid(paths_lib.parse_modules(o.modules, config.model.num_levels)
                                 ).num_paths
  tokenizer = make_tokenizer(config.data)
  train_docs, eval_docs = load_documents(config.data)
  train_tokens = [tokenizer.encode(d) for d in train_docs]
  eval_tokens = [tokenizer.encode(d) for d in eval_docs]
  if o.routing != "uniform":
    raise ValueError(f"outer.routing={o.routing!r} is not available; use 'uniform'")
  train_paths = uniform(len(train_tokens), num_paths, seed)
  eval_paths = uniform(len(eval_tokens), num_paths, seed + 1)
  special = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

  def pack(docs, shuffle):
    return PackedSequences(docs, seq_len, seed=seed, shuffle=shuffle, **special)

  shards = []
  for p in range(num_paths):
    train = [t for t, q in zip(train_tokens, train_paths) if q == p]
    held = [t for t, q in zip(eval_tokens, eval_paths) if q == p]
    if not train or not held:
      raise ValueError(f"path {p} has {len(train)} train and {len(held)} held-out documents; "
                       "every path needs both: use fewer paths (outer.modules) or more data")
    shards.append(Datasets(tokenizer, pack(train, True), pack(held, False), layout))
  whole = Datasets(tokenizer, pack(train_tokens, True), pack(eval_tokens, False), layout)
  return PathDatasets(tokenizer, shards, whole,
                      [int(np.sum(train_paths == p)) for p in range(num_paths)])
