"""lcjax.hf against what transformers itself computed (tests/fixtures/hf, written by
scripts/make_hf_fixtures.py; no torch here): each architecture's logits, loss and greedy tokens;
save then load; sharded loading; a training run from a checkpoint that resumes exactly and
exports; and each bad input stopping with one line."""
import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from lcjax import config as config_lib
from lcjax import export as export_lib
from lcjax import hf
from lcjax import mesh as mesh_lib
from lcjax import train as train_lib
from conftest import full_forward, killed_and_resumed, read_losses, tiny_config

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"
NAMES = ("llama", "llama3", "qwen2", "mistral")


def rel_error(got, want) -> float:
  return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


@pytest.fixture(scope="session")
def loaded():
  """{fixture: (model_cfg, params)} on the first device, loaded once for the session."""
  return {name: hf.load_pretrained(FIXTURES / name) for name in NAMES}


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_logits_loss_and_greedy_tokens_match_transformers(name, loaded):
  model_cfg, params = loaded[name]
  ids = np.load(FIXTURES / name / "input_ids.npy")
  want_logits = np.load(FIXTURES / name / "logits.npy")
  want_greedy = np.load(FIXTURES / name / "greedy.npy")
  B, T = ids.shape
  # One window of T + N tokens serves both: causal attention keeps the first T positions'
  # logits independent of what follows them.
  window = np.zeros((B, T + len(want_greedy)), np.int32)
  window[:, :T] = ids
  forward = full_forward(model_cfg)
  logits = np.asarray(forward(params, window))[:, :T]
  assert rel_error(logits, want_logits) < 1e-5
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(np.float64), axis=-1)
  loss = -np.mean(np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1))
  assert rel_error(loss, np.load(FIXTURES / name / "loss.npy")) < 1e-5
  for t in range(T, window.shape[1]):
    window[0, t] = int(np.argmax(np.asarray(forward(params, window))[0, t - 1]))
  np.testing.assert_array_equal(window[0, T:], want_greedy)


def test_what_each_config_json_becomes(loaded):
  llama, llama3, qwen2, mistral = (loaded[n][0] for n in NAMES)
  assert (llama.rope_type, llama.rope_scaling, llama.tie_embeddings) == ("linear", 2.0, False)
  assert (llama3.rope_type, llama3.rope_scaling, llama3.rope_original_len) == ("llama3", 8.0, 64)
  assert (llama3.head_dim, llama3.num_kv_heads, llama3.tie_embeddings) == (16, 1, True)
  assert qwen2.attention_bias and not llama.attention_bias
  assert (qwen2.rope_type, qwen2.rope_scaling, qwen2.rope_original_len) == ("yarn", 4.0, 4096)
  assert (mistral.sliding_window, llama.sliding_window, qwen2.norm_eps) == (5, 0, 1e-6)


def test_levels_split_the_layers_in_order(loaded):
  model_cfg, params = hf.load_pretrained(FIXTURES / "llama", num_levels=2)
  ids = np.load(FIXTURES / "llama" / "input_ids.npy")
  logits = full_forward(model_cfg)(params, ids)
  assert rel_error(logits, np.load(FIXTURES / "llama" / "logits.npy")) < 1e-5


def _tensors(directory) -> dict:
  out = {}
  for file in pathlib.Path(directory).glob("*.safetensors"):
    with safetensors.safe_open(file, "numpy") as f:
      out.update({k: f.get_tensor(k).astype(np.float32) for k in f.keys()})
  return out


@pytest.mark.parametrize("name, kwargs", [("llama", {}), ("llama3", {}),
                                          ("qwen2", {"max_shard_bytes": 40_000}),
                                          ("mistral", {"dtype": "bfloat16"})])
def test_save_then_load_is_the_identity(name, kwargs, loaded, tmp_path):
  model_cfg, params = loaded[name]
  out = tmp_path / name
  hf.save_pretrained(out, model_cfg, params, tokenizer_from=FIXTURES / name, **kwargs)
  assert (out / "model.safetensors.index.json").exists() == ("max_shard_bytes" in kwargs)
  # the same tensors, names and values as the files transformers wrote (a tied head aside)
  original, saved = _tensors(FIXTURES / name), _tensors(out)
  assert saved.keys() == original.keys()
  for key in original:
    np.testing.assert_array_equal(saved[key], original[key], err_msg=key)
  again_cfg, again = hf.load_pretrained(out)
  assert again_cfg == model_cfg
  _assert_same_params(again, params)
  assert (out / "tokenizer.json").read_bytes() == (FIXTURES / name / "tokenizer.json").read_bytes()
  assert json.loads((out / "config.json").read_text())["bos_token_id"] == 1


