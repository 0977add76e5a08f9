"""KV-cache generation (lcjax/generate.py, lcjax/model/cache.py) against full recomputation and
against transformers: every fixture's greedy tokens equal transformers' exactly (llama: linear
RoPE; llama3: llama3 RoPE, GQA 4:1; qwen2: q/k/v biases + YaRN; mistral: GQA + a window of 5
over 22 tokens; llama in 2 levels), and the logits of every prefill and decode step are those of
a full forward over the prefix. Then: rows of different lengths in one sharded batch, a sliding
refill, top-p and temperature sampling, and bad inputs."""
import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lcjax import generate as generate_lib
from lcjax import hf
from lcjax import mesh as mesh_lib
from lcjax.model import cache as cache_lib
from conftest import full_forward

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"
WINDOW = 24
CASES = {"llama": 1, "llama3": 1, "qwen2": 1, "mistral": 1, "llama_2_levels": 2}


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh(ml_collections.ConfigDict(
      {"replica": 1, "data": -1, "fsdp": 1, "ring": 1, "ulysses": 1, "tensor": 1}))


@pytest.fixture(scope="module")
def loaded(mesh):
  """{case: (model_cfg, params on the mesh)}, loaded once."""
  return {case: hf.load_pretrained(FIXTURES / case.split("_")[0], mesh, num_levels=levels)
          for case, levels in CASES.items()}


@functools.cache
def _generator(model_cfg, mesh, batch_size, cache_len, temperature=0.0, top_p=1.0):
  return generate_lib.Generator(model_cfg, mesh, batch_size=batch_size, cache_len=cache_len,
                                temperature=temperature, top_p=top_p)


def _last_logits(model_cfg, params, tokens):
  """A full forward's logits [V] at the last of `tokens`: one compiled window of WINDOW tokens
  serves every prefix (causal: the padding after it changes nothing)."""
  window = np.zeros((1, WINDOW), np.int32)
  window[0, :len(tokens)] = tokens
  return np.asarray(full_forward(model_cfg)(params, window))[0, len(tokens) - 1]


def _assert_steps_match_full_forward(model_cfg, params, prompt, result, row=0):
  """Each step's logits are a full forward's at the last token of prompt + tokens so far."""
  tokens = list(prompt) + result.tokens[row]
  for i, step_logits in enumerate(result.logits):
    np.testing.assert_allclose(step_logits[row],
                               _last_logits(model_cfg, params, tokens[:len(prompt) + i]),
                               rtol=1e-5, atol=1e-5, err_msg=f"step {i}")


@pytest.mark.parametrize("case", CASES)
def test_greedy_equals_transformers_and_full_recomputation(case, loaded, mesh):
  model_cfg, params = loaded[case]
  name = case.split("_")[0]
  want = np.load(FIXTURES / name / "greedy.npy").tolist()
  prompt = np.load(FIXTURES / name / "input_ids.npy")[0].tolist()
  if name == "mistral":
    assert model_cfg.sliding_window < len(prompt) and model_cfg.num_kv_heads < model_cfg.num_heads
  generator = _generator(model_cfg, mesh, 1, len(prompt) + len(want))
  result = generator.generate(params, [prompt], len(want), keep_logits=True)
  assert result.tokens[0] == want
  _assert_steps_match_full_forward(model_cfg, params, prompt, result)


