"""Planner: the fastest configuration of a training step that fits a compile target.

For a model, a target (`lcjax.targets`) and a sequence length, the candidates are every
combination of
  sequence parallelism  ring x ulysses over a factor of the chips (USP; 1 x 1 = none), the rest
                        of the chips fsdp;
  MsT                   off, or on with `fit.mst_chunks`;
  remat                 none | dots | full | offload (block inputs to host memory);
  optimizer offload     off | on (fp32 master params and moments in host memory).
Each candidate's step time is predicted by a cost model (`predict`), and its memory is what the
target's compiler says (`fit.step_memory`: its peak, or RESOURCE_EXHAUSTED). Compiles are the
cost, so candidates are compiled fastest-predicted first, and the first that fits is the plan:
every slower one is left uncompiled. A candidate that needs at least the memory of one that did
not fit is skipped too (`needs_at_least`: the same split, with no technique the failed one lacks,
and a remat policy that keeps as much), so the hopeless fast candidates cost one compile per
split, not one each. On a TPU target a candidate that does not fit fails in seconds
(RESOURCE_EXHAUSTED before scheduling); a candidate that fits takes minutes.

The cost model, per device and step (an estimate to rank candidates, not a measurement):
  compute   model FLOPs (DESIGN.md convention) / chips plus what the candidate recomputes:
            remat full/offload the blocks' forward, dots the attention forward (its kernel's
            outputs are not dots), MsT the MLP and LM-head forward of each mini-sequence; at
            `EFFICIENCY` of the target's peak;
  attention the exposed sequence-parallel communication of `ops.cost_model.estimate` per layer,
            a third more where the attention forward is recomputed;
  ZeRO-3    all-gathers of the bf16 params (forward, backward, recomputed forward) and the
            reduce-scatter of the fp32 gradients over fsdp x ring x ulysses (`mesh.py` shards the
            parameters over all three), over the chip links, hidden behind compute up
            to its length (XLA's asynchronous collectives);
  host      remat offload's block inputs out and back, hidden behind compute up to its length;
            optimizer offload keeps the fp32 params and moments in host memory and updates them
            there (`optim.update_on=host`: the least device memory): the gradients go down, the
            bf16 params come up, the host AdamW reads and writes the state at
            `HOST_ADAMW_BYTES_S` per chip; after the backward pass, so not hidden.
"""
import dataclasses
import itertools
import math

from lcjax import fit
from lcjax.model import ModelConfig
from lcjax.ops import cost_model

EFFICIENCY = 0.5  # fraction of peak the step's matmuls and kernels reach (an assumption)
HOST_ADAMW_BYTES_S = 10e9  # state bytes per second a host's AdamW updates per chip (assumed)
REMAT_BY_MEMORY = ("offload", "full", "dots", "none")  # least device memory first


@dataclasses.dataclass(frozen=True)
class Candidate:
  ring: int
  ulysses: int
  fsdp: int
  mst: bool
  remat: str
  offload: bool

  def overrides(self, model_config) -> dict:
    chunks = fit.mst_chunks(model_config) if self.mst else {"mlp_chunks": 1, "loss_chunks": 1}
    return {"mesh.data": 1, "mesh.fsdp": self.fsdp, "mesh.ring": self.ring,
            "mesh.ulysses": self.ulysses, "mesh.replica": 1, "mesh.tensor": 1,
            "model.remat": self.remat, **{f"model.{k}": v for k, v in chunks.items()},
            "optim.offload": self.offload, "optim.update_on": "host" if self.offload else "auto"}

  def describe(self) -> str:
    return (f"ring {self.ring} x ulysses {self.ulysses}, fsdp {self.fsdp}, MsT "
            f"{'on' if self.mst else 'off'}, remat {self.remat}, optimizer offload "
            f"{'on' if self.offload else 'off'}")


@dataclasses.dataclass(frozen=True)
class Prediction:
  compute_s: float
  attention_comm_s: float
  fsdp_exposed_s: float
  host_exposed_s: float

  @property
  def step_s(self) -> float:
    return self.compute_s + self.attention_comm_s + self.fsdp_exposed_s + self.host_exposed_s


@dataclasses.dataclass(frozen=True)
class Row:
  candidate: Candidate
  prediction: Prediction
  memory: fit.StepMemory | None  # None: not compiled
  fits: bool
  note: str = ""


def model_config(config) -> ModelConfig:
  """The model config of an experiment config (its tokenizer gives the vocabulary)."""
  from lcjax import config as config_lib
  from lcjax.data.tokenizers import make_tokenizer
  config = config_lib.validate(config)
  return ModelConfig.from_config(config, make_tokenizer(config.data).vocab_size)


