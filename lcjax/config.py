"""The base config every experiment starts from, and its validation.

Each field is commented here; experiments override values, never add keys. `validate` fails
at start, naming the offending key and value and the fix.
"""
import math

import ml_collections

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "offload")
MESH_AXES = ("replica", "data", "fsdp", "ring", "ulysses", "tensor")


def mesh_size(mesh_config, axis: str) -> int:
  """An axis's whole size: per host (mesh.<axis>) x across hosts (mesh.dcn_<axis>). mesh.data
  may be -1 (filled when the mesh is built), so ask the mesh for that one."""
  return mesh_config[axis] * mesh_config.get(f"dcn_{axis}", 1)
ATTENTION_IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas", "pallas_interpret", "cudnn")
COMPRESSION_FORMATS = ("float32", "bfloat16", "int8", "int4")  # outer/compression.py
ROUTINGS = ("uniform", "kmeans", "product_kmeans", "discriminative")  # outer/routing.py


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000            # optimizer steps in the whole run
  c.train.batch_size = 32         # global batch, in sequences
  c.train.seq_len = 256           # tokens per sequence
  c.train.lr = 3e-3               # peak learning rate (after warmup)
  c.train.warmup_steps = 100      # linear warmup from 0 to lr
  c.train.end_lr_fraction = 0.1   # cosine decays to lr * end_lr_fraction at the last step
  c.train.eval_every = 200        # evaluate on the held-out split every N steps (and at the end)
  c.train.eval_batches = 8        # held-out batches per evaluation (0 = the whole split)
  c.train.log_every = 20          # write train metrics every N steps
  c.train.seed = 0                # parameter init, data order
  c.train.peak_flops = 0.0        # per-device peak FLOP/s for MFU; 0 = measure a matmul at start
  c.train.sample_prompt = "def "  # prompt of the text sample written at the end ("" = no sample)
  c.train.sample_tokens = 200     # tokens generated for that sample
  c.train.nan_policy = "stop"     # a non-finite loss or gradient norm: stop (naming the step and
                                  # the last finite checkpoint) | skip (drop that update, go on,
                                  # counted in train/skipped_steps)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 200        # save every N steps (and always at the end)
  c.checkpoint.keep = 3           # keep the last K checkpoints

  c.mesh = ml_collections.ConfigDict()
  c.mesh.replica = 1              # DiLoCo/DiPaCo islands (slowest links)
  c.mesh.data = -1                # plain data parallel; -1 = all devices the other axes leave
  c.mesh.fsdp = 1                 # data parallel with sharded params/optimizer state (ZeRO-3)
  c.mesh.ring = 1                 # sequence parallel, ring attention
  c.mesh.ulysses = 1              # sequence parallel, all-to-all head scatter
  c.mesh.tensor = 1               # tensor parallel over heads and MLP hidden
  # Several hosts (or TPU slices): the sizes above are per host (ICI / NVLink); each axis may also
  # span hosts over the slow links (DCN / network): its whole size is mesh.<axis> x
  # mesh.dcn_<axis>, and the product of the dcn_ sizes is the number of hosts (processes, or TPU
  # slices). DiLoCo/DiPaCo islands belong there (dcn_replica), and plain data parallelism.
  for axis in MESH_AXES:
    c.mesh[f"dcn_{axis}"] = 1       # this axis's size across hosts (1: within one host)

  c.sp = ml_collections.ConfigDict()   # sequence parallelism, on when mesh.ring * mesh.ulysses > 1
  c.sp.strategy = "usp"           # usp (Ulysses inside ring) | ulysses | ring | allgather | auto
  c.sp.layout = "zigzag"          # zigzag (balanced causal work) | contiguous

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4          # transformer blocks in total
  c.model.num_levels = 1          # blocks are grouped into levels of num_layers/num_levels blocks
  c.model.embed_dim = 256         # model width E
  c.model.num_heads = 4           # query heads H
  c.model.num_kv_heads = 2        # key/value heads K (GQA when K < H; H % K == 0)
  c.model.head_dim = 64           # D
  c.model.mlp_dim = 768           # SwiGLU hidden width F
  c.model.vocab_size = 0          # embedding rows; 0 = tokenizer vocab rounded up to a multiple of 128
  c.model.rope_theta = 10000.0    # RoPE base
  c.model.rope_scaling = 0.0      # RoPE frequency scaling factor (model.rope_type); 0 = off
  c.model.rope_type = "llama3"    # how rope_scaling scales: llama3 (per band, Llama 3.1) | linear
                                  # (positions / factor) | yarn (arXiv 2309.00071, Qwen2.5)
  c.model.rope_low_freq_factor = 1.0    # llama3 scaling: wavelengths above orig_len/low are scaled
  c.model.rope_high_freq_factor = 4.0   # llama3 scaling: wavelengths below orig_len/high are kept
  c.model.rope_original_len = 8192      # llama3/yarn scaling: the pretraining context length
  c.model.rope_beta_fast = 32.0   # yarn: dimensions turning more often over rope_original_len are kept
  c.model.rope_beta_slow = 1.0    # yarn: dimensions turning less often are interpolated
  c.model.rope_attention_factor = 0.0  # yarn: cos/sin scale (attention temperature); 0 = 0.1 ln(factor) + 1
  c.model.rope_truncate = True    # yarn: round the ramp's bounds out to whole dimensions
  c.model.norm_eps = 1e-5         # RMSNorm epsilon
  c.model.tie_embeddings = True   # LM head shares the token embedding
  c.model.attention_bias = False  # biases on the q, k and v projections (Qwen2)
  c.model.init_from_hf = ""       # a local Hugging Face model directory (config.json + safetensors,
                                  # lcjax/hf.py): the model's shape comes from its config.json (model
                                  # keys left at their defaults take its values; rope_* keys may
                                  # rescale RoPE; any other key that differs is an error) and this run
                                  # starts from its weights unless it resumes its own checkpoint
  c.model.dtype = "float32"       # compute dtype (params stay float32): float32 | bfloat16
  c.model.attention = "auto"      # ops.attention implementation: auto | reference | xla | pallas |
                                  # cudnn (GPU; needs dtype bfloat16, document_mask False)
  c.model.sliding_window = 0      # attend to the last N positions only; 0 = unlimited
  c.model.document_mask = True    # packed documents attend only within themselves (segment ids);
                                  # False: causal by token index over the whole packed sequence
                                  # (RoPE positions still restart per document)
  c.model.remat = "none"          # per-block remat: none | full | dots (keep matmul outputs) |
                                  # offload (block inputs to host memory, all else recomputed)
  c.model.mlp_chunks = 1          # MsT mini-sequences for the MLP (1 = off)
  c.model.loss_chunks = 1         # MsT mini-sequences for LM head + loss (1 = off)
  c.model.z_loss = 0.0            # z-loss weight (log of the softmax normaliser, squared); 0 = off

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"          # adamw | sgd
  c.optim.b1 = 0.9                # AdamW beta1
  c.optim.b2 = 0.95               # AdamW beta2
  c.optim.eps = 1e-8              # AdamW epsilon
  c.optim.momentum = 0.9          # SGD momentum (0 = plain SGD)
  c.optim.weight_decay = 0.1      # decoupled weight decay on matrices (not on norms)
  c.optim.clip_norm = 1.0         # global gradient-norm clipping; 0 = off
  c.optim.offload = False         # adamw only: fp32 master params + moments in host memory
                                  # (Deep Optimizer States), updated per subgroup on host or device
  c.optim.subgroup_mb = 64.0      # offload: subgroup size in MiB of fp32 params (whole leaves)
  c.optim.update_on = "auto"      # offload: auto (performance model) | host | device | alternate
  c.optim.host_lane = "auto"      # offload: host update as jit (CPU backend's default) |
                                  # cpu_backend (accelerators' default; see optim/host_lane.py)
  c.optim.h2d_gbps = 0.0          # offload model: host->device GB/s; 0 = measure at start
  c.optim.d2h_gbps = 0.0          # offload model: device->host GB/s; 0 = measure at start
  c.optim.host_update_gbps = 0.0  # offload model: state GB/s of the host AdamW; 0 = measure
  c.optim.device_update_gbps = 0.0  # offload model: state GB/s of the device AdamW; 0 = measure

  c.outer = ml_collections.ConfigDict()  # the outer loop over the mesh.replica islands
  c.outer.kind = "none"           # none | diloco (H inner steps per island, then one sync) |
                                  # dipaco (DiLoCo over paths of shared modules; outer/dipaco.py)
  c.outer.inner_steps = 50        # H: inner steps between syncs
  c.outer.optimizer = "sgd"       # outer optimizer on the averaged pseudo-gradient: sgd | adam
  c.outer.lr = 0.7                # outer learning rate (DiLoCo: 0.7)
  c.outer.momentum = 0.9          # sgd momentum (0 = none) / adam b1
  c.outer.nesterov = True         # sgd: Nesterov momentum
  c.outer.compression = "float32"  # outer gradient on the wire: float32 | bfloat16 | int8 | int4
  c.outer.drop_replicas = ""      # fault drill: "r@k,..." leaves island r out of outer step k (1-based)
  c.outer.init_from = ""          # workdir of a plain run (same model): its latest checkpoint starts
                                  # this run (without an outer loop: the model and its optimizer;
                                  # DiLoCo: every island and theta), which goes on from its step;
                                  # dipaco: a DiPaCo run of the same grid, whose whole state goes on
                                  # here re-routed (discriminative: its paths label the router data)
  c.outer.init_step = 0           # the checkpoint step of init_from to start from; 0 = its latest
  c.outer.modules = "1"           # dipaco: modules per level, "K1xK2x..." (one factor per
                                  # model.num_levels); their product is the number of paths P;
                                  # P > mesh.replica trains the paths in P / mesh.replica rounds
  c.outer.private = ""            # dipaco: parts each path keeps to itself: embed, head, level<i>
  c.outer.routing = "uniform"     # dipaco: how documents are routed to paths (outer/routing.py):
                                  # uniform | kmeans | product_kmeans (a 2-level grid) |
                                  # discriminative (a logistic regression on router data)
  c.outer.overlap = 1             # dipaco: each train document goes to its n best paths' shards
  c.outer.route_prefix = 32       # dipaco: tokens of a document its routing feature reads
  c.outer.base_from = ""          # dipaco: workdir of a plain run (same model): its checkpoint
                                  # (outer.init_step, 0 = latest) starts every module, and its
                                  # model gives feature routers their features
  c.outer.router_fraction = 0.0   # dipaco: share of the train documents kept apart as router data
                                  # (in no shard; discriminative routing is fitted on them)
  c.outer.early_stopping = False  # dipaco: a path whose held-out loss rises above its best stops
                                  # taking part in the syncs (its modules no longer move for it)

  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"        # stdlib (this Python's own .py sources) | text | jsonl |
                                  # arrayrecord (a directory from scripts/prepare_data.py)
  c.data.paths = ""               # text/jsonl: comma-separated globs of files; arrayrecord: the
                                  # directory (its train/held-out split and tokenizer are fixed)
  c.data.eval_paths = ""          # optional globs of held-out files; "" = split `paths` by file hash
  c.data.eval_fraction = 0.05     # fraction of files (or JSONL documents) held out when splitting
  c.data.text_field = "text"      # jsonl: the field holding the document text
  c.data.tokenizer = "bytes"      # bytes | hf (local tokenizer.json) | sentencepiece (local .model)
  c.data.tokenizer_path = ""      # path of the tokenizer file for hf/sentencepiece (hf with
                                  # model.init_from_hf: "" = that directory's tokenizer.json)
  c.data.max_documents = 0        # use only the first N documents of each split; 0 = all
  c.data.dedupe = False           # keep only the first of documents with the same text (no text
                                  # trained twice, none held out as a copy of a train document)
  c.data.eval_skip_prefix = 0     # held-out loss leaves out each document's first N targets
                                  # (DiPaCo's routing prefix: score every model after it)
  c.data.prefetch = 2             # host batches built ahead in a background thread; 0 = off
  return c


