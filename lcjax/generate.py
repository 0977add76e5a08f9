"""Text generation with a KV cache: one prefill of the prompts, then one jitted step per token.

`Generator(model_cfg, mesh, batch_size, cache_len, ...)` compiles two programs once: the prefill
of a [B, S] window (prompts padded to the cache length S, so any prompt length reuses it) and the
decode step (token and position per row as arguments, the cache donated and updated in place).
Neither recompiles per token or per prompt. The cache is [L, B, S, K, D] per level (model/cache.py),
its batch sharded over the mesh's batch axes like the activations, its kv heads over `tensor`.

When a row's position reaches S the window slides, as the windowed sampler before it did: the
last S/2 tokens of every row are prefilled again at positions 0.. (the positions training saw).
Sampling: greedy (temperature 0), temperature, and top-p (nucleus: the smallest set of most
likely tokens whose probability reaches p, Holtzman et al. 2019, arXiv 1904.09751).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax import mesh as mesh_lib
from lcjax import model as model_lib
from lcjax.model import cache as cache_lib


def check_sampling(temperature: float, top_p: float):
  """ValueError in one line for a temperature or top_p a sampler cannot use."""
  if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
          and temperature >= 0):
    raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature}")
  if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise ValueError(f"top_p must be in (0, 1] (1 = off); got {top_p}")


def sample_logits(logits_BV, key, *, temperature: float, top_p: float, vocab_limit: int):
  """Token ids [B] drawn from logits [B, V]: ids >= vocab_limit (the model's padded vocabulary)
  never; temperature 0 = argmax; top_p < 1 keeps the smallest set of most likely tokens whose
  probability reaches top_p (the most likely token always)."""
  logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_p < 1:
    order_BV = jnp.argsort(-logits_BV, axis=-1)  # stable: ties keep the lower id first, as argmax
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # probability of the tokens ahead
    sorted_BV = jnp.where(before_BV < top_p, sorted_BV, -jnp.inf)
    choice_B = jax.random.categorical(key, sorted_BV, axis=-1)
    return jnp.take_along_axis(order_BV, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Result:
  tokens: list          # per row: the generated ids (up to and without EOS)
  logits: list          # per step: the [B, V] float32 logits the step's token was drawn from


class Generator:
  """Compiled prefill and decode step for `batch_size` rows and a cache of `cache_len` tokens."""

  def __init__(self, model_cfg, mesh, *, batch_size: int, cache_len: int,
               temperature: float = 0.0, top_p: float = 1.0, vocab_limit: int | None = None):
    check_sampling(temperature, top_p)
    if cache_len < 2:
      raise ValueError(f"cache_len must be at least 2 tokens; got {cache_len}")
    # Decoding sees one sequence in natural order: no sequence parallelism, no remat; MsT
    # chunks still cut the prefill's MLP (at most one token per chunk).
    self.model_cfg = dataclasses.replace(model_cfg, sp_strategy=None, remat="none",
                                         mlp_chunks=min(model_cfg.mlp_chunks, cache_len))
    self.batch_size, self.cache_len, self.mesh = batch_size, cache_len, mesh
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.create(self.model_cfg, 0)))
    sample = lambda logits, key: sample_logits(
        logits, key, temperature=temperature, top_p=top_p,
        vocab_limit=vocab_limit or self.model_cfg.vocab_size)
    shape = cache_lib.cache_shape(self.model_cfg, batch_size, cache_len)
    cache_sharding = mesh_lib.logical_sharding(shape, cache_lib.CACHE_AXES, mesh)
    self.rows = mesh_lib.logical_sharding((batch_size,), ("batch",), mesh)
    self.window = mesh_lib.logical_sharding((batch_size, cache_len), ("batch", None), mesh)
    caches = [(cache_sharding, cache_sharding)] * self.model_cfg.num_levels
    outputs = (self.rows, mesh_lib.replicated(mesh), caches)

    def prefill(params, tokens_BS, lengths_B, key):
      logits_BV, cache = cache_lib.prefill(nnx.merge(graphdef, params), tokens_BS, lengths_B)
      return sample(logits_BV, key), logits_BV, cache

    def step(params, tokens_B, pos_B, cache, key):
      logits_BV, cache = cache_lib.decode(nnx.merge(graphdef, params), tokens_B, pos_B, cache)
      return sample(logits_BV, key), logits_BV, cache

    self._prefill = jax.jit(prefill, out_shardings=outputs)
    self._step = jax.jit(step, out_shardings=outputs, donate_argnames="cache")

  def _put(self, x, sharding):
    with jax.transfer_guard_host_to_device("allow"):
      return jax.device_put(np.asarray(x, np.int32), sharding)

  def generate(self, params, prompts, num_tokens: int, *, seed: int = 0, eos_id=None,
               keep_logits: bool = False) -> Result:
    """Continues each prompt (a list of token ids, at least one) by up to num_tokens tokens;
    a row stops at eos_id. Step i draws with jax.random.fold_in(key(seed), i)."""
    B, S = self.batch_size, self.cache_len
    if len(prompts) != B or any(len(p) < 1 for p in prompts):
      raise ValueError(f"generate needs {B} prompts of at least one token each; got "
                       f"{[len(p) for p in prompts]}")
    rows = [list(map(int, p)) for p in prompts]
    out, logits, done = [[] for _ in rows], [], np.zeros(B, bool)
    key, pos, cache, token = jax.random.key(seed), None, None, None
    for i in range(num_tokens):
      step_key = jax.random.fold_in(key, i)
      if pos is None or pos.max() >= S:  # first window, or the cache is full: (re)fill it
        keep = S if pos is None else S // 2
        recent = [r[-keep:] for r in rows]
        window = np.zeros((B, S), np.int32)
        for b, r in enumerate(recent):
          window[b, :len(r)] = r
        pos = np.array([len(r) for r in recent])
        token, step_logits, cache = self._prefill(params, self._put(window, self.window),
                                                  self._put(pos, self.rows), step_key)
      else:
        token, step_logits, cache = self._step(params, token, self._put(pos, self.rows), cache,
                                               step_key)
        pos = pos + 1
      if keep_logits:
        logits.append(np.asarray(step_logits))
      ids = np.asarray(token)
      for b in range(B):
        if not done[b]:
          done[b] = eos_id is not None and ids[b] == eos_id
          if not done[b]:
            out[b].append(int(ids[b]))
        rows[b].append(int(ids[b]))
      if done.all():
        break
    return Result(out, logits)
