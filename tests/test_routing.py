"""DiPaCo's routing (lcjax/outer/routing.py, features.py) and its grid (paths.py): the grid's
mixed radix, uniform hashing, k-means and product k-means against direct computations, the
logistic router and the balancing bias, k-means and discriminative routing from real runs,
overlapping shards, the prefix left unscored, the per-document losses that label router data."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax import config as config_lib
from lcjax.outer import paths, routing
from lcjax.train import train_and_evaluate
from conftest import tiny_config, tiny_outer_config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A plain run of the tiny model with its blocks grouped in 2 levels (a 2x2 grid's base)."""
  workdir = tmp_path_factory.mktemp("routing") / "base"
  base = tiny_config()
  base.model.num_levels = 2
  base.train.update(steps=2, eval_every=2, batch_size=8)
  train_and_evaluate(base, workdir)
  return workdir



def test_the_grid_numbers_paths_in_mixed_radix():
  grid = paths.PathGrid((2, 4), paths.parse_private("level1", 2, True))
  assert grid.num_paths == 8
  assert [tuple(grid.index(p, l) for l in range(2)) for p in (0, 1, 4, 7)] == \
      [(0, 0), (0, 1), (1, 0), (1, 3)]
  assert grid.group("levels", 0) == "level0" and grid.group("levels", 1) == "private"
  assert grid.group("embed") == "shared" and grid.group("lm_head") == "shared"
  np.testing.assert_array_equal(grid.paths_through("level0"), [4, 4])
  np.testing.assert_array_equal(grid.paths_through("private"), [1] * 8)
  np.testing.assert_array_equal(grid.table("level0"), [0, 0, 0, 0, 1, 1, 1, 1])
  assert paths.PathGrid((1, 1)).group("levels", 1) == "shared"


def test_uniform_routing_hashes_texts_into_near_equal_shards():
  texts = [f"document {i}" for i in range(400)]
  a = routing.uniform(texts, 4, seed=7)
  np.testing.assert_array_equal(a, routing.uniform(texts, 4, seed=7))
  assert np.bincount(a, minlength=4).min() > 70  # 100 expected each
  assert not np.array_equal(a, routing.uniform(texts, 4, seed=8))
  assert routing.uniform(["document 5"], 4, seed=7)[0] == a[5]  # a prompt routes like its text
  np.testing.assert_array_equal(routing.uniform(texts, 1, seed=7), np.zeros(400))


def _blobs(seed, centers, per=40, spread=0.1):
  rng = np.random.default_rng(seed)
  x = np.concatenate([c + spread * rng.normal(size=(per, len(c))) for c in centers])
  return x, np.repeat(np.arange(len(centers)), per)


