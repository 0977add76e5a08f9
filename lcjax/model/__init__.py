"""Flax NNX Llama-family transformer."""
from flax import nnx

from lcjax.model.config import ModelConfig
from lcjax.model.transformer import Transformer


def create(cfg: ModelConfig, seed: int) -> Transformer:
  return Transformer(cfg, nnx.Rngs(params=seed))