def test_rows_of_different_lengths_on_a_sharded_batch(loaded, mesh):
  """8 rows over data=8, each prompt its own length: each row as it would be alone, and the
  cache's batch split over the devices."""
  model_cfg, params = loaded["qwen2"]
  ids = np.load(FIXTURES / "qwen2" / "input_ids.npy")
  prompts = [ids[b % 2, :16 - b].tolist() for b in range(8)]
  generator = _generator(model_cfg, mesh, 8, 22)
  result = generator.generate(params, prompts, 6, keep_logits=True)
  for b, prompt in enumerate(prompts):
    _assert_steps_match_full_forward(model_cfg, params, prompt, result, row=b)
  assert result.tokens[0] == np.load(FIXTURES / "qwen2" / "greedy.npy").tolist()
  window = np.zeros((8, 22), np.int32)
  _, _, cache = generator._prefill(params, generator._put(window, generator.window),
                                   generator._put(np.ones(8), generator.rows), jax.random.key(0))
  k = cache[0][0]
  assert k.shape == cache_lib.cache_shape(model_cfg, 8, 22)
  assert k.sharding.spec[1] == "data" and k.addressable_shards[0].data.shape[1] == 1


def test_a_full_cache_slides_its_window(loaded, mesh):
  """Cache of 8 tokens, 12 generated after 6: the prefill fills slots 0-5, steps fill 6 and 7,
  then the last 4 tokens are prefilled again at positions 0-3 (as the windowed sampler did)."""
  model_cfg, params = loaded["llama"]
  prompt = np.load(FIXTURES / "llama" / "input_ids.npy")[0, :6].tolist()
  result = _generator(model_cfg, mesh, 1, 8).generate(params, [prompt], 12, keep_logits=True)
  tokens = prompt + result.tokens[0]
  start = 0
  for i, step_logits in enumerate(result.logits):
    end = len(prompt) + i  # the tokens before step i's
    if end - start > 8:
      start = end - 4
    np.testing.assert_allclose(step_logits[0], _last_logits(model_cfg, params, tokens[start:end]),
                               rtol=1e-5, atol=1e-5, err_msg=f"step {i}")


def test_top_p_near_zero_is_greedy_and_temperature_sampling_is_seeded(loaded, mesh):
  model_cfg, params = loaded["llama3"]
  prompt = np.load(FIXTURES / "llama3" / "input_ids.npy")[1].tolist()
  greedy = _generator(model_cfg, mesh, 1, 22).generate(params, [prompt], 6).tokens
  nucleus = _generator(model_cfg, mesh, 1, 22, 1.0, 1e-6)
  assert nucleus.generate(params, [prompt], 6, seed=3).tokens == greedy
  hot = _generator(model_cfg, mesh, 1, 22, 1.5)
  draws = [hot.generate(params, [prompt], 6, seed=s).tokens for s in (0, 0, 1)]
  assert draws[0] == draws[1] and draws[0] != draws[2]


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.array([[0.1, 0.5, 0.3, 0.1]]))
  for p, allowed in ((0.5, {1}), (0.6, {1, 2}), (0.75, {1, 2}), (0.85, {0, 1, 2}), (0.95, {0, 1, 2, 3})):
    drawn = {int(generate_lib.sample_logits(logits, jax.random.key(s), temperature=1.0,
                                            top_p=p, vocab_limit=4)[0]) for s in range(64)}
    assert drawn == allowed, p
  # (0.85: of the two tokens at 0.1, the lower id comes first, as argmax takes it)
  # ids past the tokenizer's vocabulary (the model's padding) are never drawn
  assert int(generate_lib.sample_logits(logits, jax.random.key(0), temperature=0, top_p=1.0,
                                        vocab_limit=1)[0]) == 0


@pytest.mark.parametrize("temperature, top_p, match", [
    (-1.0, 1.0, "temperature must be a finite number >= 0"),
    (float("nan"), 1.0, "temperature must be a finite number >= 0"),
    (1.0, 0.0, r"top_p must be in \(0, 1\]"),
    (1.0, 1.5, r"top_p must be in \(0, 1\]")])
def test_bad_sampling_settings_are_one_line(temperature, top_p, match, loaded, mesh):
  with pytest.raises(ValueError, match=match) as error:
    generate_lib.Generator(loaded["llama"][0], mesh, batch_size=1, cache_len=8,
                           temperature=temperature, top_p=top_p)
  assert "\n" not in str(error.value)