def test_kmeans_is_seeded_and_recovers_separated_clusters():
  centers = np.array([[0, 0, 0, 0], [5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 5]], np.float64)
  x, truth = _blobs(0, centers)
  a, b = routing.kmeans(x, 4, seed=3), routing.kmeans(x, 4, seed=3)
  np.testing.assert_array_equal(a, b)
  labels = routing.nearest(x, a)[:, 0]
  # the same partition as the blobs, and each centroid is its blob's mean (the fixed point)
  mapping = {t: labels[truth == t][0] for t in range(4)}
  assert len(set(mapping.values())) == 4
  np.testing.assert_array_equal(labels, [mapping[t] for t in truth])
  for t in range(4):
    np.testing.assert_allclose(a[mapping[t]], x[truth == t].mean(axis=0), rtol=1e-12)
  # nearest() is the brute-force argmin of the distances, and top-2 starts with it
  brute = np.argmin(((x[:, None] - a[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(labels, brute)
  np.testing.assert_array_equal(routing.nearest(x, a, top=2)[:, 0], brute)


def test_product_kmeans_pairs_the_clusters_of_each_half():
  halves = [np.array([[0.0, 0.0], [4.0, 4.0]]), np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])]
  centers = np.array([np.concatenate([h0, h1]) for h0 in halves[0] for h1 in halves[1]])
  x, truth = _blobs(1, centers, per=20)  # blob 3a+b: cluster a of the first half, b of the second
  cents = routing.product_kmeans(x, (2, 3), seed=5)
  paths_of = np.argmax(routing.product_scores(x, cents), axis=1)
  first = routing.nearest(x[:, :2], cents[0])[:, 0]
  second = routing.nearest(x[:, 2:], cents[1])[:, 0]
  np.testing.assert_array_equal(paths_of, first * 3 + second)
  assert len(set(paths_of)) == 6
  for t in range(6):  # each blob lands whole in one cell
    assert len(set(paths_of[truth == t])) == 1


def test_logistic_router_learns_labels_and_its_bias_leaves_no_shard_empty():
  centers = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
  x, truth = _blobs(2, centers, per=30)
  w, b = routing.fit_logistic(x, truth, 3)
  assert np.mean(np.argmax(x @ w + b, axis=1) == truth) > 0.95
  # skewed: path 3 of 4 is nobody's best, path 0 everybody's
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(50, 4)) + np.array([3.0, 0.0, 0.0, -6.0])
  assert np.bincount(np.argmax(logits, axis=1), minlength=4)[3] == 0
  # at the scale of minus squared distances (1e3: a float32 bias rounded to nearest lost the
  # document it was raised to win), with the bias as the router saves it (float32)
  for scale, min_docs in ((1, 1), (1, 5), (1e3, 1), (1e3, 5)):
    bias = routing.balance_bias(logits * scale, min_docs).astype(np.float32)
    counts = np.bincount(np.argmax(logits * scale + bias, axis=1), minlength=4)
    assert counts.min() >= min_docs and counts.sum() == 50
  # paths 1 and 2 both want only document 5 (product k-means' empty cells did this): a bias
  # raised just past the other's would trade it back and forth for ever
  fight = np.array([[0.0, -10.0 - i, -10.1 - i] for i in range(5)] + [[0.0, -1.0, -1.05]])
  bias = routing.balance_bias(fight, 1).astype(np.float32)
  assert np.bincount(np.argmax(fight + bias, axis=1), minlength=3).min() == 1


def test_kmeans_routing_from_a_base_run(tmp_path, base_run):
  """A plain base run; DiPaCo 2x2 routed by k-means and by product k-means of the base model's
  prefix features: the router is saved (safetensors, with its inputs), every path has a shard,
  and every module starts from the base run's parameters."""
  from safetensors.numpy import load_file
  from safetensors import safe_open
  for routing_kind in ("kmeans", "product_kmeans"):
    c = tiny_outer_config("dipaco", modules="2x2", routing=routing_kind, route_prefix=16,
                    base_from=str(base_run))
    c.data.eval_skip_prefix = 16
    c.model.num_levels = 2
    c.train.update(steps=3, eval_every=3)
    run = tmp_path / routing_kind
    train_and_evaluate(c, run)
    arrays = load_file(str(run / "router.safetensors"))
    with safe_open(str(run / "router.safetensors"), "np") as f:
      info = f.metadata()
    assert info["routing"] == routing_kind and info["base_step"] == "2"
    assert info["route_prefix"] == "16"
    shapes = {k: v.shape for k, v in arrays.items()}
    assert shapes == ({"centroids": (4, 32), "bias": (4,)} if routing_kind == "kmeans" else
                      {"centroids0": (2, 16), "centroids1": (2, 16), "bias": (4,)})
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    start = records[0]
    assert start["step"] == 2  # it goes on from the base run's step
    tokens = start["outer/shard_tokens"]
    assert len(tokens) == 4 and min(tokens) > 0
    assert any("eval/loss" in r for r in records)


def test_overlap_puts_each_train_document_in_two_shards_and_evaluates_it_in_one():
  c = config_lib.validate(tiny_outer_config("dipaco", modules="4", overlap=2))
  one = routing.build(config_lib.validate(tiny_outer_config("dipaco", modules="4")), 32, 0)
  two = routing.build(c, 32, 0)
  n = sum(one.shard_documents)
  assert sum(two.shard_documents) == 2 * n  # each train document in two shards
  assert [d.eval.num_pairs for d in two.paths] == [d.eval.num_pairs for d in one.paths]
  # the second shard of a document is the next path after its own
  texts = [f"doc {i}" for i in range(50)]
  scores = routing._uniform_scores(texts, 4, 0)
  first = routing.uniform(texts, 4, 0)
  ranked = np.argsort(-scores, axis=1, kind="stable")[:, :2]
  np.testing.assert_array_equal(ranked[:, 0], first)
  np.testing.assert_array_equal(ranked[:, 1], (first + 1) % 4)


def test_eval_skip_prefix_leaves_each_documents_first_targets_unscored():
  from lcjax.data import PackedSequences
  rng = np.random.default_rng(0)
  docs = [rng.integers(3, 50, size=n).astype(np.int32) for n in (3, 20, 7, 41)]
  special = dict(bos_id=1, eos_id=2, pad_id=0, seed=0, shuffle=False)
  for skip in (0, 5):
    packed = PackedSequences(docs, 16, skip_prefix=skip, **special)  # documents span sequences
    scored = sum(int(packed.sequence(g)["loss_mask"].sum()) for g in range(packed.num_sequences))
    assert scored == sum(max(0, len(d) + 1 - skip) for d in docs)
  first = PackedSequences(docs, 16, skip_prefix=5, **special).sequence(0)
  # document 0 (4 targets) is wholly unscored, document 1 from its 6th target on
  np.testing.assert_array_equal(first["loss_mask"][:4], 0)
  np.testing.assert_array_equal(first["loss_mask"][4:9], 0)
  np.testing.assert_array_equal(first["loss_mask"][9:16], 1)


def test_document_losses_match_one_document_at_a_time():
  from flax import nnx
  from lcjax.model import ModelConfig, create
  from lcjax.outer import features
  cfg = ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64)
  model = create(cfg, 3)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(1)
  docs = [rng.integers(3, 64, size=n).astype(np.int32) for n in (1, 5, 12, 30, 9)] * 15
  length = 12
  mesh = features.local_mesh()
  with jax.set_mesh(mesh):
    got = features.document_losses(cfg, params, mesh, docs, length, bos_id=1, pad_id=0)
  for doc, loss in zip(docs[:5], got[:5]):
    tokens = np.concatenate([[1], doc[:length]]).astype(np.int32)
    n = len(tokens) - 1
    logits = model(jnp.asarray(tokens[None, :n]), jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
    nll = -jax.nn.log_softmax(logits[0], -1)[jnp.arange(n), tokens[1:]]
    np.testing.assert_allclose(loss, float(jnp.mean(nll)), rtol=1e-5)
  np.testing.assert_allclose(got[5:10], got[:5], rtol=1e-6)  # a row's batch does not matter


def test_discriminative_routing_from_a_kmeans_run(tmp_path, base_run):
  """base -> k-means DiPaCo 2x2 keeping router documents apart -> discriminative DiPaCo from
  it: the logistic router is fitted on the router documents labelled by the k-means run's
  paths, saved with its inputs, every path keeps a shard, the run goes on from the k-means
  run's whole state; a train document's text routes to the shard it was put in; a k-means run
  that kept other documents apart is refused."""
  from safetensors.numpy import load_file

  def dipaco_config(**outer):
    c = tiny_outer_config("dipaco", modules="2x2", route_prefix=16, base_from=str(base_run),
                    **outer)
    c.data.update(eval_skip_prefix=16, max_documents=60)
    c.model.num_levels = 2
    return c

  kmeans = dipaco_config(routing="kmeans", router_fraction=0.3)
  kmeans.train.update(steps=4, eval_every=4)
  train_and_evaluate(kmeans, tmp_path / "kmeans")
  disc = dipaco_config(routing="discriminative", router_fraction=0.3,
                       init_from=str(tmp_path / "kmeans"))
  disc.train.update(steps=6, eval_every=6)
  run = tmp_path / "disc"
  train_and_evaluate(disc, run)
  router = routing.load_router(run / "router.safetensors")
  assert router.routing == "discriminative"
  assert {k: v.shape for k, v in router.arrays.items()} == {"weights": (32, 4), "offset": (4,),
                                                            "bias": (4,)}
  labels = [int(n) for n in router.info["router_labels"].split(",")]
  assert router.info["paths_from"] == str(tmp_path / "kmeans") and router.info["paths_step"] == "4"
  records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  start = records[0]
  assert start["step"] == 4  # the k-means run's whole state goes on
  assert sum(labels) == start["outer/router_documents"] > 0
  assert min(start["outer/shard_documents"]) > 0
  assert sum(start["outer/shard_documents"]) + start["outer/router_documents"] == 60
  assert start["outer/router"]["routing"] == "discriminative"
  data = routing.build(config_lib.validate(disc), 32, 0)
  docs, _ = routing.load_documents(config_lib.validate(disc).data)
  kept = [d for d, apart in zip(docs, routing.router_split(docs, 0.3, 0)) if not apart]
  assert routing.route_text(config_lib.validate(disc), kept[0], router) == data.train_paths[0, 0]
  other = dipaco_config(routing="discriminative", router_fraction=0.2,
                        init_from=str(tmp_path / "kmeans"))
  with pytest.raises(ValueError, match=r"kept outer.router_fraction=0.3 apart"):
    train_and_evaluate(other, tmp_path / "other")



def test_balance_labels_gives_every_path_the_document_that_loses_least():
  losses = np.array([[1.0, 3.0, 5.0], [1.0, 1.5, 5.0], [2.0, 9.0, 2.1], [0.5, 4.0, 6.0]])
  # path 0 is best everywhere; path 1 takes document 1 (gap 0.5), path 2 document 2 (gap 0.1)
  np.testing.assert_array_equal(routing.balance_labels(losses), [0, 1, 2, 0])
  np.testing.assert_array_equal(routing.balance_labels(-np.eye(3)), [0, 1, 2])
