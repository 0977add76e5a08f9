"""DiPaCo on 8 CPU devices: a 2x2 grid of modules (4 paths) over 4 islands of 2 data-parallel
devices each, a byte-level Llama whose 2 blocks are the grid's 2 levels, on a corpus of three
domains found on every machine that runs lcjax (see `corpus_globs`): this Python's standard
library sources (Python), its C API headers (C), and the package metadata and licences of the
environment's installed packages (English prose and markdown).

Two steps. First the dense base model, trained on the whole corpus (`:base`); then DiPaCo from
its checkpoint: the base model's features route every document (k-means with one cluster per
path; product k-means, --config.outer.routing=product_kmeans, gives this corpus lopsided shards:
docs/dipaco.md), every path starts from the base state and trains 50 inner steps on its shard
between syncs; each module is averaged over the paths through it only.

  export XLA_FLAGS=--xla_force_host_platform_device_count=8
  python -m lcjax.main --config=experiments/dipaco_cpu.py:base --workdir=runs/dipaco_base
  python -m lcjax.main --config=experiments/dipaco_cpu.py --workdir=runs/dipaco_2x2 \
    --config.outer.base_from=runs/dipaco_base

Every run scores held-out documents after their first `route_prefix` tokens (the tokens the
router reads), over the whole held-out split. `scripts/compare_dipaco.py` runs the comparison
(dense, DiLoCo P=4, flat MoE, 2x2, 2x2 with private embedding and head, discriminative
routing, 2x4 in rounds); docs/dipaco.md holds its measured figures.
"""
import glob
import sysconfig

from lcjax.config import base_config

BASE_STEPS = 500   # the base run; the DiPaCo runs go on from its last checkpoint
STEPS = 1000       # every run ends here: 500 inner steps per path after the base


def corpus_globs() -> str:
  """Three domains: Python (the standard library's top-level modules), C (the interpreter's C
  API headers) and prose (installed packages' METADATA files, which hold their READMEs, and
  their licence texts). All ship with any CPython and lcjax's environment; a glob that matches
  nothing here (another packaging layout) is left out."""
  where = sysconfig.get_paths()
  patterns = [f"{where['stdlib']}/*.py",
              f"{where['include']}/**/*.h",
              f"{where['purelib']}/*.dist-info/METADATA",
              f"{where['purelib']}/*.dist-info/LICENSE*",
              f"{where['purelib']}/*.dist-info/licenses/**/*"]
  return ",".join(p for p in patterns if any(glob.iglob(p, recursive=True)))


def get_config(arg: str = "dipaco"):
  if arg not in ("dipaco", "base"):
    raise ValueError(f"experiments/dipaco_cpu.py:{arg}: the argument must be 'base' (the dense "
                     "base run) or empty (DiPaCo from it)")
  c = base_config()
  c.data.update(source="text", paths=corpus_globs(), dedupe=True, eval_fraction=0.05,
                eval_skip_prefix=32)  # licences come in many identical copies
  c.train.update(steps=STEPS, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=30,
                 end_lr_fraction=1.0,  # constant after warmup: every run goes on from the base
                 eval_every=100, eval_batches=0, log_every=10, sample_prompt="")
  c.checkpoint.every = 250
  c.model.update(num_layers=2, num_levels=2, embed_dim=128, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=384)
  if arg == "base":
    c.train.steps = BASE_STEPS
    c.mesh.update(replica=1, data=8)
    return c
  c.mesh.update(replica=4, data=2)
  c.outer.update(kind="dipaco", modules="2x2", routing="kmeans", route_prefix=32,
                 router_fraction=0.15, inner_steps=50, optimizer="sgd", lr=0.7, momentum=0.9,
                 nesterov=True, base_from="runs/dipaco_base")
  return c