def parse_drops(spec: str, replicas: int) -> dict:
  """outer.drop_replicas, "r@k,r@k,...": island r is left out of outer step k (counted from 1)
  -> {k: {r, ...}}; ValueError naming the bad entry."""
  drops = {}
  for entry in filter(None, (e.strip() for e in spec.split(","))):
    try:
      replica, step = (int(v) for v in entry.split("@"))
    except ValueError:
      raise ValueError(f"outer.drop_replicas entry {entry!r} must read REPLICA@OUTER_STEP, "
                       "e.g. '1@2' leaves island 1 out of the second sync") from None
    if not 0 <= replica < replicas or step < 1:
      raise ValueError(f"outer.drop_replicas entry {entry!r}: the island must be in "
                       f"[0, {replicas}) (mesh.replica={replicas}) and the outer step >= 1")
    drops.setdefault(step, set()).add(replica)
  for step, dropped in drops.items():
    if len(dropped) == replicas:
      raise ValueError(f"outer.drop_replicas leaves every island out of outer step {step}; "
                       "keep at least one")
  return drops


def _check_keys(config, reference, prefix=""):
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      known = ", ".join(sorted(reference.keys()))
      raise ValueError(f"unknown config key '{name}'; known keys here: {known}")
    if isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ValueError(f"config key '{name}' must be a section, got {config[key]!r}")
      _check_keys(config[key], reference[key], name + ".")


