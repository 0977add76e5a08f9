"""Text generation from a trained model: `python -m lcjax.sample --workdir=DIR --prompt=...`.

Runs the full forward pass over a fixed window of `context` tokens for each new token (one
compiled program for the whole sample); the window slides once it is full.
"""
import contextlib
import dataclasses
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from lcjax import cli
from lcjax import model as model_lib


def generate(model_cfg, mesh, params, tokenizer, prompt: str, num_tokens: int, *, context: int,
             seed: int = 0, temperature: float = 0.8) -> str:
  """Prompt + `num_tokens` sampled tokens (temperature 0 = greedy), decoded. One sequence in
  natural order, so sequence parallelism (if the run used it) is off here."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  model_cfg = dataclasses.replace(model_cfg, sp_strategy=None)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.create(model_cfg, 0)))

  @jax.jit
  def next_token(params, window_1T, length, key):
    model = nnx.merge(graphdef, params)
    positions = jnp.arange(context)[None]
    segments = (positions < length).astype(jnp.int32)
    logits_V = model(window_1T, positions, segments)[0, length - 1]
    if temperature == 0:
      return jnp.argmax(logits_V).astype(jnp.int32)
    masked = jnp.where(jnp.arange(logits_V.shape[0]) < tokenizer.vocab_size, logits_V, -jnp.inf)
    return jax.random.categorical(key, masked / temperature).astype(jnp.int32)

  tokens = [tokenizer.bos_id] + tokenizer.encode(prompt).tolist()
  key = jax.random.key(seed)
  for i in range(num_tokens):
    recent = tokens[-context:]
    window = np.full((1, context), tokenizer.pad_id, np.int32)
    window[0, :len(recent)] = recent
    token = int(next_token(params, jax.device_put(window, replicated), len(recent),
                           jax.random.fold_in(key, i)))
    if token == tokenizer.eos_id:
      break
    tokens.append(token)
  return tokenizer.decode(tokens[1:])


@contextlib.contextmanager
def workdir_params(workdir, prompt=None):
  """Yields (prepared, params) of DIR's latest checkpoint, under its mesh: the parameters its
  evaluation uses (the shared ones of an outer loop; DiPaCo: the path `prompt` is routed to,
  path 0 without one), read alone onto this machine's devices, whatever mesh trained them."""
  from lcjax import checkpoint as checkpoint_lib
  from lcjax import program as program_lib
  from lcjax import train as train_lib

  config = ml_collections.ConfigDict(cli.read_json(
      pathlib.Path(workdir) / "config.json", "--workdir must be a directory that lcjax trained in",
      "it is the run's record of its config, written by lcjax.main"))
  local_mesh = ml_collections.ConfigDict(
      {"replica": 1, "data": -1, "fsdp": 1, "ring": 1, "ulysses": 1, "tensor": 1})
  config.train.batch_size = jax.device_count()  # the batch plays no part here
  prepared = train_lib.prepare(config, with_data=False, mesh_config=local_mesh)
  checkpointer = checkpoint_lib.Checkpointer(workdir, prepared.config, read_only=True)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise ValueError(f"{workdir} has no checkpoint yet; train first")
    with jax.set_mesh(prepared.mesh):
      program = program_lib.build(prepared, aot=True)
      path = 0
      if program.num_paths > 1 and prompt is not None:  # DiPaCo: the prompt's path
        from lcjax.outer import routing
        path = routing.route_text(prepared.config, prompt,
                                  routing.load_router(pathlib.Path(workdir) / "router.safetensors"))
        print(f"[lcjax] DiPaCo: the prompt is routed to path {path} of {program.num_paths} "
              f"(modules {program.stage.grid.describe(path)})", file=sys.stderr)
      yield prepared, program.restore_model_params(checkpointer, step, path)
  finally:
    checkpointer.close()


def sample_from_workdir(workdir, prompt: str, num_tokens: int, temperature: float) -> str:
  """Samples from the latest checkpoint of DIR (workdir_params)."""
  with workdir_params(workdir, prompt) as (prepared, params):
    return generate(prepared.model_cfg, prepared.mesh, params, prepared.tokenizer, prompt,
                    num_tokens, context=prepared.config.train.seq_len, temperature=temperature)


def check_flags(num_tokens: int, temperature: float):
  if num_tokens < 1:
    raise ValueError(f"--num_tokens must be >= 1; got {num_tokens}")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy); got {temperature}")


def _main(argv):
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "directory of a training run", flag_values=fv)
  flags.DEFINE_string("prompt", "def ", "text to continue", flag_values=fv)
  flags.DEFINE_integer("num_tokens", 200, "tokens to generate", flag_values=fv)
  flags.DEFINE_float("temperature", 0.8, "sampling temperature; 0 = greedy", flag_values=fv)
  cli.parse_flags(fv, argv, required=("workdir",), doc=__doc__)
  check_flags(fv.num_tokens, fv.temperature)
  print(sample_from_workdir(fv.workdir, fv.prompt, fv.num_tokens, fv.temperature))


def main(argv=None) -> int:
  return cli.run(_main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
