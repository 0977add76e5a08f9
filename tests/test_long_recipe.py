"""experiments/llama3_8b_long.py: the 8B recipe's config is valid and has what its docstring
says; its tiny twin trains from the Hugging Face llama3 fixture with RoPE rescaled, at 8x the
fixture's original context, USP over ring 2 x Ulysses 4, MsT and remat."""
import math

from lcjax import config as config_lib
from lcjax.cli import load_config
from lcjax.train import prepare, train_and_evaluate

RECIPE = "experiments/llama3_8b_long.py"


def test_the_8b_recipe_is_valid():
  c = config_lib.validate(load_config(RECIPE))
  assert (c.train.seq_len, c.train.batch_size, c.mesh.ring, c.mesh.ulysses) == (131072, 1, 2, 4)
  assert (c.model.rope_type, c.model.rope_scaling, c.model.rope_original_len) == ("llama3", 8.0,
                                                                                  8192)
  assert (c.model.num_layers, c.model.mlp_chunks, c.model.loss_chunks, c.model.remat) == (
      32, 8, 32, "full")


def test_the_tiny_twin_trains_from_the_fixture_with_rescaled_rope(tmp_path, read_losses):
  config = load_config(RECIPE + ":tiny")
  config.train.update(steps=3, eval_every=3, log_every=1)
  config.data.max_documents = 12
  config.checkpoint.every = 3
  model_cfg = prepare(config, with_data=False).model_cfg
  # the fixture's own config.json says factor 8; the recipe's key overrides it
  assert (model_cfg.rope_scaling, model_cfg.rope_original_len, model_cfg.sp_strategy) == (
      32.0, 64, "usp")
  result = train_and_evaluate(config, tmp_path)
  losses = read_losses(tmp_path)
  assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
  assert math.isfinite(result["eval/loss"])  # 3 steps show it runs, not that it learns
