"""DiPaCo's data: every document routed to a path, each path reading its own shard.

Routing is once per document, offline, before training (the paper's coarse routing); with
outer.overlap = n every train document goes to its n best paths' shards (held-out ones to the
best only):
  uniform   a seeded hash of the document's text, modulo P (near-equal shards; with P = 1
            the one shard is the unsharded stream DiLoCo reads)
  kmeans    the nearest of P k-means centroids of the documents' features (features.py: a
            base model's mean last hidden state over the first outer.route_prefix tokens)
  product_kmeans  for a 2-level grid K1 x K2: K1 clusters of the feature's first half, K2 of
            its second; the path is the pair of nearest centroids
Both add a bias per path to minus the squared distances (`balance_bias`), so that no path is
left without train documents: a cell nothing is nearest to takes the documents that lose
least by going there.

Path p's shard is packed and shuffled like the whole corpus is without DiPaCo
(data.PackedSequences, the run's seed), and read by p's islands: a step's global batch is the
concatenation over the paths of B / P sequences of each shard, sequences s*B/P .. of path p at
step s, so every path's position is a pure function of the step (resumable from one integer,
as without DiPaCo). Held-out documents are routed by the same rule, and each is evaluated with
its own path.
"""
import dataclasses
import zlib

import jax
import numpy as np

from lcjax.data import Datasets, PackedSequences, load_documents, make_tokenizer


def uniform(texts, num_paths: int, seed: int) -> np.ndarray:
  """[N] int32: the path of each document, a seeded hash of its text (near-equal shards; a
  prompt routes as a document with its text would)."""
  salt = f"{seed}:".encode()
  return np.array([zlib.crc32(salt + t.encode("utf-8", "replace")) % num_paths for t in texts],
                  np.int32)


def route_text(config, text: str) -> int:
  """The path a text (a prompt, a document) is routed to under a DiPaCo config."""
  from lcjax.outer import paths as paths_lib
  return int(uniform([text], paths_lib.grid_of(config).num_paths, config.train.seed)[0])


# -- routers: numpy, on the host, deterministic for a seed -------------------------------------

def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 100) -> np.ndarray:
  """[k, D] centroids of Lloyd's k-means on the rows of x [N, D] (float64), started by
  k-means++ from a seeded generator; a cluster left empty restarts at the point farthest from
  its centroid."""
  x = np.asarray(x, np.float64)
  if len(x) < k:
    raise ValueError(f"k-means needs at least {k} documents to make {k} clusters; got {len(x)}")
  rng = np.random.default_rng([seed, k])
  centroids = [x[rng.integers(len(x))]]
  for _ in range(1, k):  # k-means++: the next centre drawn in proportion to squared distance
    d2 = np.min(_sq_distances(x, np.stack(centroids)), axis=1)
    centroids.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else
                     x[rng.integers(len(x))])
  centroids = np.stack(centroids)
  labels = None
  for _ in range(iters):
    d2 = _sq_distances(x, centroids)
    new = np.argmin(d2, axis=1)
    for c in range(k):
      if not np.any(new == c):  # an empty cluster takes the point worst served by its own
        far = int(np.argmax(d2[np.arange(len(x)), new]))
        new[far] = c
    if labels is not None and np.array_equal(new, labels):
      break
    labels = new
    centroids = np.stack([x[labels == c].mean(axis=0) for c in range(k)])
  return centroids


def _sq_distances(x, centroids):
  d2 = (np.sum(x * x, axis=1)[:, None] - 2 * x @ centroids.T
        + np.sum(centroids * centroids, axis=1)[None])
  return np.maximum(d2, 0.0)  # the expansion's rounding can dip below zero


def nearest(x: np.ndarray, centroids: np.ndarray, top: int = 1) -> np.ndarray:
  """[N, top] the indices of each row's `top` nearest centroids, nearest first."""
  return np.argsort(_sq_distances(np.asarray(x, np.float64), centroids), axis=1,
                    kind="stable")[:, :top]


def product_kmeans(x: np.ndarray, modules: tuple, seed: int) -> list[np.ndarray]:
  """Product k-means for a 2-level grid K1 x K2: k-means with K1 clusters on the first half of
  the feature and K2 on the second; a document's path is the pair (a, b), path a * K2 + b."""
  half = x.shape[1] // 2
  return [kmeans(x[:, :half], modules[0], seed), kmeans(x[:, half:], modules[1], seed + 1)]


