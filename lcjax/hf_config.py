"""Hugging Face `config.json` <-> lcjax's ModelConfig fields, for Llama, Qwen2 and Mistral.

What transformers' own classes do with each key (read from configuration_llama.py, _qwen2.py,
_mistral.py and modeling_rope_utils.py of transformers 5.x) is mirrored here; anything lcjax's
model cannot express is refused with one line naming the key and the fix. `adopt` fills a run's
config from a model directory (model.init_from_hf).
"""
import math
import pathlib

from lcjax import cli

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mistral": "MistralForCausalLM"}
# transformers' defaults for the keys a config.json may leave out, per model type
_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 2048},
    "qwen2": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28},
    "mistral": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
# Keys of ModelConfig that RoPE rescaling (long-context continued pretraining) may change.
RESCALABLE = ("rope_theta", "rope_scaling", "rope_type", "rope_low_freq_factor",
              "rope_high_freq_factor", "rope_original_len", "rope_beta_fast", "rope_beta_slow",
              "rope_attention_factor", "rope_truncate")


def directory(path) -> pathlib.Path:
  """`path` as a local model directory; ValueError in one line if it is none."""
  if not pathlib.Path(path).is_dir():
    raise ValueError(f"{path} is not a directory; give a local Hugging Face model directory "
                     "(config.json + *.safetensors): nothing is downloaded")
  return pathlib.Path(path)


def read(path) -> dict:
  """The parsed config.json of a model directory; ValueError in one line if absent or broken."""
  return cli.read_json(directory(path) / "config.json", "a Hugging Face model directory "
                       "holds config.json beside its *.safetensors (copy the whole directory)",
                       "restore the model's original config.json")


def _refuse(path, what, fix):
  raise ValueError(f"{pathlib.Path(path) / 'config.json'}: {what}; {fix}")