def _require(ok, message):
  if not ok:
    raise ValueError(message)


def _check_outer(full):
  u = full.outer
  _require(u.kind in ("none", "diloco", "dipaco"),
           f"outer.kind must be none, diloco or dipaco; got {u.kind!r}")
  _require(u.kind == "dipaco" or not u.base_from, "outer.base_from starts DiPaCo's modules and "
           "routes its documents; it needs outer.kind='dipaco' (DiLoCo starts from "
           "outer.init_from)")
  _require(u.kind == "dipaco" or not u.early_stopping, "outer.early_stopping stops DiPaCo's "
           "paths one by one; it needs outer.kind='dipaco'")
  if u.kind == "none":
    return
  if u.kind == "dipaco":
    _check_dipaco(full)
  _require(u.inner_steps > 0, f"outer.inner_steps must be > 0; got {u.inner_steps}")
  _require(u.optimizer in ("sgd", "adam"), f"outer.optimizer must be sgd or adam; got {u.optimizer!r}")
  _require(u.lr > 0, f"outer.lr must be > 0; got {u.lr}")
  _require(0 <= u.momentum < 1, f"outer.momentum must be in [0, 1); got {u.momentum}")
  _require(u.compression in COMPRESSION_FORMATS,
           f"outer.compression must be one of {COMPRESSION_FORMATS}; got {u.compression!r}")
  parse_drops(u.drop_replicas, mesh_size(full.mesh, "replica"))
  _require(not full.optim.offload or full.optim.update_on in ("auto", "device"),
           f"optim.update_on={full.optim.update_on!r} puts subgroups on host lanes, which run "
           "outside the step; inside outer.kind='diloco' islands every subgroup streams through "
           "the device: set optim.update_on='device' (or 'auto')")


