"""One train program for every variant, composed as outer(inner(parts)).

  parts   the model: parameters and their declarations, loss, evaluation (parts.py)
  inner   one update of one copy of the model: optax on the device (optim/inner.py) or AdamW
          with host-resident state (optim/offload_step.py)
  outer   none, or an outer loop over islands wrapping the inner (outer/diloco.py)

Inner and outer are *stages* with one interface, so the program below knows no variant:
  abstract, decls           the live state's shapes and declarations (state_spec.py)
  saved_keys                the top-level keys a checkpoint holds; the rest are derived
  create_base()             the plain {"step", "params", "opt_state"} at step 0 (traced)
  from_base(base)           a plain state -> this stage's live state (traced)
  complete(saved)           a checkpoint's state -> the live state (traced)
  update(state, batch)      -> (state, metrics, extra): one traced step
  extra_shardings, finish(state, extra)  the step's work outside the jit (offload's host lanes)
  model_params(state), model_param_decls, model_params_saved_path
                            the parameters evaluation and sampling use, and where a checkpoint
                            holds them
  describe(), measure(state), annotate(step, record)
                            start-record fields (declared, measured on the live state) and
                            host-side fields of each train record
The state starts from a source, in the resume order: this run's checkpoint, then another
run's (outer.init_from), then scratch.
"""
import dataclasses

import jax
import numpy as np

from lcjax import mesh as mesh_lib
from lcjax import optim
from lcjax import parts as parts_lib
from lcjax import state_spec
from lcjax.optim import inner as inner_lib
from lcjax.optim import offload_step
from lcjax.outer import diloco, dipaco, paths


@dataclasses.dataclass(frozen=True)
class Scratch:
  """Fresh parameters from train.seed."""


@dataclasses.dataclass(frozen=True)
class ThisRun:
  """This run's checkpoint `step` (resume)."""
  checkpointer: object
  step: int


@dataclasses.dataclass(frozen=True)
class OtherRun:
  """Another run's checkpoint, read only (0: its latest): a plain run's state starts this run's
  stages (from_base); with same_program, a run of this same program goes on here whole (DiPaCo
  re-routed)."""
  workdir: str
  step: int = 0
  same_program: bool = False


def stage_for(parts, config, tx, mesh, *, aot: bool = False, shard_tokens=None):
  """The composed stage of `config`: outer(inner(parts)). `shard_tokens`: DiPaCo's tokens per
  path shard (None: equal shards)."""
  schedule = optim.schedule(config.train)
  in_outer = config.outer.kind != "none"
  if config.optim.offload:
    dtype = jax.numpy.dtype(config.model.dtype)
    inner = offload_step.Offloaded(parts, config, tx, schedule, mesh, dtype,
                                   host_lanes=not in_outer, measure_links=not aot)
  else:
    inner = inner_lib.Plain(parts, tx, schedule)
  if config.outer.kind == "diloco":
    return diloco.DiLoCo(inner, config.outer, mesh.shape["replica"], mesh)
  if config.outer.kind == "dipaco":
    return dipaco.DiPaCo(inner, config.outer, mesh.shape["replica"], mesh,
                         paths.grid_of(config), shard_tokens)
  return inner