def _rope(hf, path, max_positions) -> dict:
  """ModelConfig's RoPE fields from rope_theta + rope_scaling (transformers 4) or rope_parameters
  (transformers 5)."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    _refuse(path, "partial_rotary_factor != 1 (RoPE on part of each head)", "lcjax rotates whole "
            "heads; use a model with full rotary embeddings")
  if kind == "default":
    return {"rope_theta": theta, "rope_scaling": 0.0}
  if kind == "linear":
    return {"rope_theta": theta, "rope_scaling": float(params["factor"]), "rope_type": "linear"}
  if kind == "llama3":
    original = params.get("original_max_position_embeddings", max_positions)
    return {"rope_theta": theta, "rope_scaling": float(params["factor"]), "rope_type": "llama3",
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_len": int(original)}
  if kind == "yarn":
    factor, attention = float(params["factor"]), params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention is None and mscale and mscale_all_dim:  # DeepSeek's ratio of two temperatures
      temperature = lambda m: 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
      attention = temperature(mscale) / temperature(mscale_all_dim)
    return {"rope_theta": theta, "rope_scaling": factor, "rope_type": "yarn",
            "rope_original_len": int(params.get("original_max_position_embeddings", max_positions)),
            "rope_beta_fast": float(params.get("beta_fast") or 32.0),
            "rope_beta_slow": float(params.get("beta_slow") or 1.0),
            "rope_attention_factor": float(attention or 0.0),
            "rope_truncate": bool(params.get("truncate", True))}
  _refuse(path, f"rope type {kind!r} is not supported", "lcjax has default, linear, llama3 and "
          "yarn RoPE; set rope_scaling to one of them (or null) if the model allows it")


def _sliding_window(hf, model_type, num_layers, path) -> int:
  """The one window every layer uses (0 = none); refuses per-layer mixes."""
  if model_type == "llama":
    return 0
  if model_type == "mistral":  # MistralAttention windows every layer (it ignores layer_types)
    return int(hf["sliding_window"] or 0)
  window = hf["sliding_window"] if hf["use_sliding_window"] else None
  kinds = hf.get("layer_types") or [
      "sliding_attention" if window is not None and i >= hf["max_window_layers"] else
      "full_attention" for i in range(num_layers)]
  if len(set(kinds)) > 1:
    _refuse(path, f"layers mix sliding and full attention ({kinds.count('sliding_attention')} of "
            f"{num_layers} slide)", "lcjax uses one window for every layer; set the same for all")
  return int(window) if kinds[0] == "sliding_attention" and window else 0


def model_fields(hf: dict, path) -> dict:
  """ModelConfig fields (the model's shape, RoPE, norm, window, biases) of a parsed config.json."""
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    _refuse(path, f"model_type {model_type!r} is not supported", "lcjax loads "
            f"{', '.join(ARCHITECTURES)} (Llama 1-3.2, Qwen2/2.5, Mistral); convert the model to "
            "one of them or use another tool")
  hf = {**_DEFAULTS[model_type], **hf}
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    _refuse(path, f"lacks {', '.join(missing)}", "restore the model's original config.json")
  if hf.get("hidden_act", "silu") != "silu":
    _refuse(path, f"hidden_act {hf['hidden_act']!r} is not supported", "lcjax's MLP is SwiGLU "
            "(silu); use a model with hidden_act silu")
  if hf.get("mlp_bias"):
    _refuse(path, "mlp_bias is true", "lcjax's MLP has no biases; use a model without them")
  if model_type == "llama" and hf.get("attention_bias"):
    _refuse(path, "attention_bias is true (biases on q, k, v and o)", "lcjax has q/k/v biases "
            "only (Qwen2's); use a model without an o_proj bias")
  if hf.get("quantization_config"):
    _refuse(path, "the weights are quantized", "lcjax loads float weights; use the unquantized "
            "model")
  heads = hf["num_attention_heads"]
  num_layers = hf["num_hidden_layers"]
  fields = {
      "vocab_size": hf["vocab_size"], "num_layers": num_layers, "embed_dim": hf["hidden_size"],
      "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
      "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
      "mlp_dim": hf["intermediate_size"], "norm_eps": float(hf["rms_norm_eps"]),
      "tie_embeddings": bool(hf["tie_word_embeddings"]),
      "attention_bias": model_type == "qwen2",
      "sliding_window": _sliding_window(hf, model_type, num_layers, path),
      **_rope(hf, path, hf["max_position_embeddings"])}
  if fields["head_dim"] % 2:
    _refuse(path, f"head_dim {fields['head_dim']} is odd", "RoPE rotates pairs: use an even one")
  return fields


def to_hf(model_cfg, extra=None) -> dict:
  """The config.json of `model_cfg`: qwen2 with attention biases, else mistral with a sliding
  window, else llama. `extra`: keys to carry over (token ids)."""
  c = model_cfg
  model_type = "qwen2" if c.attention_bias else "mistral" if c.sliding_window else "llama"
  hf = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.embed_dim, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "rope_theta": c.rope_theta, "rope_scaling": None,
        "max_position_embeddings": int(c.rope_original_len * max(c.rope_scaling, 1.0)),
        "attention_dropout": 0.0, **(extra or {})}
  if model_type == "qwen2":
    hf.update(use_sliding_window=bool(c.sliding_window), sliding_window=c.sliding_window or None,
              max_window_layers=0)
  elif model_type == "mistral":
    hf["sliding_window"] = c.sliding_window
  else:
    hf.update(attention_bias=False, mlp_bias=False)
  if c.rope_scaling and c.rope_type == "linear":
    hf["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_scaling}
  elif c.rope_scaling and c.rope_type == "yarn":
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": c.rope_scaling,
                          "original_max_position_embeddings": c.rope_original_len,
                          "beta_fast": c.rope_beta_fast, "beta_slow": c.rope_beta_slow,
                          "attention_factor": c.rope_attention_factor or None,
                          "truncate": c.rope_truncate}
  elif c.rope_scaling:
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": c.rope_scaling,
                          "low_freq_factor": c.rope_low_freq_factor,
                          "high_freq_factor": c.rope_high_freq_factor,
                          "original_max_position_embeddings": c.rope_original_len}
  return hf


def adopt(config):
  """model.init_from_hf: the run's model keys from that directory's config.json, in place.

  A key left at its default takes the checkpoint's value; a rope_* key set otherwise rescales
  RoPE (long-context continued pretraining); any other key set otherwise is an error. With
  data.tokenizer=hf and no data.tokenizer_path, the directory's tokenizer.json."""
  from lcjax import config as config_lib
  m, path = config.model, config.model.init_from_hf
  if config.outer.init_from or config.outer.base_from:
    raise ValueError(f"model.init_from_hf={path!r} and outer.init_from/outer.base_from both say "
                     "where the run starts; keep one (a plain run started from the Hugging Face "
                     "model can be outer.init_from's)")
  defaults = config_lib.base_config().model
  for key, value in model_fields(read(path), path).items():
    value = type(defaults[key])(value)
    if m[key] == defaults[key]:
      m[key] = value
    elif m[key] != value and key not in RESCALABLE:
      raise ValueError(f"model.{key}={m[key]!r} contradicts {pathlib.Path(path) / 'config.json'} "
                       f"({value!r}): the weights have that shape; drop the override (model keys "
                       "come from model.init_from_hf)")
  if config.data.tokenizer == "hf" and not config.data.tokenizer_path:
    config.data.tokenizer_path = str(pathlib.Path(path) / "tokenizer.json")