def _check_dipaco(full):
  from lcjax.outer import paths
  u = full.outer
  grid = paths.grid_of(full)
  R, P = mesh_size(full.mesh, "replica"), grid.num_paths
  _require(R % P == 0 or P % R == 0,
           f"outer.modules={u.modules!r} gives {P} paths; mesh.replica ({R}) must be a multiple "
           f"of it (each path trains on mesh.replica / P islands) or divide it (the paths train "
           "in P / mesh.replica rounds)")
  _require(full.train.batch_size % mesh_size(full.mesh, "replica") == 0,
           f"train.batch_size ({full.train.batch_size}) must be a multiple of mesh.replica "
           f"({mesh_size(full.mesh, 'replica')}): every island reads its share of its path's batch")
  _require(u.routing in ROUTINGS, f"outer.routing must be one of {ROUTINGS}; got {u.routing!r}")
  _require(u.routing == "uniform" or u.base_from, f"outer.routing={u.routing!r} routes by a "
           "base model's features: set outer.base_from to a plain run's workdir")
  _require(0 <= u.router_fraction < 1, "outer.router_fraction must be in [0, 1) (the share of "
           f"train documents kept apart as router data); got {u.router_fraction}")
  _require(u.routing != "discriminative" or (u.init_from and u.router_fraction > 0),
           "outer.routing='discriminative' labels router data with the paths of a trained DiPaCo "
           "run: set outer.init_from to that run's workdir and outer.router_fraction > 0 (the "
           "same as that run's)")
  _require(u.routing != "product_kmeans" or len(grid.modules) == 2, "outer.routing="
           f"'product_kmeans' pairs two clusterings: it needs a 2-level grid; got "
           f"outer.modules={u.modules!r}")
  _require(1 <= u.overlap <= grid.num_paths, f"outer.overlap must be in [1, P={grid.num_paths}] "
           f"(the shards each train document joins); got {u.overlap}")
  _require(u.routing == "uniform" or 1 <= u.route_prefix < full.train.seq_len,
           f"outer.route_prefix must be in [1, train.seq_len={full.train.seq_len}) for "
           f"outer.routing={u.routing!r}; got {u.route_prefix}")
  _require(u.routing == "uniform" or full.data.eval_skip_prefix >= u.route_prefix,
           f"outer.routing={u.routing!r} reads the first outer.route_prefix={u.route_prefix} "
           "tokens of every held-out document: set data.eval_skip_prefix="
           f"{u.route_prefix} (and the same in the runs it is compared with) so they are not "
           "scored")


