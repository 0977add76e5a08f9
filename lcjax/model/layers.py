"""Building blocks of the Llama family: RMSNorm, RoPE, SwiGLU MLP, embedding."""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax import mesh as mesh_lib
from lcjax.model.config import ModelConfig


class Param(nnx.Param):
  """A parameter declaring a logical axis name per dimension (state_spec.py reads them). nnx.vmap
  with transform_metadata={nnx.PARTITION_NAME: name} adds the stacked axis's name."""

  def __init__(self, value, logical_axes: tuple, **metadata):
    super().__init__(value, logical_axes=tuple(logical_axes), **metadata)

  def add_axis(self, axis_index, axis_name):
    axes = list(self.get_metadata()["logical_axes"])
    axes.insert(axis_index, axis_name)
    self.set_metadata("logical_axes", tuple(axes))

  def remove_axis(self, axis_index, axis_name):
    axes = list(self.get_metadata()["logical_axes"])
    assert axes.pop(axis_index) == axis_name
    self.set_metadata("logical_axes", tuple(axes))


def _init(rngs, shape, fan_in_axes, std_scale=1.0):
  """Truncated-normal init with variance 1/fan_in (times std_scale^2), float32."""
  fan_in = math.prod(shape[a] for a in fan_in_axes)
  std = std_scale / math.sqrt(fan_in)
  return std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32) / .8796


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.scale = Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig):
  """Inverse frequencies [D/2] of RoPE, scaled as cfg.rope_type says when cfg.rope_scaling > 0."""
  D = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
  if not cfg.rope_scaling:
    return inv_freq
  if cfg.rope_type == "linear":  # positions divided by the factor (position interpolation)
    return inv_freq / cfg.rope_scaling
  if cfg.rope_type == "yarn":
    return _yarn_frequencies(cfg, inv_freq)
  assert cfg.rope_type == "llama3", cfg.rope_type
  # Llama 3.1: long wavelengths are divided by the factor, short ones kept, and the band
  # between blended linearly in 1/wavelength.
  low_wavelen = cfg.rope_original_len / cfg.rope_low_freq_factor
  high_wavelen = cfg.rope_original_len / cfg.rope_high_freq_factor
  wavelen = 2 * jnp.pi / inv_freq
  smooth = ((cfg.rope_original_len / wavelen - cfg.rope_low_freq_factor) /
            (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
  blended = (1 - smooth) * inv_freq / cfg.rope_scaling + smooth * inv_freq
  return jnp.where(wavelen > low_wavelen, inv_freq / cfg.rope_scaling,
                   jnp.where(wavelen < high_wavelen, inv_freq, blended))


def _yarn_frequencies(cfg: ModelConfig, inv_freq):
  """YaRN (arXiv 2309.00071, eq. 17-19): dimensions turning fewer than beta_slow times over
  the original context are interpolated (divided by the factor), those turning more than
  beta_fast times kept, with a linear ramp between; bounds rounded out (floor, ceil) unless
  rope_truncate is off."""
  D, base, original = cfg.head_dim, cfg.rope_theta, cfg.rope_original_len

  def dim_of(rotations):  # the dimension index that turns `rotations` times over `original`
    return D * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, D - 1)
  high += 0.001 if low == high else 0
  ramp = jnp.clip((jnp.arange(D // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  return inv_freq / cfg.rope_scaling * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(cfg: ModelConfig) -> float:
  """What RoPE's cos and sin are multiplied by: YaRN's attention temperature, 1 otherwise."""
  if cfg.rope_type != "yarn" or not cfg.rope_scaling:
    return 1.0
  if cfg.rope_attention_factor:
    return cfg.rope_attention_factor
  return 0.1 * math.log(cfg.rope_scaling) + 1.0 if cfg.rope_scaling > 1 else 1.0


def apply_rope(x_BTHD, positions_BT, inv_freq, attention_factor: float = 1.0):
  """Rotates pairs (x[..., :D/2], x[..., D/2:]) by position * inv_freq, in float32; the
  result scaled by attention_factor (YaRN)."""
  angles = positions_BT[:, :, None, None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  if attention_factor != 1.0:
    sin, cos = sin * attention_factor, cos * attention_factor
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)


class Mlp(nnx.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    E, F = cfg.embed_dim, cfg.mlp_dim
    self.w_gate = Param(_init(rngs, (E, F), (0,)), logical_axes=("embed", "mlp"))
    self.w_up = Param(_init(rngs, (E, F), (0,)), logical_axes=("embed", "mlp"))
    self.w_down = Param(_init(rngs, (F, E), (0,), 1 / math.sqrt(2 * cfg.num_layers)),
                            logical_axes=("mlp", "embed"))
    self.dtype = cfg.compute_dtype

  def __call__(self, x_BTE):
    dt = self.dtype
    gate_BTF = x_BTE @ self.w_gate[...].astype(dt)
    up_BTF = x_BTE @ self.w_up[...].astype(dt)
    return (jax.nn.silu(gate_BTF) * up_BTF) @ self.w_down[...].astype(dt)


class Embed(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.embedding = Param(
        0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.embed_dim), jnp.float32),
        logical_axes=("vocab", "embed"))
    self.dtype = cfg.compute_dtype

  def __call__(self, tokens_BT):
    # The lookup reads whole rows: gather the table's width (fsdp) first, explicitly, or the
    # SPMD partitioner rematerialises the whole table and says so ("Involuntary full
    # rematerialization") on fsdp meshes.
    table_VE = mesh_lib.constrain(self.embedding[...], ("vocab", None))
    return jnp.take(table_VE, tokens_BT, axis=0).astype(self.dtype)
