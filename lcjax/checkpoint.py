"""Checkpoints: an orbax CheckpointManager over the train state and the data position, plus the
run's config in DIR/config.json.

A workdir resumes when what shapes the checkpoint agrees: the saved state's tree, shapes and
dtypes (read from the checkpoint's own metadata) equal the new program's, and the data stream
(source, tokenizer, seed, sequence length) is the same. Everything else (remat, attention
implementation, MsT chunks, sequence-parallel strategy and layout, mesh sizes other than
replica) may change between runs. A mismatch names the first differing leaf and the config keys
behind it, in one line.

Resume order: compatibility -> latest step -> state (resharded onto the current mesh) -> data
position -> metrics past that step are dropped and logged again.
"""
import json
import pathlib

import jax
import orbax.checkpoint as ocp

from lcjax import cli

# What the data position means: changing any of these (or any other data.* key) under an old
# position reads other tokens.
# data.* keys that change how batches are made, not which tokens they hold.
NOT_DATA_STREAM = ("data.prefetch",)
DATA_STREAM_KEYS = ("data.source", "data.paths", "data.eval_paths", "data.eval_fraction",
                    "data.text_field", "data.tokenizer", "data.tokenizer_path",
                    "data.max_documents", "train.seed", "train.seq_len", "train.batch_size")
# DiPaCo's routing decides which documents each path reads: part of its data stream.
ROUTING_KEYS = ("outer.modules", "outer.routing", "outer.overlap", "outer.route_prefix",
                "outer.base_from", "outer.router_fraction", "outer.init_from")
# The config sections that shape the saved state (named when the saved tree differs).
_STATE_SECTIONS = ("model", "optim", "outer", "mesh.replica")


def _flat(config_dict, prefix=""):
  out = {}
  for key, value in config_dict.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _changed(saved, new, sections):
  a, b = _flat(saved), _flat(new)
  keys = sorted(k for k in set(a) | set(b)
                if any(k == s or k.startswith(s + ".") for s in sections) and a.get(k) != b.get(k))
  return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def _leaves(tree):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): (tuple(x.shape), str(x.dtype))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def first_difference(saved_tree, new_tree):
  """One phrase naming the first leaf whose presence, shape or dtype differs; None if equal."""
  a, b = _leaves(saved_tree), _leaves(new_tree)
  # Parameters first: they name what changed more plainly than the optimizer leaves mirroring them.
  for key in sorted(set(a) | set(b), key=lambda k: (not k.startswith("params"), k)):
    if key not in b:
      return f"the checkpoint holds {key}, which this config does not build"
    if key not in a:
      return f"this config builds {key}, which the checkpoint does not hold"
    if a[key] != b[key]:
      return (f"{key} is {a[key][0]} {a[key][1]} in the checkpoint but {b[key][0]} {b[key][1]} "
              "in this config")
  return None


def _lookup(config_dict, dotted):
  value = config_dict
  for key in dotted.split("."):
    value = value.get(key) if isinstance(value, dict) else None
  return value


