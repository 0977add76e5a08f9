"""Long-context continued pretraining: a Llama-3 8B checkpoint taken to 128K tokens.

The model is experiments/llama3_8b.py's, its weights a local Hugging Face directory. RoPE is
rescaled the Llama 3.1 way (`rope_type=llama3`, factor 8 over the original 8192 tokens: long
wavelengths divided by 8, short ones kept, the band between blended), which is how Meta took
Llama 3 from 8K to 128K; these `model.rope_*` keys override the directory's config.json (for a
Llama 3.1 checkpoint they equal it). One 128K sequence per step is split over the 8 devices by
USP, ring 2 x Ulysses 4 (Ulysses on the fastest links; 8 KV heads over 4); parameters, gradients
and AdamW state are ZeRO-3 over the same 8 devices (mesh.py: `embed` over fsdp, ring, ulysses).
MsT (MLP in 8 mini-sequences, LM head and loss in 32) and remat `full` keep activations to a
block's input per layer.

  python -m lcjax.main --config=experiments/llama3_8b_long.py --workdir=runs/llama3_128k \\
    --config.model.init_from_hf=models/Meta-Llama-3-8B --config.data.tokenizer=hf \\
    --config.data.source=jsonl --config.data.paths='/data/long/*.jsonl'
  python -m lcjax.evaluate --workdir=runs/llama3_128k \\
    --passkey_lengths=8192,32768,65536,131072    # loss by position + passkey, after training

Memory per device, from the H100 compiler (`python -m lcjax.main
--config=experiments/llama3_8b_long.py --workdir=/tmp/x --dry_run --target=gpu:h100:8`, jax 0.10.2
with requirements-targets.txt, 2026-12-07, 6 min on a 2-core CPU machine): 26.2 GiB of an H100's
79.7 GiB (step_bytes; 11.2 GiB of arguments, parameters and AdamW state ZeRO-3 over the 8 GPUs,
15.0 GiB of temporaries), 8.03e9 parameters, 2.17e16 FLOPs per step. The CPU compiler on 8 fake
devices gives 33.0 GiB for the same step. So an 80 GB GPU holds it with room to spare, and a
longer sequence (256K) is the next thing to try with scripts/fit.py.
What to expect (not run here: no 8B checkpoint and no GPU): the held-out loss by position
(lcjax.evaluate) flat or falling past 8K where the unscaled model's rises, and passkey accuracy
at 64K-128K rising from near 0 as long documents are trained on.

`get_config("tiny")`: the same recipe on 8 CPU devices, from the tiny Llama 3 fixture
(tests/fixtures/hf/llama3: llama3 RoPE factor 8 over 64 tokens) rescaled to factor 32 and
trained at 512 tokens, ring 2 x Ulysses 4, MsT, remat full; 4 steps took 1 min 46 s (49 s of
CPU) on a shared 2-core machine, most of it compiling:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m lcjax.main \\
    --config=experiments/llama3_8b_long.py:tiny --workdir=/tmp/long_tiny
"""
import importlib.util
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def _base_8b():
  """experiments/llama3_8b.py's get_config() (config files are loaded by path, not as a package)."""
  spec = importlib.util.spec_from_file_location("llama3_8b", HERE / "llama3_8b.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _long_context(c, seq_len: int, ring: int, ulysses: int):
  """The recipe's changes to a config: one sequence of seq_len over ring x ulysses devices,
  MsT and remat, a continued-pretraining learning rate."""
  c.train.seq_len = seq_len
  c.train.batch_size = 1          # one sequence per step: every device is on the sequence axes
  c.mesh.update(replica=1, data=1, fsdp=1, ring=ring, ulysses=ulysses, tensor=1)
  c.sp.strategy = "usp"
  c.sp.layout = "zigzag"          # balances causal work over the ring
  c.model.mlp_chunks = 8          # MsT: the MLP's hidden over mini-sequences
  c.model.loss_chunks = 32        # MsT: the LM head and loss over mini-sequences
  c.model.remat = "full"          # keep each block's input only
  c.model.rope_type = "llama3"    # rescaled RoPE (overrides the checkpoint's config.json)
  c.train.lr = 2e-5               # continued pretraining: small steps from a trained model
  c.train.warmup_steps = 20
  return c


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown variant {arg!r}; use experiments/llama3_8b_long.py or ...:tiny")
  if arg == "tiny":
    from lcjax.config import base_config
    c = _long_context(base_config(), seq_len=512, ring=2, ulysses=4)
    c.model.init_from_hf = str(HERE.parent / "tests" / "fixtures" / "hf" / "llama3")
    c.model.rope_scaling = 32.0      # the fixture's factor 8 over 64 tokens, 4x again for 8x its 64
    c.model.rope_original_len = 64
    c.data.tokenizer = "hf"          # the fixture's tokenizer.json
    c.data.max_documents = 40
    c.train.update(steps=20, lr=1e-3, warmup_steps=2, eval_every=10, eval_batches=1,
                   log_every=5, sample_prompt="")
    c.checkpoint.every = 10
    return c
  c = _long_context(_base_8b(), seq_len=131072, ring=2, ulysses=4)
  c.model.rope_scaling = 8.0         # Llama 3.1: 8K -> 128K
  c.model.rope_original_len = 8192
  c.model.rope_low_freq_factor = 1.0
  c.model.rope_high_freq_factor = 4.0
  c.train.steps = 2000               # 2000 x 128K = 262M tokens
  c.train.eval_every = 200
  c.checkpoint.every = 200
  return c