def _check_cudnn(full):
  """model.attention='cudnn': what cuDNN's index-masked kernel needs (ops/cudnn_attention.py)."""
  m, sp, mesh = full.model, full.sp, full.mesh
  _require(m.dtype in ("bfloat16",), f"model.attention='cudnn' takes bfloat16 activations; set "
           f"model.dtype='bfloat16' (got {m.dtype!r}) or use model.attention='xla'")
  _require(not m.document_mask, "model.attention='cudnn' cannot mask packed documents from each "
           "other (no segment ids in jax's cuDNN path); set model.document_mask=False or use "
           "model.attention='xla'")
  _require(m.head_dim % 8 == 0 and m.head_dim <= 256, f"model.attention='cudnn' needs "
           f"model.head_dim a multiple of 8 and at most 256 (128 before Hopper); got {m.head_dim}")
  if mesh_size(mesh, "ring") * mesh_size(mesh, "ulysses") == 1:
    return
  _require(sp.strategy not in ("allgather", "auto"), f"sp.strategy={sp.strategy!r} with "
           "model.attention='cudnn': all-gather (which 'auto' may choose) attends queries at a "
           "global offset, which cuDNN's index masks cannot express; choose sp.strategy usp, "
           "ulysses or ring")
  ring = sp.strategy == "ring" or (sp.strategy == "usp" and mesh_size(mesh, "ring") > 1)
  _require(not (ring and m.sliding_window), f"model.sliding_window={m.sliding_window} with a "
           "ring and model.attention='cudnn': cuDNN cannot window the ring's off-diagonal blocks; "
           "use sp.strategy='ulysses', no window, or model.attention='xla'")
  _require(not ring or m.head_dim + 8 <= 256, f"model.attention='cudnn' in a ring needs "
           f"model.head_dim <= 248 (its backward adds 8 head-dim columns); got {m.head_dim}")


def _check_types(config, reference, prefix=""):
  """Each value has its default's type (an int may stand for a float) and is a finite number."""
  for key in config.keys():
    name, value, default = f"{prefix}{key}", config[key], reference[key]
    if isinstance(default, ml_collections.ConfigDict):
      _check_types(value, default, name + ".")
      continue
    if default is None:
      continue
    kind = type(default)
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))
          or kind is float and isinstance(value, int) and not isinstance(value, bool))
    _require(ok, f"config key '{name}' must be {kind.__name__} (like its default {default!r}); "
             f"got {value!r}")
    _require(not isinstance(value, float) or math.isfinite(value),
             f"config key '{name}' must be a finite number; got {value}")