class Program:
  """The jitted step, evaluation, init from a source and the checkpoint view of one stage."""

  def __init__(self, stage, parts, tx, mesh):
    self.stage, self.parts, self.tx, self.mesh = stage, parts, tx, mesh
    self.batch_sharding = parts.batch_sharding
    self.live = state_spec.derive(stage.decls, stage.abstract, mesh)
    saved_decls = {k: stage.decls[k] for k in stage.saved_keys}
    self.saved = state_spec.derive(saved_decls, {k: stage.abstract[k] for k in stage.saved_keys},
                                   mesh)
    self.unshardable = self.live.unshardable
    model_params = state_spec.derive(stage.model_param_decls, parts.abstract_params, mesh)
    self.model_params_abstract = model_params.abstract
    replicated = mesh_lib.replicated(mesh)
    self._step = jax.jit(stage.update, in_shardings=(self.live.shardings, self.batch_sharding),
                         out_shardings=(self.live.shardings, replicated, stage.extra_shardings),
                         donate_argnums=0)
    self.eval = jax.jit(parts.eval_step, in_shardings=(model_params.shardings, self.batch_sharding),
                        out_shardings=replicated)
    self.model_params = jax.jit(stage.model_params, out_shardings=model_params.shardings)
    self.num_paths = getattr(stage, "P", 1)
    if getattr(stage, "early_stopping", False):
      self._early_stop = jax.jit(stage.early_stop, out_shardings=self.live.shardings,
                                 donate_argnums=0)
    if self.num_paths > 1:  # DiPaCo: evaluation and sampling take one path at a time
      self._path_params = jax.jit(lambda state, p: stage.path_params(state["outer"]["params"], p),
                                  out_shardings=model_params.shardings)
      # the path numbers on the mesh, made now: the train loop allows no host-to-device copy
      self._path_ids = [jax.device_put(jax.numpy.int32(p), replicated)
                        for p in range(self.num_paths)]

  def early_stop(self, state, record):
    """DiPaCo with outer.early_stopping: the state after an evaluation's per-path losses."""
    losses = np.array([record.get(f"eval/loss/path{p}", np.inf) for p in range(self.num_paths)]
                      if self.num_paths > 1 else [record["eval/loss"]], np.float32)
    with jax.transfer_guard_host_to_device("allow"):
      losses = jax.device_put(losses, mesh_lib.replicated(self.mesh))
    return self._early_stop(state, losses)

  def path_params(self, state, path: int):
    """DiPaCo: path `path`'s parameters, assembled from the live state's modules."""
    return self._path_params(state, self._path_ids[path])

  def step(self, state, batch):
    """(state, batch) -> (state, metrics); the state is donated."""
    state, metrics, extra = self._step(state, batch)
    return self.stage.finish(state, extra), metrics

  def trace(self, abstract_batch) -> jax.stages.Traced:
    return self._step.trace(self.live.abstract, abstract_batch)

  def compile(self, abstract_batch, compiler_options=None):
    """(runner, compiled): the one ahead-of-time compile of the step; runner(state, batch) ->
    (state, metrics) runs it; compiled.memory_analysis() gives its memory. `compiler_options`:
    XLA's, for this compile only (metrics.BufferReport's dump)."""
    compiled = self.trace(abstract_batch).lower().compile(compiler_options or None)

    def run(state, batch):
      state, metrics, extra = compiled(state, batch)
      return self.stage.finish(state, extra), metrics

    return run, compiled

  def init(self, source):
    """(live state, data position) from a source."""
    stage, out = self.stage, self.live.shardings
    if isinstance(source, Scratch):
      return jax.jit(lambda: stage.from_base(stage.create_base()), out_shardings=out)(), 0
    if isinstance(source, ThisRun):
      saved, position = source.checkpointer.restore(source.step, self.saved.abstract)
      return self.complete(saved), position["next_sequence"]
    if isinstance(source, OtherRun):
      from lcjax import checkpoint as checkpoint_lib
      abstract = self.saved.abstract if source.same_program else self.base_abstract()
      step, saved, position = checkpoint_lib.restore_other(source.workdir, abstract, source.step)
      print(f"[lcjax] starting from step {step} of {source.workdir}")
      state = (self.complete(saved) if source.same_program else
               jax.jit(stage.from_base, out_shardings=out, donate_argnums=0)(saved))
      return state, position["next_sequence"]
    raise TypeError(f"unknown state source {source!r}")

  def complete(self, saved):
    return jax.jit(self.stage.complete, out_shardings=self.live.shardings, donate_argnums=0)(saved)

  def base_abstract(self):
    """The plain state {"step", "params", "opt_state"} on the device: what another run holds."""
    abstract, decls = inner_lib.plain_state(self.parts, self.tx)
    return state_spec.derive(decls, abstract, self.mesh).abstract

  def saved_view(self, state):
    """What a checkpoint of the live state holds."""
    return {k: state[k] for k in self.stage.saved_keys}

  def restore_model_params(self, checkpointer, step, path: int = 0):
    """Only the parameters evaluation uses (DiPaCo: path `path`'s, assembled from the saved
    modules), read from checkpoint `step` onto this mesh."""
    if self.num_paths > 1:
      modules = checkpointer.restore_part(
          step, {"outer": {"params": self.live.abstract["outer"]["params"]}})
      return self._path_params(modules, self._path_ids[path])
    tree = self.model_params_abstract
    for key in reversed(self.stage.model_params_saved_path):
      tree = {key: tree}
    restored = checkpointer.restore_part(step, tree)
    for key in self.stage.model_params_saved_path:
      restored = restored[key]
    return restored

  def describe(self) -> dict:
    return {"program/stage": _stage_names(self.stage),
            "program/unshardable": list(self.unshardable), **self.stage.describe()}

  def annotate(self, step, record):
    return self.stage.annotate(step, record)


def _stage_names(stage) -> str:
  inner = getattr(stage, "inner", None)
  return f"{stage.name}({_stage_names(inner)})" if inner is not None else stage.name


def build(prepared, *, aot: bool = False) -> Program:
  """The program of a prepared run (train.prepare): its config, mesh and model config."""
  config, mesh = prepared.config, prepared.mesh
  parts = parts_lib.model_parts(prepared.model_cfg, config.train.seed, mesh)
  tx = optim.make(config)
  shard_tokens = getattr(prepared.datasets, "shard_tokens", None)
  return Program(stage_for(parts, config, tx, mesh, aot=aot, shard_tokens=shard_tokens), parts,
                 tx, mesh)
