"""DiPaCo's data: every document routed to a path, each path reading its own shard.

Routing is once per document, offline, before training (the paper's coarse routing); with
outer.overlap = n every train document goes to its n best paths' shards (held-out ones to the
best only). A `Router` scores documents [N, P] (best path first, ties to the lower path):
  uniform   a seeded hash of the document's text, modulo P (near-equal shards; with P = 1
            the one shard is the unsharded stream DiLoCo reads)
  kmeans    minus the squared distance of the document's feature (features.py: a base model's
            mean last hidden state over the first outer.route_prefix tokens) to P k-means
            centroids of the train documents' features
  product_kmeans  for a 2-level grid K1 x K2: K1 clusters of the feature's first half, K2 of
            its second; the path is the pair of nearest centroids
  discriminative  a logistic regression from the feature to the path that predicts the document
            best: trained on router documents (outer.router_fraction of the train documents,
            kept out of every shard), each labelled with the path of least loss on it, the
            paths being those of another DiPaCo run of the same grid (outer.init_from)
Feature routers add a bias per path (`balance_bias`), so that no path is left without train
documents: a path nothing prefers takes the documents that lose least by going there.

Path p's shard is packed and shuffled like the whole corpus is without DiPaCo
(data.PackedSequences, the run's seed), and read by p's islands: a step's global batch is the
concatenation over the paths of B / P sequences of each shard, sequences s*B/P .. of path p at
step s, so every path's position is a pure function of the step (resumable from one integer,
as without DiPaCo). Held-out documents are routed by the same rule, and each is evaluated with
its own path.
"""
import dataclasses
import pathlib
import zlib

import numpy as np

from lcjax import config as config_lib
from lcjax.data import Datasets, PackedSequences, load_documents, make_tokenizer, row_range
from lcjax.data.packing import rows_by_part
from lcjax.data.store import ReadCounter


def uniform(texts, num_paths: int, seed: int) -> np.ndarray:
  """[N] int32: the path of each document, a seeded hash of its text (near-equal shards; a
  prompt routes as a document with its text would)."""
  salt = f"{seed}:".encode()
  return np.array([zlib.crc32(salt + t.encode("utf-8", "replace")) % num_paths for t in texts],
                  np.int32)


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
  least `min_docs` documents: an underfull path's bias rises to win the documents that lose
  least by going there among those whose path can spare them, halfway to the next document's
  margin (so that no rounding decides); a path left underfull by that is served next. Every bias
  is a float32 value (the router saves it so): the counts checked here are the saved router's."""
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
    margin = np.where(choice == p, np.inf, scores[np.arange(n), choice] - scores[:, p])
    spare = np.sort(margin[counts[choice] > min_docs])
    won = spare[min(min_docs - counts[p], len(spare)) - 1]
    next_one = np.min(margin[margin > won], initial=np.inf)
    raised = bias[p] + ((won + next_one) / 2 if np.isfinite(next_one) else won + 1.0)
    bias[p] = _float32_above(raised, bias[p] + won)
  raise ValueError(f"could not make each of {num_paths} paths the first choice of {min_docs} "
                   f"of {n} documents (too few distinct features?); use fewer paths "
                   "(outer.modules) or more documents")


def _float32_above(value: float, floor: float) -> float:
  """A float32 near `value` and above `floor`: the float32 rounding of `value` is stepped up
  when it falls to `floor` or below (scores are minus squared distances, up to 1e3 and more)."""
  rounded = np.float32(value)
  while rounded <= floor:
    rounded = np.nextafter(rounded, np.float32(np.inf))
  return float(rounded)


def balance_labels(losses: np.ndarray) -> np.ndarray:
  """[N] the path of least loss of each router document [N, P], except that a path no document
  is best on takes the document that loses least by going there (from a path that keeps one):
  two paths without labels would get the same logistic-regression scores, which no bias per
  path can tell apart."""
  n, num_paths = losses.shape
  if n < num_paths:
    raise ValueError(f"{n} router documents cannot label {num_paths} paths; raise "
                     "outer.router_fraction or data.max_documents")
  labels = np.argmin(losses, axis=1)
  for p in range(num_paths):
    if np.any(labels == p):
      continue
    counts = np.bincount(labels, minlength=num_paths)
    gap = np.where(counts[labels] > 1, losses[:, p] - losses[np.arange(n), labels], np.inf)
    labels[int(np.argmin(gap))] = p
  return labels