def _check_train(t, o):
  for key in ("steps", "batch_size", "seq_len", "eval_every", "log_every", "sample_tokens"):
    _require(t[key] > 0, f"train.{key} must be > 0; got {t[key]}")
  for key in ("warmup_steps", "eval_batches", "seed", "peak_flops"):
    _require(t[key] >= 0, f"train.{key} must be >= 0; got {t[key]}")
  _require(t.lr > 0, f"train.lr must be > 0; got {t.lr}")
  _require(0 <= t.end_lr_fraction <= 1,
           f"train.end_lr_fraction must be in [0, 1]; got {t.end_lr_fraction}")
  _require(t.nan_policy in ("stop", "skip"),
           f"train.nan_policy must be stop or skip; got {t.nan_policy!r}")
  _require(t.nan_policy == "stop" or not o.offload, "train.nan_policy='skip' drops an update "
           "inside the step, but optim.offload=True updates host-resident state outside it; "
           "use train.nan_policy='stop' or optim.offload=False")


def _check_numbers(m, o):
  """Model and optimizer numbers outside their ranges (NaN-free, well-defined maths)."""
  _require(m.head_dim % 2 == 0, f"model.head_dim must be even (RoPE rotates pairs of "
           f"dimensions); got {m.head_dim}")
  _require(m.vocab_size >= 0, f"model.vocab_size must be >= 0 (0 = from the tokenizer); got "
           f"{m.vocab_size}")
  for key in ("rope_theta", "norm_eps", "rope_low_freq_factor", "rope_high_freq_factor",
              "rope_original_len", "rope_beta_fast", "rope_beta_slow"):
    _require(m[key] > 0, f"model.{key} must be > 0; got {m[key]}")
  _require(m.rope_scaling >= 0, f"model.rope_scaling must be >= 0 (0 = off); got {m.rope_scaling}")
  _require(m.rope_attention_factor >= 0, f"model.rope_attention_factor must be >= 0 (0 = derive "
           f"it); got {m.rope_attention_factor}")
  _require(m.rope_type in ("llama3", "linear", "yarn"),
           f"model.rope_type must be llama3, linear or yarn; got {m.rope_type!r}")
  for key in ("b1", "b2", "momentum"):
    _require(0 <= o[key] < 1, f"optim.{key} must be in [0, 1); got {o[key]}")
  _require(o.eps > 0, f"optim.eps must be > 0; got {o.eps}")
  _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {o.weight_decay}")