@pytest.mark.parametrize("name, axes", [("llama3", {"data": 2, "fsdp": 4}),
                                        ("qwen2", {"fsdp": 4, "tensor": 2})])
def test_sharded_loading_gives_the_unsharded_params(name, axes, loaded):
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(
      {"replica": 1, "data": 1, "fsdp": 1, "ring": 1, "ulysses": 1, "tensor": 1, **axes}))
  model_cfg, sharded = hf.load_pretrained(FIXTURES / name, mesh)
  _assert_same_params(sharded, loaded[name][1])
  wanted = hf.abstract_params(model_cfg, mesh)
  for x, a in zip(jax.tree.leaves(sharded), jax.tree.leaves(wanted)):
    assert x.sharding == a.sharding
  wq = sharded["levels"][0]["blocks"]["attn"]["wq"]
  assert wq.addressable_shards[0].data.size * np.prod(list(axes.values())) == \
      wq.size * (2 if "data" in axes else 1)


def test_each_device_reads_only_its_slice():
  """Reading one device's block of layer 0's q_proj (heads split in two, width in four) reads
  an eighth of the file tensor, not the whole."""
  _, params = hf.load_pretrained(FIXTURES / "qwen2")
  tensor = hf.layout(params)[("levels", 0, "blocks", "attn", "wq")]
  requested = []
  index = json.loads((FIXTURES / "qwen2" / hf.INDEX).read_text())["weight_map"]
  file = FIXTURES / "qwen2" / index["model.layers.0.self_attn.q_proj.weight"]
  with safetensors.safe_open(file, "numpy") as f:

    class Recording:  # the real slice, noting what it is asked for
      def __init__(self, name):
        self.slice = f.get_slice(name)

      def __getitem__(self, index):
        block = self.slice[index]
        requested.append(block.size)
        return block

    index = (slice(0, 1), slice(8, 16), slice(2, 4), slice(None))  # E=32 in 4, H=4 in 2
    block = hf.read_block(tensor, index, Recording)
  full = np.asarray(params["levels"][0]["blocks"]["attn"]["wq"])
  np.testing.assert_array_equal(block, full[index])
  assert requested == [32 * 32 // 8]


def _hf_run_config():
  c = tiny_config()
  c.model.init_from_hf = str(FIXTURES / "llama")
  c.data.tokenizer = "hf"
  return c


def test_a_run_starts_from_the_checkpoint_resumes_exactly_and_exports(
    tmp_path, crash_on_evaluation, loaded, capsys):
  config = _hf_run_config()
  straight, resumed = killed_and_resumed(config, tmp_path, crash_on_evaluation)
  assert read_losses(straight) == read_losses(resumed)
  assert "starting from the Hugging Face model" in capsys.readouterr().out
  saved = json.loads((resumed / "config.json").read_text())
  assert saved["data"]["tokenizer_path"] == str(FIXTURES / "llama" / "tokenizer.json")
  assert saved["model"]["tie_embeddings"] is False
  # step 0 is the checkpoint's parameters
  prepared = train_lib.prepare(config)
  with jax.set_mesh(prepared.mesh):
    program = train_lib.build_program(prepared)
    state, position = hf.Pretrained(config.model.init_from_hf).init(program)
  assert position == 0 and int(state["step"]) == 0
  _assert_same_params(state["params"], loaded["llama"][1])
  # the export holds the run's last parameters and the checkpoint's tokenizer
  assert export_lib.main(["export", f"--workdir={resumed}", f"--out={tmp_path / 'out'}"]) == 0
  exported_cfg, exported = hf.load_pretrained(tmp_path / "out")
  assert exported_cfg == loaded["llama"][0]
  final = _flat(exported)["['embed']['embedding']"]
  assert not np.array_equal(final, np.asarray(loaded["llama"][1]["embed"]["embedding"]))
  assert (tmp_path / "out" / "tokenizer.json").exists()


def _copy(tmp_path, name="llama"):
  out = tmp_path / "model"
  shutil.copytree(FIXTURES / name, out)
  return out


def _edit_config(directory, **changes):
  config = json.loads((directory / "config.json").read_text())
  config.update(changes)
  (directory / "config.json").write_text(json.dumps(config))
  return directory


def _drop_tensor(directory, name):
  tensors = _tensors(directory)
  del tensors[name]
  safetensors.numpy.save_file(tensors, directory / "model.safetensors")
  return directory


def _add_tensor(directory, name, value):
  safetensors.numpy.save_file({**_tensors(directory), name: value}, directory / "model.safetensors")
  return directory


def _pickle_only(tmp_path):
  d = _copy(tmp_path)
  (d / "model.safetensors").rename(d / "pytorch_model.bin")
  return d


def _no_weights(tmp_path):
  d = _copy(tmp_path)
  (d / "model.safetensors").unlink()
  return d


BAD_DIRECTORIES = {  # id: (make the directory, what the one line must say)
    "not_a_directory": (lambda t: t / "meta-llama/Llama-3-8B", "is not a directory"),
    "no_config_json": (lambda t: (_copy(t) / "config.json").unlink() or t / "model",
                       "config.json not found"),
    "corrupt_config_json": (lambda t: (_copy(t) / "config.json").write_text("{") and t / "model",
                            "config.json is corrupt"),
    "pickle_checkpoint": (_pickle_only, "pytorch_model.bin, a pickle checkpoint.*convert it to "
                          "safetensors"),
    "no_weights": (_no_weights, "holds no \\*.safetensors"),
    "unsupported_model_type": (lambda t: _edit_config(_copy(t), model_type="gemma"),
                               "model_type 'gemma' is not supported"),
    "unsupported_rope": (lambda t: _edit_config(_copy(t), rope_parameters={
        "rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    "mixed_sliding_layers": (lambda t: _edit_config(_copy(t, "qwen2"), use_sliding_window=True,
                                                    sliding_window=4, max_window_layers=1,
                                                    layer_types=None),
                             "layers mix sliding and full attention"),
    "gelu": (lambda t: _edit_config(_copy(t), hidden_act="gelu"), "hidden_act 'gelu'"),
    "shape_contradicts_weights": (lambda t: _edit_config(_copy(t), intermediate_size=96),
                                  "down_proj.weight is \\[32, 64\\] in the safetensors but "
                                  "config.json implies \\[32, 96\\]"),
    "missing_tensor": (lambda t: _drop_tensor(_copy(t), "model.layers.1.mlp.up_proj.weight"),
                       "implies the tensor model.layers.1.mlp.up_proj.weight"),
    "unexpected_bias": (lambda t: _add_tensor(_copy(t), "model.layers.0.self_attn.q_proj.bias",
                                              np.zeros(32, np.float32)),
                        "hold model.layers.0.self_attn.q_proj.bias, which config.json does not"),
    "missing_shard": (lambda t: (_copy(t, "qwen2") / "model-00002-of-00003.safetensors").unlink()
                      or t / "model", "names model-00002-of-00003.safetensors, which is not in"),
}


@pytest.mark.parametrize("case", BAD_DIRECTORIES)
def test_a_bad_model_directory_stops_with_one_line(case, tmp_path):
  make, message = BAD_DIRECTORIES[case]
  with pytest.raises(ValueError, match=message) as e:
    hf.load_pretrained(make(tmp_path))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("update, message", [
    (lambda c: c.model.update(num_layers=3), "model.num_layers=3 contradicts .*config.json \\(2\\)"),
    (lambda c: c.outer.update(init_from="/elsewhere"), "both say where the run starts"),
])
def test_a_config_contradicting_the_checkpoint_stops_with_one_line(update, message):
  c = _hf_run_config()
  update(c)
  with pytest.raises(ValueError, match=message) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_rope_keys_may_rescale_the_checkpoint():
  c = _hf_run_config()
  c.model.rope_theta = 40000.0
  assert config_lib.validate(c).model.rope_theta == 40000.0


def test_export_refuses_a_workdir_without_a_run_in_one_line(tmp_path, capsys):
  assert export_lib.main(["export", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "config.json not found" in err