def predict(c: Candidate, cfg: ModelConfig, target, batch_size: int, seq_len: int,
            param_count: int) -> Prediction:
  """The cost model of the module docstring for candidate `c`."""
  from lcjax import metrics
  E, H, K, D, F, V, L = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.mlp_dim, cfg.vocab_size, cfg.num_layers)
  chips, tokens = target.chips, batch_size * seq_len
  window = min(seq_len, cfg.sliding_window or seq_len)
  attn_fwd = 4 * batch_size * H * D * (seq_len * window - window * window / 2) * L
  block_fwd = 2 * (2 * E * H * D + 2 * E * K * D + 3 * E * F) * tokens * L + attn_fwd
  extra = {"none": 0.0, "dots": attn_fwd, "full": block_fwd, "offload": block_fwd}[c.remat]
  if c.mst:
    extra += 2 * 3 * E * F * tokens * L + 2 * E * V * tokens
  flops = metrics.train_flops_per_step(cfg, batch_size, seq_len) + extra
  compute = flops / chips / (target.peak_flops_per_chip * EFFICIENCY)

  topo = target.cost_topology()
  attention = 0.0
  if c.ring * c.ulysses > 1:
    shape = cost_model.AttentionShape(batch=max(batch_size // c.fsdp, 1), seq_len=seq_len,
                                      num_heads=H, num_kv_heads=K, head_dim=D)
    per_layer = cost_model.estimate("usp", shape, c.ring, c.ulysses, topo).comm_s
    attention = per_layer * L * (4 / 3 if c.remat != "none" else 1.0)

  link = target.spec.link_gbytes_s * 1e9
  zero = c.fsdp * c.ring * c.ulysses
  share = (zero - 1) / zero
  gathers = 3 if c.remat in ("full", "offload") else 2
  fsdp_s = (gathers * 2 + 4) * param_count * share / link
  host = target.spec.host_gbytes_s * 1e9
  local_tokens = tokens / chips
  remat_host_s = 2 * L * local_tokens * E * 2 / host if c.remat == "offload" else 0.0
  shard = param_count / (c.fsdp * c.ring * c.ulysses)  # ZeRO-3 over fsdp x ring x ulysses
  optimizer_host_s = (max(12 * shard / HOST_ADAMW_BYTES_S, 6 * shard / host) if c.offload
                      else 0.0)
  return Prediction(compute, attention, max(0.0, fsdp_s - compute),
                    max(0.0, remat_host_s - compute) + optimizer_host_s)


def candidates(chips: int, model_cfg: ModelConfig, batch_size: int, remats=REMAT_BY_MEMORY,
               msts=(False, True), offloads=(False, True), splits=None) -> list[Candidate]:
  """Every candidate whose mesh divides the heads (Ulysses) and the batch (fsdp)."""
  out = []
  for ring, ulysses in splits or _sp_splits(chips):
    fsdp = chips // (ring * ulysses)
    if model_cfg.num_heads % ulysses or batch_size % fsdp:
      continue
    for mst, remat, offload in itertools.product(msts, remats, offloads):
      out.append(Candidate(ring, ulysses, fsdp, mst, remat, offload))
  return out


def _sp_splits(chips):
  return [(r, u) for sp in range(1, chips + 1) if chips % sp == 0
          for r, u in cost_model.splits(sp)]


def needs_at_least(c: Candidate, other: Candidate) -> bool:
  """Whether `c` needs at least the device memory of `other`: the same split, MsT and optimizer
  offload only where `other` has them, and a remat policy that keeps at least as much."""
  return ((c.ring, c.ulysses, c.fsdp) == (other.ring, other.ulysses, other.fsdp)
          and (other.mst or not c.mst) and (other.offload or not c.offload)
          and REMAT_BY_MEMORY.index(c.remat) >= REMAT_BY_MEMORY.index(other.remat))


def search(config, target, seq_len: int, *, batch_size: int | None = None, margin: float = 0.05,
           budget_bytes: int | None = None, isolated: bool = False, on_row=None,
           **candidate_kwargs) -> list[Row]:
  """Rows of every candidate, the plan (the fastest predicted that fits) first, then the
  compiled ones, then those skipped (each row's note says why). A step fits in `budget_bytes`
  per device (default: the target's memory less `margin`). `isolated` compiles each candidate
  in a child process (`fit.step_memory_isolated`), so a compiler crash is one row's note, not
  the end of the search."""
  batch_size = batch_size or config.train.batch_size
  base = fit.with_overrides(config, {"train.batch_size": batch_size, "train.seq_len": seq_len})
  model_cfg = model_config(base)
  params = model_cfg.param_count()
  budget = budget_bytes or target.hbm_bytes_per_device * (1 - margin)
  devices = None if isolated else target.devices()
  rows, failed, plan_row = [], [], None

  def row(c, prediction, memory=None, note=""):
    r = Row(c, prediction, memory, memory is not None and memory.fits(budget), note)
    rows.append(r)
    if on_row:
      on_row(r)
    return r

  def compile_row(c, prediction):
    config = fit.with_overrides(base, c.overrides(model_cfg))
    try:
      if isolated:
        memory, crash = fit.step_memory_isolated(config, seq_len, target.name)
        if memory is None:
          return row(c, prediction, note=crash)
      else:
        memory = fit.step_memory(config, seq_len, devices)
    except ValueError as e:  # a combination the config refuses
      return row(c, prediction, note=f"refused: {e}")
    return row(c, prediction, memory)

  predicted = sorted(((predict(c, model_cfg, target, batch_size, seq_len, params), c)
                      for c in candidates(target.chips, model_cfg, batch_size,
                                          **candidate_kwargs)),
                     key=lambda pc: pc[0].step_s)
  for prediction, c in predicted:
    if plan_row is not None:
      row(c, prediction, note="not compiled: predicted slower than the plan")
      continue
    beyond = next((f for f in failed if needs_at_least(c, f)), None)
    if beyond is not None:
      row(c, prediction, note=f"not compiled: needs at least the memory of ({beyond.describe()})")
      continue
    r = compile_row(c, prediction)
    if r.fits:
      plan_row = r
    elif r.memory is not None:  # did not fit (a crash or a refusal says nothing about memory)
      failed.append(c)
  return sorted(rows, key=lambda r: (not r.fits, r.memory is None, r.prediction.step_s))


def flags(row: Row, model_cfg: ModelConfig, seq_len: int, batch_size: int) -> str:
  """The --config.* flags that select a row's candidate."""
  overrides = {**row.candidate.overrides(model_cfg), "train.seq_len": seq_len,
               "train.batch_size": batch_size}
  return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def gib(n: float) -> str:
  return f"{n / 2**30:.1f}" if n and math.isfinite(n) else "-"