def _handlers():
  return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def _restore(manager, step, abstract_state, directory):
  """(state, data position) of a saved step, placed as `abstract_state`'s shardings say."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many kinds; all mean the same to the user
    raise ValueError(
        f"checkpoint {directory / str(step)} cannot be restored "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); delete that step's directory "
        "to resume from an earlier one, or use a new --workdir") from None
  return restored["state"], restored["data"]


def restore_other(workdir, abstract_state, step=0):
  """(step, state, data position) of checkpoint `step` (0: the latest) in another run's
  workdir, read only."""
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=_handlers())
  try:
    saved = manager.all_steps() if directory.is_dir() else []
    step = step or max(saved, default=None)
    if step not in saved:
      raise ValueError(f"{directory} holds no checkpoint of step {step} to start from (it has "
                       f"{sorted(saved)}); train the plain run first or fix outer.init_from / "
                       "outer.init_step")
    return (step, *_restore(manager, step, abstract_state, directory))
  finally:
    manager.close()


class Checkpointer:
  def __init__(self, workdir, config, *, read_only: bool = False):
    """read_only: only read this workdir (sampling): nothing is created or written."""
    self.workdir = pathlib.Path(workdir).absolute()  # orbax needs absolute paths
    if self.workdir.exists() and not self.workdir.is_dir():
      raise ValueError(f"--workdir={workdir} exists and is not a directory; choose another path")
    self.config_dict = config.to_dict()
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True)
    else:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._check_data_stream()
      options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep,
                                             save_interval_steps=config.checkpoint.every,
                                             create=True)
    self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options,
                                         item_handlers=_handlers())

  def _saved_config(self):
    return cli.read_json(self.workdir / "config.json", f"{self.workdir / 'checkpoints'} holds "
                         "checkpoints that cannot be checked against this config without it; "
                         "use a new --workdir", "use a new --workdir")

  def _check_data_stream(self):
    checkpoints = self.workdir / "checkpoints"
    if not (checkpoints.is_dir() and any(checkpoints.iterdir())):
      # nothing to protect: this run's config is the record (process 0 writes it)
      if jax.process_index() == 0:
        (self.workdir / "config.json").write_text(json.dumps(self.config_dict, indent=2,
                                                             sort_keys=True))
      return
    saved = self._saved_config()
    data_keys = sorted(k for k in set(_flat(saved)) | set(_flat(self.config_dict))
                       if k.startswith("data.") and k not in NOT_DATA_STREAM)
    routing = ROUTING_KEYS if self.config_dict["outer"]["kind"] == "dipaco" else ()
    for key in dict.fromkeys(DATA_STREAM_KEYS + routing + tuple(data_keys)):
      if _lookup(saved, key) != _lookup(self.config_dict, key):
        raise ValueError(
            f"--workdir={self.workdir} holds a run with {key}={_lookup(saved, key)!r}, but this "
            f"config has {_lookup(self.config_dict, key)!r}: its data position would read other "
            "tokens; restore the old value to resume, or use a new --workdir (to start a new "
            f"run from this one's checkpoint, its other-run start: --config.outer.init_from="
            f"{self.workdir})")

  def check_state(self, step, abstract_state):
    """ValueError in one line unless checkpoint `step` holds a state of `abstract_state`'s tree,
    shapes and dtypes."""
    try:
      metadata = self.manager.item_metadata(step)["state"]
    except Exception as e:  # orbax raises many kinds; all mean the same to the user
      raise ValueError(f"checkpoint {self.workdir / 'checkpoints' / str(step)} cannot be restored "
                       f"(its metadata is unreadable: {type(e).__name__}); delete that step's "
                       "directory to resume from an earlier one, or use a new --workdir") from None
    difference = first_difference(getattr(metadata, "tree", metadata), abstract_state)
    if difference is None:
      return
    changed = _changed(self._saved_config(), self.config_dict, _STATE_SECTIONS)
    cause = f" (the configs differ in {'; '.join(changed)})" if changed else ""
    raise ValueError(f"--workdir={self.workdir} cannot resume: {difference}{cause}; restore the "
                     "old values to resume, or use a new --workdir")

  def latest_step(self):
    return self.manager.latest_step()

  def restore(self, step, abstract_state):
    """(state, data position) of a saved step, placed as `abstract_state`'s shardings say."""
    self.check_state(step, abstract_state)
    return _restore(self.manager, step, abstract_state, self.workdir / "checkpoints")

  def restore_part(self, step, abstract_part):
    """Only the leaves of `abstract_part` (a subtree of the saved state), placed as its
    shardings say."""
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract_part)
    # A partial read goes through the PyTree handler: a manager of its own, without the
    # standard handler this one registers for "state".
    reader = ocp.CheckpointManager(self.workdir / "checkpoints",
                                   options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      return reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abstract_part, restore_args=restore_args, partial_restore=True)))["state"]
    except Exception as e:
      raise ValueError(f"checkpoint {self.workdir / 'checkpoints' / str(step)} does not hold the "
                       f"parameters this config expects ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]})") from None
    finally:
      reader.close()

  def save(self, step, state, data_position: dict, *, force=False, wait=False):
    """wait: return only once the checkpoint is committed (a preemption save)."""
    saved = self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)))
    if wait:
      self.manager.wait_until_finished()
    return saved

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
