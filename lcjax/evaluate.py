"""Long-context evaluation: `python -m lcjax.evaluate --workdir=DIR` (a run's latest checkpoint)
or `--hf=DIR` (a Hugging Face model directory).

(a) Held-out loss by position: the run's held-out sequences (an HF model: the default corpus's
held-out files in its tokenizer), each target's cross-entropy put in the bucket of its position
within its document ([0, 1), [1, 2), [2, 4), ... up to seq_len); the token-weighted mean of the
buckets is the run's eval/loss over the same batches.
(b) Passkey retrieval (lcjax/passkey.py) at each length and depth, generated greedily with the
KV-cache generator.
Prints both tables, writes them to OUT/evaluate.json and plots them in OUT/evaluate.png.
"""
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from lcjax import cli
from lcjax import generate as generate_lib
from lcjax import mesh as mesh_lib
from lcjax import model as model_lib
from lcjax import parts as parts_lib
from lcjax import passkey


def bucket_edges(seq_len: int) -> list:
  """[0, 1, 2, 4, ..., seq_len]: bucket k holds positions edges[k] <= p < edges[k + 1]."""
  edges = [0, 1]
  while edges[-1] * 2 < seq_len:
    edges.append(edges[-1] * 2)
  return edges + [seq_len] if edges[-1] < seq_len else edges


def loss_by_position(model_cfg, mesh, params, batches, seq_len: int) -> dict:
  """{"edges", "loss" per bucket (None where empty), "tokens" per bucket, "overall"} over the
  loss-masked targets of `batches` (host batches in natural order, as data.eval_batches)."""
  edges = bucket_edges(seq_len)
  model_cfg = dataclasses.replace(model_cfg, sp_strategy=None)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.create(model_cfg, 0)))
  uppers = jnp.asarray(edges[1:-1], jnp.int32)

  @jax.jit
  def sums(params, batch):
    ce_BT = nnx.merge(graphdef, params).token_losses(batch)
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    bucket_BT = jnp.searchsorted(uppers, batch["positions"], side="right")
    total = lambda x: jax.ops.segment_sum(x.ravel(), bucket_BT.ravel(), len(edges) - 1)
    return total(ce_BT * mask_BT), total(mask_BT)

  sharding = mesh_lib.batch_sharding(mesh)
  per_batch = jax.device_get([sums(params, parts_lib.device_batch(b, sharding)) for b in batches])
  loss = np.sum([np.asarray(s, np.float64) for s, _ in per_batch], axis=0)
  tokens = np.sum([np.asarray(c, np.float64) for _, c in per_batch], axis=0)
  return {"edges": edges, "loss": [s / c if c else None for s, c in zip(loss, tokens)],
          "tokens": tokens.tolist(), "overall": float(loss.sum() / max(tokens.sum(), 1.0))}


def kv_generate_fn(model_cfg, mesh, params, tokenizer):
  """passkey's generate_fn: greedy continuations of a batch of prompts with the KV cache."""
  def generate(prompts, num_tokens):
    generator = generate_lib.Generator(
        model_cfg, mesh, batch_size=len(prompts), cache_len=max(map(len, prompts)) + num_tokens,
        vocab_limit=tokenizer.vocab_size)
    result = generator.generate(params, prompts, num_tokens, eos_id=tokenizer.eos_id)
    return [tokenizer.decode(tokens) for tokens in result.tokens]
  return generate


def report(results: dict) -> str:
  """The two tables as text."""
  losses, keys = results["loss_by_position"], results["passkey"]
  lines = ["held-out loss by position in the document", "positions        tokens    loss"]
  for lo, hi, n, loss in zip(losses["edges"], losses["edges"][1:], losses["tokens"],
                             losses["loss"]):
    lines.append(f"[{lo:>6}, {hi:>6})  {int(n):>8}  " + ("-" if loss is None else f"{loss:.4f}"))
  lines.append(f"all              {int(sum(losses['tokens'])):>8}  {losses['overall']:.4f}")
  if keys["lengths"]:
    lines += ["", f"passkey accuracy ({keys['trials']} trials per cell), rows: prompt length",
              "length (tokens)  " + "  ".join(f"depth {d:<4}" for d in keys["depths"])]
    for length, tokens, row in zip(keys["lengths"], keys["prompt_tokens"], keys["accuracy"]):
      lines.append(f"{length:>6} ({tokens:>6})  " + "  ".join(f"{a:>10.2f}" for a in row))
  return "\n".join(lines)


