"""Tiny random Hugging Face models and what `transformers` computes with them, for tests/test_hf.py.

  python scripts/make_hf_fixtures.py              # (re)writes tests/fixtures/hf/<name>/
  python scripts/make_hf_fixtures.py --check DIR  # DIR (lcjax's save_pretrained) in transformers
                                                  # and in lcjax: the same logits?

Needs torch and transformers, which CI does not install (the tests read what this wrote):
`.venv/bin/pip install torch transformers`. Each fixture holds config.json, the safetensors
(qwen2's sharded with an index, mistral's in bfloat16), a small BPE tokenizer.json, and
input_ids.npy [2, 16], logits.npy [2, 16, V] float32, loss.npy (transformers' mean next-token
loss over both rows) and greedy.npy (the 6 tokens `generate` continues row 0 with, greedily).
Every weight is random, norms and biases included, so that each one is exercised; the seed is
kept only if every greedy step's best logit beats the second by more than MARGIN, so that the
tokens cannot flip on rounding.
"""
import argparse
import os
import pathlib
import sys
import sysconfig

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "hf"
VOCAB, TOKENIZER_VOCAB, SEQ, NEW_TOKENS, MARGIN = 320, 300, 16, 6, 1e-3
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
FIXTURES = {  # name: (config, how it is saved)
    # Llama 2 style, with linear RoPE scaling (position interpolation) and an untied head
    "llama": (transformers.LlamaConfig(**COMMON, rms_norm_eps=1e-5, max_position_embeddings=64,
                                       rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 10000.0}), {}),
    # Llama 3.2 style: llama3 RoPE scaling with all three bands at D=16 (wavelengths 6, 33,
    # 168, ... against 64/4 and 64/1), tied embeddings, head_dim 16 != hidden 32 / 4 heads, GQA 4:1
    "llama3": (transformers.LlamaConfig(
        **{**COMMON, "num_key_value_heads": 1}, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=512, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), {}),
    # Qwen2.5: q/k/v biases, YaRN RoPE (ramp over dimensions 0-2 of 4 at D=8, attention
    # factor 0.1 ln 4 + 1); saved as shards with model.safetensors.index.json
    "qwen2": (transformers.Qwen2Config(**COMMON, max_position_embeddings=16384, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
        "original_max_position_embeddings": 4096}), {"max_shard_size": "60KB"}),
    # Mistral: a sliding window (5) shorter than the sequence (16); weights in bfloat16
    "mistral": (transformers.MistralConfig(**COMMON, sliding_window=5), {"bfloat16": True}),
}


def _tokenizer():
  """A byte-level BPE of TOKENIZER_VOCAB tokens trained on a few standard-library files."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  files = [str(pathlib.Path(sysconfig.get_paths()["stdlib"]) / f) for f in
           ("textwrap.py", "string.py", "glob.py")]
  tok.train(files, trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB,
                                       special_tokens=["<pad>", "<s>", "</s>"],
                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def _randomize(model, seed):
  """Every parameter random: weights ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), biases
  N(0, 0.1^2)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name:
        p.copy_(1 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(noise / p.shape[-1] ** 0.5)


def _greedy(model, ids):
  """`generate`'s greedy continuation of ids [1, T], checked against full recomputation; and
  the smallest gap between the best and second-best logit on the way."""
  out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                       do_sample=False, eos_token_id=None,
                       pad_token_id=0, top_k=None, top_p=None)[0, ids.shape[1]:]
  seq, gap = ids, np.inf
  with torch.no_grad():
    for _ in range(NEW_TOKENS):
      top2 = model(seq).logits[0, -1].topk(2).values
      gap = min(gap, float(top2[0] - top2[1]))
      seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
  assert torch.equal(seq[0, ids.shape[1]:], out), (seq, out)
  return out.numpy().astype(np.int32), gap


def make(name, config, how, tokenizer):
  config._attn_implementation = "eager"
  for seed in range(100):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, seed)
    if how.get("bfloat16"):  # bf16-representable weights: the bf16 file holds them exactly
      with torch.no_grad():
        for p in model.parameters():
          p.copy_(p.to(torch.bfloat16).float())
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
      out = model(ids, labels=ids)
    greedy, gap = _greedy(model, ids[:1])
    if gap > MARGIN:
      break
  directory = OUT / name
  directory.mkdir(parents=True, exist_ok=True)
  for old in directory.iterdir():
    old.unlink()
  saved = model.to(torch.bfloat16) if how.get("bfloat16") else model
  saved.save_pretrained(directory, max_shard_size=how.get("max_shard_size", "5GB"))
  tokenizer.save(str(directory / "tokenizer.json"))
  np.save(directory / "input_ids.npy", ids.numpy().astype(np.int32))
  np.save(directory / "logits.npy", out.logits.numpy().astype(np.float32))
  np.save(directory / "loss.npy", np.float32(out.loss))
  np.save(directory / "greedy.npy", greedy)
  size = sum(f.stat().st_size for f in directory.iterdir())
  print(f"{name}: seed {seed}, greedy {greedy.tolist()} (smallest top-2 gap {gap:.4f}), "
        f"loss {float(out.loss):.4f}, {size / 1024:.0f} KiB in {directory}")


def check(directory) -> float:
  """Relative error (norm) between transformers' and lcjax's logits for a model directory."""
  sys.path.insert(0, str(ROOT))
  import jax.numpy as jnp
  from flax import nnx
  from lcjax import hf
  from lcjax import model as model_lib
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager").eval()
  model_cfg, params = hf.load_pretrained(directory)
  ids = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (2, 24)).astype(np.int32)
  with torch.no_grad():
    expected = hf_model(torch.from_numpy(ids).long()).logits.numpy()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.create(model_cfg, 0)))
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  got = np.asarray(nnx.merge(graphdef, params)(ids, positions, jnp.ones_like(positions)))
  error = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
  print(f"{directory}: transformers {transformers.__version__} loads it "
        f"({type(hf_model).__name__}); logits relative error vs lcjax {error:.2e}")
  return error


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", nargs="+", help="model directories written by save_pretrained")
  args = parser.parse_args()
  if args.check:
    errors = [check(d) for d in args.check]
    return 0 if max(errors) < 1e-5 else 1
  tokenizer = _tokenizer()
  for name, (config, how) in FIXTURES.items():
    make(name, config, how, tokenizer)
  return 0


if __name__ == "__main__":
  sys.exit(main())