def validate(config) -> ml_collections.ConfigDict:
  """Checks keys and values; returns a locked copy with defaults for missing keys filled in."""
  base = base_config()
  _check_keys(config, base)
  _check_types(config, base)
  full = base
  full.update(config)  # missing keys keep their defaults
  if full.model.init_from_hf:  # the model's shape (and the hf tokenizer) from its config.json
    from lcjax import hf
    hf.adopt(full)
  t, m, o, d = full.train, full.model, full.optim, full.data
  _check_train(t, o)
  _check_numbers(m, o)
  _require(full.checkpoint.every > 0 and full.checkpoint.keep > 0,
           f"checkpoint.every and checkpoint.keep must be > 0; got {full.checkpoint.every}, "
           f"{full.checkpoint.keep}")
  for key in ("num_layers", "num_levels", "embed_dim", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "mlp_chunks", "loss_chunks"):
    _require(m[key] > 0, f"model.{key} must be > 0; got {m[key]}")
  _require(m.num_heads % m.num_kv_heads == 0,
           f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads "
           f"({m.num_kv_heads}); pick num_kv_heads among the divisors of num_heads")
  _require(m.num_layers % m.num_levels == 0,
           f"model.num_layers ({m.num_layers}) must be a multiple of model.num_levels "
           f"({m.num_levels})")
  _require(m.dtype in DTYPES, f"model.dtype must be one of {DTYPES}; got {m.dtype!r}")
  _require(m.remat in REMAT_POLICIES,
           f"model.remat must be one of {REMAT_POLICIES}; got {m.remat!r}")
  _require(m.attention in ATTENTION_IMPLEMENTATIONS,
           f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}; got {m.attention!r}")
  if m.attention == "cudnn":
    _check_cudnn(full)
  _require(m.sliding_window >= 0, f"model.sliding_window must be >= 0; got {m.sliding_window}")
  for key in ("mlp_chunks", "loss_chunks"):
    _require(m[key] <= t.seq_len, f"model.{key} ({m[key]}) exceeds the {t.seq_len} tokens of a "
             f"sequence (train.seq_len); use at most {t.seq_len}")
  _require(m.z_loss >= 0, f"model.z_loss must be >= 0; got {m.z_loss}")
  _require(o.name in ("adamw", "sgd"), f"optim.name must be adamw or sgd; got {o.name!r}")
  _require(o.clip_norm >= 0, f"optim.clip_norm must be >= 0 (0 = off); got {o.clip_norm}")
  _require(not o.offload or o.name == "adamw",
           f"optim.offload=True supports optim.name='adamw' only; got {o.name!r}")
  _require(o.subgroup_mb > 0, f"optim.subgroup_mb must be > 0; got {o.subgroup_mb}")
  _require(o.update_on in ("auto", "host", "device", "alternate"),
           f"optim.update_on must be auto, host, device or alternate; got {o.update_on!r}")
  _require(o.host_lane in ("auto", "jit", "cpu_backend"),
           f"optim.host_lane must be auto, jit or cpu_backend; got {o.host_lane!r}")
  for key in ("h2d_gbps", "d2h_gbps", "host_update_gbps", "device_update_gbps"):
    _require(o[key] >= 0, f"optim.{key} must be >= 0 (0 = measure at start); got {o[key]}")
  _require(d.source in ("stdlib", "text", "jsonl", "arrayrecord"),
           f"data.source must be stdlib, text, jsonl or arrayrecord; got {d.source!r}")
  _require(d.source == "stdlib" or d.paths,
           f"data.source={d.source!r} needs data.paths (comma-separated globs; arrayrecord: the "
           "directory scripts/prepare_data.py wrote)")
  _require(d.source != "arrayrecord" or not d.dedupe,
           "data.dedupe does not apply to data.source='arrayrecord' (its documents are fixed when "
           "prepared); remove it or prepare with scripts/prepare_data.py --dedupe")
  _require(d.source != "arrayrecord" or not d.eval_paths,
           "data.eval_paths does not apply to data.source='arrayrecord' (its held-out split is "
           "fixed when prepared); remove it or prepare with --eval_paths")
  _require(d.prefetch >= 0, f"data.prefetch must be >= 0 (batches built ahead; 0 = off); got "
           f"{d.prefetch}")
  _require(d.tokenizer in ("bytes", "hf", "sentencepiece"),
           f"data.tokenizer must be bytes, hf or sentencepiece; got {d.tokenizer!r}")
  _require(d.tokenizer == "bytes" or d.tokenizer_path,
           f"data.tokenizer={d.tokenizer!r} needs data.tokenizer_path (a local file)")
  _require(0 <= d.eval_fraction < 1, f"data.eval_fraction must be in [0, 1); got {d.eval_fraction}")
  _require(d.max_documents >= 0, f"data.max_documents must be >= 0 (0 = all); got "
           f"{d.max_documents}")
  _require(d.eval_skip_prefix >= 0, f"data.eval_skip_prefix must be >= 0 (0 = score every "
           f"held-out target); got {d.eval_skip_prefix}")
  for axis in MESH_AXES:
    _require(full.mesh[axis] >= 1 or (axis == "data" and full.mesh[axis] == -1),
             f"mesh.{axis} must be >= 1 (mesh.data may be -1: fill); got {full.mesh[axis]}")
    _require(full.mesh[f"dcn_{axis}"] >= 1,
             f"mesh.dcn_{axis} must be >= 1 (1: the axis stays within a host); got "
             f"{full.mesh[f'dcn_{axis}']}")
  _check_outer(full)
  _require(full.outer.kind != "none" or not full.outer.drop_replicas,
           "outer.drop_replicas leaves islands out of outer syncs, which need "
           "outer.kind='diloco'; remove it or set outer.kind")
  if mesh_size(full.mesh, "ring") * mesh_size(full.mesh, "ulysses") > 1:
    from lcjax import ops  # imported here: config stays importable without JAX set up
    ops.check_sequence_parallel(m.num_heads, m.num_kv_heads, t.seq_len,
                                ring_size=mesh_size(full.mesh, "ring"),
                                ulysses_size=mesh_size(full.mesh, "ulysses"),
                                strategy=full.sp.strategy, layout=full.sp.layout)
  full.lock()
  return full