def plot(results: dict, path):
  """Loss per position bucket (left) and the passkey accuracy heatmap (right), as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  losses, keys = results["loss_by_position"], results["passkey"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  edges = losses["edges"]
  kept = [(hi, loss) for hi, loss in zip(edges[1:], losses["loss"]) if loss is not None]
  left.plot([hi for hi, _ in kept], [loss for _, loss in kept], "o-")
  left.set(xscale="log", xlabel="position in document (bucket's upper edge)",
           ylabel="held-out loss (nats/token)", title="loss by position")
  if keys["lengths"]:
    image = right.imshow(np.asarray(keys["accuracy"]), vmin=0, vmax=1, cmap="viridis",
                         aspect="auto")
    right.set(xticks=range(len(keys["depths"])), xticklabels=keys["depths"],
              yticks=range(len(keys["lengths"])), yticklabels=keys["lengths"],
              xlabel="key depth", ylabel="prompt length (tokens)", title="passkey accuracy")
    fig.colorbar(image, ax=right)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _workdir_inputs(workdir):
  """(model_cfg, mesh, params, tokenizer, datasets, run config) of a run's latest checkpoint;
  the held-out data in natural order (no sequence layout)."""
  from lcjax import data as data_lib
  from lcjax import sample as sample_lib
  config = ml_collections.ConfigDict(cli.read_json(
      pathlib.Path(workdir) / "config.json", "--workdir must be a directory that lcjax trained in",
      "it is the run's record of its config, written by lcjax.main"))
  with sample_lib.workdir_params(workdir) as (prepared, params):
    datasets = data_lib.build(prepared.config.data, config.train.seq_len, config.train.seed)
    return prepared.model_cfg, prepared.mesh, params, prepared.tokenizer, datasets, config


def _hf_inputs(path, seq_len: int, max_documents: int):
  from lcjax import config as config_lib
  from lcjax import data as data_lib
  from lcjax import hf
  local = ml_collections.ConfigDict(
      {"replica": 1, "data": -1, "fsdp": 1, "ring": 1, "ulysses": 1, "tensor": 1})
  mesh = mesh_lib.make_mesh(local)
  model_cfg, params = hf.load_pretrained(path, mesh)
  config = config_lib.base_config()
  config.train.update(seq_len=seq_len, batch_size=jax.device_count())
  config.data.update(tokenizer="hf", tokenizer_path=str(pathlib.Path(path) / "tokenizer.json"),
                     max_documents=max_documents)
  datasets = data_lib.build(config.data, seq_len, config.train.seed)
  return model_cfg, mesh, params, datasets.tokenizer, datasets, config


def evaluate(model_cfg, mesh, params, tokenizer, datasets, *, seq_len, batch_size, eval_batches,
             lengths, depths, trials, seed=0) -> dict:
  """Both evaluations of one model: {"loss_by_position", "passkey"}."""
  losses = loss_by_position(model_cfg, mesh, params,
                            datasets.eval_batches(batch_size, eval_batches), seq_len)
  keys = passkey.evaluate(kv_generate_fn(model_cfg, mesh, params, tokenizer), tokenizer,
                          lengths, depths, trials=trials, seed=seed)
  return {"loss_by_position": losses, "passkey": keys}


def _numbers(text: str, kind, name: str) -> list:
  try:
    return [kind(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--{name}={text!r} must be a comma-separated list of numbers") from None


def _main(argv):
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "a training run's directory", flag_values=fv)
  flags.DEFINE_string("hf", None, "a Hugging Face model directory (instead of --workdir)",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "where evaluate.json/png go (default: the directory read)",
                      flag_values=fv)
  flags.DEFINE_integer("seq_len", 0, "held-out sequence length (default: the run's; --hf: 256)",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 0, "held-out batch (default: the run's train.batch_size)",
                       flag_values=fv)
  flags.DEFINE_integer("eval_batches", -1, "held-out batches; 0 = all (default: the run's)",
                       flag_values=fv)
  flags.DEFINE_integer("max_documents", 1000, "--hf: documents read from the corpus",
                       flag_values=fv)
  flags.DEFINE_string("passkey_lengths", "", "prompt lengths in tokens (default: seq_len/4, "
                      "seq_len/2, seq_len); 0 = no passkey", flag_values=fv)
  flags.DEFINE_string("passkey_depths", "0,0.25,0.5,0.75,1", "relative depths of the key",
                      flag_values=fv)
  flags.DEFINE_integer("passkey_trials", 2, "keys per length and depth", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the passkeys", flag_values=fv)
  cli.parse_flags(fv, argv, doc=__doc__)
  if (fv.workdir is None) == (fv.hf is None):
    raise ValueError("give exactly one of --workdir=DIR (a training run) or --hf=DIR (a Hugging "
                     "Face model directory)")
  if fv.workdir is not None:
    model_cfg, mesh, params, tokenizer, datasets, config = _workdir_inputs(fv.workdir)
    if fv.seq_len and fv.seq_len != config.train.seq_len:
      from lcjax import data as data_lib
      datasets = data_lib.build(config.data, fv.seq_len, config.train.seed)
  else:
    model_cfg, mesh, params, tokenizer, datasets, config = _hf_inputs(
        fv.hf, fv.seq_len or 256, fv.max_documents)
  seq_len = fv.seq_len or config.train.seq_len
  lengths = (_numbers(fv.passkey_lengths, int, "passkey_lengths") if fv.passkey_lengths
             else [seq_len // 4, seq_len // 2, seq_len])
  lengths = [n for n in lengths if n > 0]
  depths = _numbers(fv.passkey_depths, float, "passkey_depths")
  if any(not 0 <= d <= 1 for d in depths):
    raise ValueError(f"--passkey_depths must lie in [0, 1]; got {depths}")
  results = evaluate(model_cfg, mesh, params, tokenizer, datasets, seq_len=seq_len,
                     batch_size=fv.batch_size or config.train.batch_size,
                     eval_batches=(config.train.eval_batches if fv.eval_batches < 0
                                   else fv.eval_batches),
                     lengths=lengths, depths=depths, trials=fv.passkey_trials, seed=fv.seed)
  out = pathlib.Path(fv.out or fv.workdir or fv.hf)
  out.mkdir(parents=True, exist_ok=True)
  (out / "evaluate.json").write_text(json.dumps(results, indent=2) + "\n")
  plot(results, out / "evaluate.png")
  print(report(results))
  print(f"[lcjax] wrote {out / 'evaluate.json'} and {out / 'evaluate.png'}", file=sys.stderr)


def main(argv=None) -> int:
  return cli.run(_main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
