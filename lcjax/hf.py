"""Hugging Face checkpoints in and out: a local model directory (config.json + safetensors, one
file or shards with model.safetensors.index.json) <-> lcjax's parameter tree.

Conventions (checked against transformers' Llama/Qwen2/Mistral, tests/test_hf.py):
  - torch Linear weights are [out, in]: q_proj [H*D, E] is lcjax's wq [E, H, D] transposed,
    o_proj [E, H*D] is wo [H, D, E], gate/up [F, E] and down [E, F] are transposed, lm_head
    [V, E] is the head [E, V]; embeddings and norm scales are the same.
  - RoPE: HF checkpoints store q/k rows already permuted for rotate_half, pairing dimension i
    with i + D/2, which is what `apply_rope` pairs: no permutation either way.
  - lcjax stacks the blocks of a level with a leading `layers` dimension: HF layer i is entry
    i % (L / num_levels) of level i // (L / num_levels).
Loading reads, for each device, only that device's slice of each tensor (safetensors'
`get_slice`, assembled by `jax.make_array_from_callback` on the parameter's sharding), so a
model larger than one device loads onto an fsdp mesh without a full copy anywhere. Only
safetensors are read: `.bin` files are pickles and are refused.
"""
import contextlib
import dataclasses
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from lcjax import hf_config
from lcjax import model as model_lib
from lcjax import state_spec
from lcjax.hf_config import adopt  # noqa: F401  (config.validate calls hf.adopt)

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One lcjax leaf as HF tensors: `names` (one per stacked layer, or one), each of `shape`;
  the leaf (per layer) is the tensor reshaped to `view` (file dimension j split into
  `splits[j]` view dimensions), then transposed by `perm`."""
  names: tuple
  shape: tuple
  view: tuple
  splits: tuple
  perm: tuple
  stacked: bool

  @property
  def leaf_shape(self):
    return ((len(self.names),) if self.stacked else ()) + tuple(self.view[d] for d in self.perm)


_BLOCK = {  # (module, leaf) of a block -> (name in HF layer i, file dims, view dims, perm)
    ("attn", "wq"): ("self_attn.q_proj.weight", "HD,E", (2, 0, 1)),
    ("attn", "wk"): ("self_attn.k_proj.weight", "KD,E", (2, 0, 1)),
    ("attn", "wv"): ("self_attn.v_proj.weight", "KD,E", (2, 0, 1)),
    ("attn", "wo"): ("self_attn.o_proj.weight", "E,HD", (1, 2, 0)),
    ("attn", "bq"): ("self_attn.q_proj.bias", "HD", (0, 1)),
    ("attn", "bk"): ("self_attn.k_proj.bias", "KD", (0, 1)),
    ("attn", "bv"): ("self_attn.v_proj.bias", "KD", (0, 1)),
    ("attn_norm", "scale"): ("input_layernorm.weight", "E", (0,)),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "E", (0,)),
    ("mlp", "w_gate"): ("mlp.gate_proj.weight", "F,E", (1, 0)),
    ("mlp", "w_up"): ("mlp.up_proj.weight", "F,E", (1, 0)),
    ("mlp", "w_down"): ("mlp.down_proj.weight", "E,F", (1, 0)),
}
_TOP = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "V,E", (0, 1)),
    ("final_norm", "scale"): ("model.norm.weight", "E", (0,)),
    ("lm_head",): ("lm_head.weight", "V,E", (1, 0)),
}


def _key(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)


def layout(abstract_params) -> dict:
  """{lcjax path (tuple of keys): Tensor} of a parameter tree; its shapes give the sizes."""
  flat = {_key(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  V, E = flat[("embed", "embedding")]
  per_level, _, H, D = flat[("levels", 0, "blocks", "attn", "wq")]
  sizes = {"V": V, "E": E, "H": H, "D": D, "K": flat[("levels", 0, "blocks", "attn", "wk")][2],
           "F": flat[("levels", 0, "blocks", "mlp", "w_gate")][2]}
  out = {}
  for path, leaf_shape in flat.items():
    if path[0] == "levels":
      name, dims, perm = _BLOCK[path[3:]]
      first = path[1] * per_level
      names = tuple(f"model.layers.{i}.{name}" for i in range(first, first + per_level))
    else:
      (name, dims, perm), names = _TOP[path], (_TOP[path][0],)
    groups = dims.split(",")
    out[path] = Tensor(names, tuple(math.prod(sizes[c] for c in g) for g in groups),
                       tuple(sizes[c] for c in "".join(groups)), tuple(map(len, groups)), perm,
                       stacked=path[0] == "levels")
    assert out[path].leaf_shape == leaf_shape, (path, out[path], leaf_shape)
  return out


def _files(path) -> dict:
  """{tensor name: safetensors file} of a model directory; ValueError in one line for what
  cannot be read (no directory, pickles only, a broken or incomplete index)."""
  root = hf_config.directory(path)
  index = root / INDEX
  if index.is_file():
    try:
      weight_map = dict(json.loads(index.read_text())["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
      raise ValueError(f"{index} is not a safetensors index (no weight_map); restore the "
                       "model's original index file") from None
    missing = sorted({f for f in weight_map.values() if not (root / f).is_file()})
    if missing:
      raise ValueError(f"{index} names {missing[0]}, which is not in {path} "
                       f"({len(missing)} shard(s) missing); copy every shard of the model")
    return {name: root / f for name, f in weight_map.items()}
  shards = sorted(root.glob("*.safetensors"))
  if not shards:
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
      raise ValueError(f"{path} holds {pickles[0]}, a pickle checkpoint, which lcjax does not "
                       "read (unpickling runs code); convert it to safetensors (transformers: "
                       "from_pretrained, then save_pretrained(dir, safe_serialization=True))")
    raise ValueError(f"{path} holds no *.safetensors weights; copy the model's safetensors "
                     f"files (and {INDEX} if sharded) beside config.json")
  if len(shards) > 1:
    raise ValueError(f"{path} holds {len(shards)} safetensors files but no {INDEX}; copy the "
                     "model's index file too")
  with safetensors.safe_open(shards[0], "numpy") as f:
    return {name: shards[0] for name in f.keys()}


def _check(tensors, files, get_slice, path):
  """ValueError in one line unless the files hold exactly the tensors of `tensors`."""
  expected = {name: t.shape for t in tensors.values() for name in t.names}
  fix = "the weights do not match config.json; use the model's own config.json"
  for name, shape in expected.items():
    if name not in files:
      raise ValueError(f"{path}: config.json implies the tensor {name}, which its safetensors "
                       f"do not hold: {fix}")
    got = tuple(get_slice(name).get_shape())
    if got != shape:
      raise ValueError(f"{path}: {name} is {list(got)} in the safetensors but config.json "
                       f"implies {list(shape)}: {fix}")
  tied = ("lm_head",) not in tensors  # a tied model may carry a copy of the embedding as head
  for name in files:
    if not (name in expected or name.endswith(_IGNORED) or (tied and name == "lm_head.weight")):
      raise ValueError(f"{path}: the safetensors hold {name}, which config.json does not imply "
                       f"(biases, an untied head, more layers?): {fix}")


def read_block(tensor, index, get_slice) -> np.ndarray:
  """The float32 block `index` (a tuple of slices of the lcjax leaf) of `tensor`, reading from
  the files only that block (with whole inner view dimensions: D of H*D)."""
  index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, tensor.leaf_shape))
  layers, index = (index[0], index[1:]) if tensor.stacked else (slice(0, 1), index)
  view_index = [None] * len(tensor.view)
  for leaf_dim, view_dim in enumerate(tensor.perm):
    view_index[view_dim] = index[leaf_dim]
  file_index, block_view, inner, first = [], [], [], 0
  for n in tensor.splits:  # a file dimension is read along its outermost view dimension
    outer, rest = view_index[first], tensor.view[first + 1:first + n]
    file_index.append(slice(outer.start * math.prod(rest), outer.stop * math.prod(rest)))
    block_view += [outer.stop - outer.start, *rest]
    inner += [slice(None), *view_index[first + 1:first + n]]
    first += n
  blocks = [np.asarray(get_slice(name)[tuple(file_index)]).reshape(block_view)[tuple(inner)]
            .transpose(tensor.perm).astype(np.float32) for name in tensor.names[layers]]
  return np.stack(blocks) if tensor.stacked else blocks[0]


def load_params(path, abstract_params) -> dict:
  """The parameter tree of `abstract_params` (ShapeDtypeStructs carrying shardings) from the
  model directory `path`, each device reading only its own slices."""
  files = _files(path)
  tensors = layout(abstract_params)
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safetensors.safe_open(f, "numpy"))
               for f in set(files.values())}
    get_slice = lambda name: handles[files[name]].get_slice(name)
    _check(tensors, files, get_slice, path)

    def leaf(path_, x):
      tensor, blocks = tensors[_key(path_)], {}  # replicas of a block read it once

      def block(index):
        key = tuple(s.indices(n)[:2] for s, n in zip(index, x.shape))
        if key not in blocks:
          blocks[key] = read_block(tensor, index, get_slice)
        return blocks[key]

      return jax.make_array_from_callback(x.shape, x.sharding, block)

    with jax.transfer_guard_host_to_device("allow"):
      return jax.tree_util.tree_map_with_path(leaf, abstract_params)


def abstract_params(model_cfg, mesh=None):
  """The model's parameter tree as ShapeDtypeStructs on `mesh`'s derived shardings (None: the
  first device)."""
  model = nnx.eval_shape(lambda: model_lib.create(model_cfg, 0))
  abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if mesh is not None:
    return state_spec.derive(state_spec.param_decls(model), abstract, mesh).abstract
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


def load_pretrained(path, mesh=None, *, num_levels: int = 1):
  """(model_cfg, params) of a local Hugging Face model directory; params float32, sharded on
  `mesh` as lcjax's rules say (None: on the first device). The other ModelConfig fields
  (dtype, attention, remat, ...) keep their defaults: dataclasses.replace them."""
  fields = hf_config.model_fields(hf_config.read(path), path)
  model_cfg = model_lib.ModelConfig(**fields, num_levels=num_levels)
  if model_cfg.num_layers % num_levels:
    raise ValueError(f"num_levels={num_levels} does not divide the model's {model_cfg.num_layers} "
                     "layers; choose a divisor")
  return model_cfg, load_params(path, abstract_params(model_cfg, mesh))


def _host(x) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_pretrained(path, model_cfg, params, tokenizer_from=None, *,
                    max_shard_bytes: int = 4 << 30, dtype: str = "float32"):
  """Writes `params` (lcjax's tree of `model_cfg`) as a Hugging Face model directory: config.json,
  safetensors (shards of at most max_shard_bytes with model.safetensors.index.json when there
  are several), and the tokenizer files of the directory (or tokenizer.json) `tokenizer_from`.
  `path` must be new or empty. On several processes every one gathers, process 0 writes."""
  root = pathlib.Path(path)
  if root.exists() and (not root.is_dir() or any(root.iterdir())):
    raise ValueError(f"{path} exists and is not an empty directory; choose a new one (a model "
                     "directory must not mix files of two models)")
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype!r}")
  np_dtype = jnp.dtype(dtype)
  tensors = layout(params)
  named = {}
  for p, x in jax.tree_util.tree_leaves_with_path(params):
    tensor, value = tensors[_key(p)], _host(x)
    for name, layer in zip(tensor.names, value if tensor.stacked else [value]):
      named[name] = np.ascontiguousarray(
          layer.transpose(np.argsort(tensor.perm)).reshape(tensor.shape).astype(np_dtype))
  extra, source = {}, pathlib.Path(tokenizer_from) if tokenizer_from else None
  if source is not None and not source.exists():
    raise ValueError(f"tokenizer_from={tokenizer_from} does not exist; give the directory (or "
                     "tokenizer.json) of the model's tokenizer")
  if source is not None and source.is_dir() and (source / "config.json").is_file():
    original = hf_config.read(source)
    extra = {k: original[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
             if k in original}
  if jax.process_index() != 0:
    return
  root.mkdir(parents=True, exist_ok=True)
  config = {**hf_config.to_hf(model_cfg, extra), "dtype": dtype}
  (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  _write_shards(root, named, max_shard_bytes)
  if source is not None:
    for file in [source] if source.is_file() else [source / f for f in TOKENIZER_FILES]:
      if file.is_file():
        shutil.copyfile(file, root / file.name)


def _write_shards(root, named, max_shard_bytes):
  shards, size = [[]], 0
  for name, value in named.items():  # in layer order, as transformers writes them
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards, size = shards + [[]], 0
    shards[-1].append(name)
    size += value.nbytes
  metadata = {"format": "pt"}  # transformers reads safetensors marked as torch's
  if len(shards) == 1:
    safetensors.numpy.save_file(named, root / "model.safetensors", metadata=metadata)
    return
  weight_map = {}
  for i, names in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file({n: named[n] for n in names}, root / file, metadata=metadata)
    weight_map.update({n: file for n in names})
  index = {"metadata": {"total_size": sum(v.nbytes for v in named.values())},
           "weight_map": weight_map}
  (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A state source (program.py's resume order): a Hugging Face model's weights start this run
  at step 0, with a fresh optimizer state."""
  path: str

  def init(self, program):
    """(live state, data position 0) of `program` from the model directory."""
    params = load_params(self.path, program.base_abstract()["params"])
    stage, tx = program.stage, program.tx

    def start(params):
      return stage.from_base({"step": jnp.zeros((), jnp.int32), "params": params,
                              "opt_state": tx.init(params)})

    print(f"[lcjax] starting from the Hugging Face model in {self.path}")
    return jax.jit(start, out_shardings=program.live.shardings, donate_argnums=0)(params), 0
