"""Frozen model hyper-parameters: what model code receives instead of a ConfigDict."""
import dataclasses

import jax.numpy as jnp

from lcjax.config import mesh_size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  num_layers: int = 4
  num_levels: int = 1
  embed_dim: int = 256
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  mlp_dim: int = 768
  rope_theta: float = 10000.0
  rope_scaling: float = 0.0          # frequency scaling factor (rope_type says how); 0 = off
  rope_type: str = "llama3"          # llama3 (per band, Llama 3.1) | linear | yarn
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_len: int = 8192
  rope_beta_fast: float = 32.0       # yarn: dimensions turning more often are kept
  rope_beta_slow: float = 1.0        # yarn: dimensions turning less often are interpolated
  rope_attention_factor: float = 0.0  # yarn: cos/sin scale; 0 = 0.1 ln(factor) + 1
  rope_truncate: bool = True         # yarn: round the ramp's bounds out to whole dimensions
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  attention_bias: bool = False       # biases on the q, k and v projections (Qwen2)
  dtype: str = "float32"             # compute dtype; parameters are float32
  attention: str = "auto"
  sliding_window: int = 0            # 0 = unlimited
  document_mask: bool = True         # False: causal by token index across packed documents
  remat: str = "none"
  mlp_chunks: int = 1
  loss_chunks: int = 1
  z_loss: float = 0.0                # weight of log(Z)^2 in the objective; 0 = off
  sp_strategy: str | None = None     # sequence-parallel attention strategy; None = off
  sp_layout: str = "zigzag"          # layout the tokens are stored in when sp_strategy is set

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def layers_per_level(self) -> int:
    return self.num_layers // self.num_levels

  @classmethod
  def from_config(cls, config, tokenizer_vocab: int) -> "ModelConfig":
    """From a validated config; vocab_size 0 = tokenizer vocab rounded up to 128."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.model.items() if k in fields}
    if mesh_size(config.mesh, "ring") * mesh_size(config.mesh, "ulysses") > 1:
      values.update(sp_strategy=config.sp.strategy, sp_layout=config.sp.layout)
    vocab = values["vocab_size"] or -(-tokenizer_vocab // 128) * 128
    if vocab < tokenizer_vocab:
      raise ValueError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                       f"({tokenizer_vocab}); raise it or set 0 to derive it")
    values["vocab_size"] = vocab
    return cls(**values)

  def param_count(self) -> int:
    """Parameters by formula (tests check the model against it)."""
    E, H, K, D, F, V = (self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim,
                        self.mlp_dim, self.vocab_size)
    block = E * H * D * 2 + E * K * D * 2 + 3 * E * F + 2 * E
    if self.attention_bias:
      block += (H + 2 * K) * D
    head = 0 if self.tie_embeddings else V * E
    return V * E + self.num_layers * block + E + head