@dataclasses.dataclass
class PathDatasets:
  """The Datasets interface (train_batch, eval_batches, unigram_entropy) over P path shards."""
  tokenizer: object
  paths: list            # Datasets per path: its train shard and its held-out documents
  whole: Datasets        # every document, unsharded (the corpus statistics)
  shard_documents: list  # train documents routed to each path
  train_paths: np.ndarray  # [N, overlap] the shards each train document is in, best first
  router: "Router"
  router_documents: int  # train documents kept apart as router data (in no shard)
  replicas: int = 1      # islands (mesh.replica)
  round_steps: int = 1   # rounds (P > replicas): steps of each round (outer.inner_steps)

  @property
  def num_paths(self) -> int:
    return len(self.paths)

  @property
  def shard_tokens(self) -> list[int]:
    """Target tokens in each path's train shard."""
    return [d.train.num_pairs for d in self.paths]

  @property
  def rounds(self) -> int:
    return max(1, self.num_paths // self.replicas)

  def train_batch(self, first_sequence: int, batch_size: int, rows=None) -> dict:
    """Rows `rows` (None = all; data.row_range) of the global batch: path p's rows are sequences
    first/P .. of its shard. In rounds (P > R islands, S = P / R rounds of H steps), step s
    trains round j = (s // H) mod S: island r reads B / R sequences of path r*S + j's shard,
    from where that path's earlier steps left it."""
    P, S = self.num_paths, self.rounds
    rows = row_range(rows, batch_size)
    if S == 1:
      size = batch_size // P
      parts = [self.paths[p].train_batch(first_sequence // P, size, local)
               for p, local in rows_by_part(rows, size)]
    else:
      H, size = self.round_steps, batch_size // self.replicas
      step = first_sequence // batch_size
      cycles, within = divmod(step, H * S)
      j = (step // H) % S
      done = cycles * H + min(max(within - j * H, 0), H)  # steps each path of round j trained
      parts = [self.paths[r * S + j].train_batch(done * size, size, local)
               for r, local in rows_by_part(rows, size)]
    if not parts:
      return self.paths[0].train_batch(0, batch_size, range(0))
    return {f: np.concatenate([b[f] for b in parts]) for f in parts[0]}

  def eval_batches(self, batch_size: int, max_batches: int, path: int = 0, rows=None):
    """Path `path`'s held-out batches, `rows` of each (none when no held-out document is
    routed to it)."""
    if self.paths[path].eval is None:
      return iter(())
    return self.paths[path].eval_batches(batch_size, max_batches, rows)

  def stats(self) -> dict:
    """What was tokenized: every document, up front (routing reads them all)."""
    return self.whole.stats()

  def unigram_entropy(self) -> float:
    return self.whole.unigram_entropy()

  def describe(self) -> dict:
    """Start-record fields: the shards' documents and the router's inputs."""
    return {"outer/shard_documents": list(self.shard_documents),
            "outer/router_documents": self.router_documents,
            "outer/router": {"routing": self.router.routing, **self.router.info}}


def _uniform_scores(texts, num_paths, seed):
  """[N, P] scores ranking the hashed path first, then the next ones in order (overlap)."""
  first = uniform(texts, num_paths, seed)
  return -((np.arange(num_paths)[None] - first[:, None]) % num_paths).astype(np.float64)


def router_split(texts, fraction: float, seed: int) -> np.ndarray:
  """[N] bool: the train documents kept apart as router data (a seeded hash of the text, so
  every run with the same seed and fraction keeps the same ones apart)."""
  salt = f"router:{seed}:".encode()
  return np.array([zlib.crc32(salt + t.encode("utf-8", "replace")) % 10_000 < fraction * 10_000
                   for t in texts], bool)


@dataclasses.dataclass(frozen=True)
class Router:
  """A routing rule, saved with the run (WORKDIR/router.safetensors): its arrays (float32) and
  its inputs (strings)."""
  routing: str
  num_paths: int
  seed: int
  arrays: dict
  info: dict

  @property
  def reads_features(self) -> bool:
    return self.routing != "uniform"

  def scores(self, texts, features=None) -> np.ndarray:
    """[N, P]: how strongly each document goes to each path."""
    if self.routing == "uniform":
      return _uniform_scores(texts, self.num_paths, self.seed)
    a, x = self.arrays, np.asarray(features, np.float64)
    if self.routing == "kmeans":
      scores = -_sq_distances(x, a["centroids"])
    elif self.routing == "product_kmeans":
      scores = product_scores(x, [a["centroids0"], a["centroids1"]])
    else:  # discriminative
      scores = x @ a["weights"].astype(np.float64) + a["offset"]
    return scores + a["bias"]

  def save(self, path):
    """safetensors, no pickle; the inputs as metadata."""
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()} or
              {"none": np.zeros(0, np.float32)}, str(path),
              metadata={**self.info, "routing": self.routing, "paths": str(self.num_paths),
                        "seed": str(self.seed)})


def load_router(path) -> Router:
  from safetensors import safe_open
  if not pathlib.Path(path).exists():
    raise ValueError(f"{path} not found: a DiPaCo run saves its router there when it starts; "
                     "train the run first")
  with safe_open(str(path), "np") as f:
    info = dict(f.metadata())
    arrays = {k: f.get_tensor(k) for k in f.keys() if k != "none"}
  routing, paths, seed = info.pop("routing"), int(info.pop("paths")), int(info.pop("seed"))
  return Router(routing, paths, seed, arrays, info)


def _fit(config, grid, features, router_tokens, tokenizer) -> Router:
  """The router of outer.routing, from the train documents' features (and, discriminative,
  the router documents' tokens and features)."""
  o, seed = config.outer, config.train.seed
  info = {"overlap": str(o.overlap), "router_fraction": str(o.router_fraction)}
  if o.routing == "uniform":
    return Router("uniform", grid.num_paths, seed, {}, info)
  from lcjax.outer import features as features_lib
  info.update(base_from=str(o.base_from), base_step=str(features["base_step"]),
              route_prefix=str(o.route_prefix))
  x = features["train"]
  if o.routing == "kmeans":
    arrays = {"centroids": kmeans(x, grid.num_paths, seed)}
  elif o.routing == "product_kmeans":
    arrays = {f"centroids{i}": c for i, c in enumerate(product_kmeans(x, grid.modules, seed))}
  else:  # discriminative: the path of least loss on each router document
    _check_same_router_data(config)
    step, losses = features_lib.path_losses(config, grid, router_tokens, tokenizer)
    labels = balance_labels(losses)
    weights, offset = fit_logistic(features["router"], labels, grid.num_paths)
    arrays = {"weights": weights, "offset": offset}
    info.update(paths_from=str(o.init_from), paths_step=str(step),
                router_documents=str(len(labels)),
                router_best=",".join(str(n) for n in np.bincount(np.argmin(losses, axis=1),
                                                                 minlength=grid.num_paths)),
                router_labels=",".join(str(n) for n in np.bincount(labels,
                                                                   minlength=grid.num_paths)))
  arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
  unbiased = Router(o.routing, grid.num_paths, seed, {**arrays, "bias": np.zeros(grid.num_paths,
                                                                               np.float32)}, info)
  # A path no train document prefers would have no shard: the bias makes every path the first
  # choice of at least one (balance_bias), and routes held-out documents alike.
  arrays["bias"] = balance_bias(unbiased.scores(None, x), 1).astype(np.float32)
  return Router(o.routing, grid.num_paths, seed, arrays, info)


def _check_same_router_data(config):
  """The paths that label the router documents must never have trained on them."""
  o = config.outer
  theirs = load_router(pathlib.Path(o.init_from) / "router.safetensors")
  if (theirs.info.get("router_fraction"), theirs.seed) != (str(o.router_fraction),
                                                          config.train.seed):
    raise ValueError(f"outer.init_from={o.init_from!r} kept outer.router_fraction="
                     f"{theirs.info.get('router_fraction')} apart with train.seed={theirs.seed}; "
                     "its paths trained on other router documents than this run keeps apart: "
                     "use the same outer.router_fraction and train.seed")


def route_text(config, text: str, router: Router | None = None) -> int:
  """The path a text (a prompt, a document) is routed to: by the run's router (uniform routing
  needs none: the hash of the text decides)."""
  from lcjax.outer import paths as paths_lib
  if router is None:
    router = Router("uniform", paths_lib.grid_of(config).num_paths, config.train.seed, {}, {})
  features = None
  if router.reads_features:
    from lcjax.outer import features as features_lib
    tokenizer = make_tokenizer(config.data)
    features = features_lib.document_features(config, tokenizer, [[tokenizer.encode(text)]])[0]
  return int(np.argmax(router.scores([text], features)[0]))


def build(config, seq_len: int, seed: int, layout=None) -> PathDatasets:
  """The path shards of a DiPaCo run's data (outer.routing)."""
  from lcjax.outer import paths as paths_lib
  o = config.outer
  grid = paths_lib.grid_of(config)
  tokenizer = make_tokenizer(config.data)
  docs, eval_docs = load_documents(config.data)
  apart = router_split(docs, o.router_fraction, seed)
  train_docs = [d for d, a in zip(docs, apart) if not a]
  router_docs = [d for d, a in zip(docs, apart) if a]
  train_tokens, eval_tokens, router_tokens = ([tokenizer.encode(d) for d in part] for part in
                                              (train_docs, eval_docs, router_docs))
  features = {"train": None, "eval": None}
  if o.routing != "uniform":
    from lcjax.outer import features as features_lib
    lists = [train_tokens, eval_tokens] + ([router_tokens] if o.routing == "discriminative" else [])
    *computed, step = features_lib.document_features(config, tokenizer, lists, with_step=True)
    features = {"train": computed[0], "eval": computed[1], "base_step": step,
                "router": computed[2] if len(computed) > 2 else None}
  router = _fit(config, grid, features, router_tokens, tokenizer)
  # stable ranks: ties go to the lower path
  train_paths = np.argsort(-router.scores(train_docs, features["train"]), axis=1,
                           kind="stable")[:, :o.overlap]
  eval_paths = np.argmax(router.scores(eval_docs, features["eval"]), axis=1)
  special = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

  def pack(docs, shuffle):  # held-out (unshuffled) documents are scored after the prefix
    skip = 0 if shuffle else config.data.eval_skip_prefix
    return PackedSequences(docs, seq_len, seed=seed, shuffle=shuffle, skip_prefix=skip, **special)

  shards = []
  for p in range(grid.num_paths):
    train = [t for t, q in zip(train_tokens, train_paths) if p in q]
    held = [t for t, q in zip(eval_tokens, eval_paths) if q == p]
    if not train:
      raise ValueError(f"outer.routing={o.routing!r} routes no train document to "
                       f"path {p}; every path needs a shard: use fewer paths (outer.modules) or "
                       "more data (data.max_documents)")
    shards.append(Datasets(tokenizer, pack(train, True), pack(held, False) if held else None,
                           layout))
  tokenized = ReadCounter(len(docs) + len(eval_docs),
                          sum(len(t.encode("utf-8")) for t in docs + eval_docs))
  whole = Datasets(tokenizer, pack(train_tokens, True), pack(eval_tokens, False), layout,
                   tokenized)
  return PathDatasets(tokenizer, shards, whole,
                      [int(np.sum(train_paths == p)) for p in range(grid.num_paths)], train_paths,
                      router,
                      len(router_docs), config_lib.mesh_size(config.mesh, "replica"), o.inner_steps)
