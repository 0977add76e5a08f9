"""Text generation from a trained model: `python -m lcjax.sample --workdir=DIR --prompt=...`.

Prefills the prompt once and decodes one token per step against a KV cache (lcjax/generate.py),
with a cache of at most `context` tokens (the run's seq_len): past it the window slides.
"""
import contextlib
import pathlib
import sys

import jax
import ml_collections
from absl import flags

from lcjax import cli
from lcjax import generate as generate_lib


def generate(model_cfg, mesh, params, tokenizer, prompt: str, num_tokens: int, *, context: int,
             seed: int = 0, temperature: float = 0.8, top_p: float = 1.0) -> str:
  """Prompt + `num_tokens` sampled tokens (temperature 0 = greedy; top_p < 1 = nucleus),
  decoded; stops early at EOS. One sequence in natural order: sequence parallelism (if the run
  used it) is off here."""
  tokens = [tokenizer.bos_id] + tokenizer.encode(prompt).tolist()
  generator = generate_lib.Generator(
      model_cfg, mesh, batch_size=1, cache_len=min(context, len(tokens) + num_tokens),
      temperature=temperature, top_p=top_p, vocab_limit=tokenizer.vocab_size)
  result = generator.generate(params, [tokens], num_tokens, seed=seed, eos_id=tokenizer.eos_id)
  return tokenizer.decode(tokens[1:] + result.tokens[0])


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


def sample_from_workdir(workdir, prompt: str, num_tokens: int, temperature: float,
                        top_p: float = 1.0) -> str:
  """Samples from the latest checkpoint of DIR (workdir_params)."""
  with workdir_params(workdir, prompt) as (prepared, params):
    return generate(prepared.model_cfg, prepared.mesh, params, prepared.tokenizer, prompt,
                    num_tokens, context=prepared.config.train.seq_len, temperature=temperature,
                    top_p=top_p)


def check_flags(num_tokens: int, temperature: float, top_p: float = 1.0):
  if num_tokens < 1:
    raise ValueError(f"--num_tokens must be >= 1; got {num_tokens}")
  try:
    generate_lib.check_sampling(temperature, top_p)
  except ValueError as e:
    raise ValueError(f"--{e}") from None


def _main(argv):
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "directory of a training run", flag_values=fv)
  flags.DEFINE_string("prompt", "def ", "text to continue", flag_values=fv)
  flags.DEFINE_integer("num_tokens", 200, "tokens to generate", flag_values=fv)
  flags.DEFINE_float("temperature", 0.8, "sampling temperature; 0 = greedy", flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling: keep the most likely tokens up to this "
                     "probability; 1 = off", flag_values=fv)
  cli.parse_flags(fv, argv, required=("workdir",), doc=__doc__)
  check_flags(fv.num_tokens, fv.temperature, fv.top_p)
  print(sample_from_workdir(fv.workdir, fv.prompt, fv.num_tokens, fv.temperature, fv.top_p))


def main(argv=None) -> int:
  return cli.run(_main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