def product_scores(x: np.ndarray, centroids: list) -> np.ndarray:
  """[N, K1 * K2] minus the squared distance of each row to each cell of product k-means (the
  two halves' distances summed; cell a * K2 + b)."""
  half = x.shape[1] // 2
  a = _sq_distances(np.asarray(x[:, :half], np.float64), centroids[0])
  b = _sq_distances(np.asarray(x[:, half:], np.float64), centroids[1])
  return -(a[:, :, None] + b[:, None, :]).reshape(len(x), -1)


def fit_logistic(x: np.ndarray, labels: np.ndarray, num_paths: int, *, l2: float = 1e-3,
                 steps: int = 500, lr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """(W [D, P], b [P]) of a multinomial logistic regression from the features x [N, D]
  (standardised inside: W and b apply to raw x) to path labels, by full-batch gradient descent
  on the mean cross-entropy plus l2 |W|^2 / 2."""
  x = np.asarray(x, np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
  z = (x - mean) / std
  onehot = np.eye(num_paths)[labels]
  w, b = np.zeros((x.shape[1], num_paths)), np.zeros(num_paths)
  for _ in range(steps):
    logits = z @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = (p - onehot) / len(x)
    w -= lr * (z.T @ g + l2 * w)
    b -= lr * g.sum(axis=0)
  return w / std[:, None], b - (mean / std) @ w


def balance_bias(logits: np.ndarray, min_docs: int = 1) -> np.ndarray:
  """[P] bias added to the router's logits [N, P] so that every path is the top choice of at
  least `min_docs` documents: an underfull path's bias rises just enough to win the documents
  it loses by the least, taken only from paths that keep min_docs."""
  n, num_paths = logits.shape
  if n < num_paths * min_docs:
    raise ValueError(f"{n} documents cannot give each of {num_paths} paths {min_docs}")
  bias = np.zeros(num_paths)
  for _ in range(num_paths * n):
    scores = logits + bias
    choice = np.argmax(scores, axis=1)
    counts = np.bincount(choice, minlength=num_paths)
    short = np.flatnonzero(counts < min_docs)
    if not len(short):
      return bias
    p = int(short[0])
    donors = counts[choice] > min_docs  # documents whose path can spare them
    margin = np.where(donors, scores[np.arange(n), choice] - scores[:, p], np.inf)
    bias[p] += np.sort(margin)[min_docs - counts[p] - 1] + 1e-9 * (1 + abs(bias[p]))
  raise RuntimeError("balance_bias did not converge")  # each round moves a document: unreachable


@dataclasses.dataclass
class PathDatasets:
  """The Datasets interface (train_batch, eval_batches, unigram_entropy) over P path shards."""
  tokenizer: object
  paths: list            # Datasets per path: its train shard and its held-out documents
  whole: Datasets        # every document, unsharded (the corpus statistics)
  shard_documents: list  # train documents routed to each path
  router: tuple          # (arrays, info) of the router (`save_router`)

  @property
  def num_paths(self) -> int:
    return len(self.paths)

  @property
  def shard_tokens(self) -> list[int]:
    """Target tokens in each path's train shard."""
    return [d.train.num_pairs for d in self.paths]

  def train_batch(self, first_sequence: int, batch_size: int) -> dict:
    """The global batch: path p's rows are sequences first/P .. of its shard."""
    P = self.num_paths
    parts = [d.train_batch(first_sequence // P, batch_size // P) for d in self.paths]
    return {f: np.concatenate([b[f] for b in parts]) for f in parts[0]}

  def eval_batches(self, batch_size: int, max_batches: int, path: int = 0):
    """Path `path`'s held-out batches (none when no held-out document is routed to it)."""
    if self.paths[path].eval is None:
      return iter(())
    return self.paths[path].eval_batches(batch_size, max_batches)

  def unigram_entropy(self) -> float:
    return self.whole.unigram_entropy()


def _uniform_scores(texts, num_paths, seed):
  """[N, P] scores ranking the hashed path first, then the next ones in order (overlap)."""
  first = uniform(texts, num_paths, seed)
  return -((np.arange(num_paths)[None] - first[:, None]) % num_paths).astype(np.float64)


def route(config, train_tokens, eval_tokens, train_docs, eval_docs, tokenizer):
  """(train scores [N, P], held-out scores [M, P], router): how strongly each document is
  routed to each path under outer.routing (a document goes to its best path, a train document
  with outer.overlap = n to its n best), and the router's arrays and inputs (`save_router`)."""
  from lcjax.outer import paths as paths_lib
  o, seed = config.outer, config.train.seed
  grid = paths_lib.grid_of(config)
  info = {"routing": o.routing, "seed": str(seed), "paths": str(grid.num_paths),
          "overlap": str(o.overlap)}
  if o.routing == "uniform":
    return (_uniform_scores(train_docs, grid.num_paths, seed),
            _uniform_scores(eval_docs, grid.num_paths, seed), ({}, info))
  from lcjax.model import ModelConfig
  from lcjax.outer import features as features_lib
  model_cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  mesh = features_lib.local_mesh()
  with jax.set_mesh(mesh):
    step, params = features_lib.base_params(config, model_cfg, mesh)
    feats = [features_lib.prefix_features(model_cfg, params, mesh, docs, o.route_prefix,
                                          tokenizer.bos_id, tokenizer.pad_id)
             for docs in (train_tokens, eval_tokens)]
  info.update(base_from=str(o.base_from), base_step=str(step), route_prefix=str(o.route_prefix))
  if o.routing == "kmeans":
    arrays = {"centroids": kmeans(feats[0], grid.num_paths, seed)}
    scores = [-_sq_distances(np.asarray(f, np.float64), arrays["centroids"]) for f in feats]
  else:  # product_kmeans: a 2-level grid
    centroids = product_kmeans(feats[0], grid.modules, seed)
    arrays = {f"centroids{i}": c for i, c in enumerate(centroids)}
    scores = [product_scores(f, centroids) for f in feats]
  # A cell no train document is nearest to would leave its path without data: the bias makes
  # every path the first choice of at least one (balance_bias), and routes held-out ones alike.
  arrays["bias"] = balance_bias(scores[0], 1)
  return (scores[0] + arrays["bias"], scores[1] + arrays["bias"],
          ({k: v.astype(np.float32) for k, v in arrays.items()}, info))


def save_router(router, path):
  """The router's arrays and inputs as safetensors (no pickle)."""
  from safetensors.numpy import save_file
  arrays, info = router
  save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()} or
            {"none": np.zeros(0, np.float32)}, str(path), metadata=info)


def build(config, seq_len: int, seed: int, layout=None) -> PathDatasets:
  """The path shards of a DiPaCo run's data (outer.routing)."""
  tokenizer = make_tokenizer(config.data)
  train_docs, eval_docs = load_documents(config.data)
  train_tokens = [tokenizer.encode(d) for d in train_docs]
  eval_tokens = [tokenizer.encode(d) for d in eval_docs]
  train_scores, eval_scores, router = route(config, train_tokens, eval_tokens, train_docs,
                                            eval_docs, tokenizer)
  num_paths = train_scores.shape[1]
  # stable ranks: ties go to the lower path
  train_paths = np.argsort(-train_scores, axis=1, kind="stable")[:, :config.outer.overlap]
  eval_paths = np.argmax(eval_scores, axis=1)
  special = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

  def pack(docs, shuffle):  # held-out (unshuffled) documents are scored after the prefix
    skip = 0 if shuffle else config.data.eval_skip_prefix
    return PackedSequences(docs, seq_len, seed=seed, shuffle=shuffle, skip_prefix=skip, **special)

  shards = []
  for p in range(num_paths):
    train = [t for t, q in zip(train_tokens, train_paths) if p in q]
    held = [t for t, q in zip(eval_tokens, eval_paths) if q == p]
    if not train:
      raise ValueError(f"outer.routing={config.outer.routing!r} routes no train document to "
                       f"path {p}; every path needs a shard: use fewer paths (outer.modules) or "
                       "more data (data.max_documents)")
    shards.append(Datasets(tokenizer, pack(train, True), pack(held, False) if held else None,
                           layout))
  whole = Datasets(tokenizer, pack(train_tokens, True), pack(eval_tokens, False), layout)
  return PathDatasets(tokenizer, shards, whole,
                      [int(np.sum(train_paths == p)) for p in range(num_paths)], router)
