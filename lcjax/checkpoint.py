"""Checkpoints: an orbax CheckpointManager over the train state and the data position, plus the
run's config in DIR/config.json, checked on resume so a workdir is never reused by a different
model and an existing checkpoint is never overwritten by an incompatible run.

Resume order: config.json (compatibility) -> latest step -> state (resharded onto the current
mesh) -> data position -> metrics past that step are dropped and logged again.
"""
import json
import pathlib

import orbax.checkpoint as ocp

# Sections whose change makes an old checkpoint meaningless for the new run.
_MUST_MATCH = ("model", "data.source", "data.paths", "data.tokenizer", "data.tokenizer_path",
               "optim.name")
_MUST_MATCH_DILOCO = ("outer.kind", "outer.optimizer", "mesh.replica")


def _lookup(config_dict, dotted):
  value = config_dict
  for key in dotted.split("."):
    value = value.get(key) if isinstance(value, dict) else None
  return value


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
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
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
  def __init__(self, workdir, config):
    self.workdir = pathlib.Path(workdir).absolute()  # orbax needs absolute paths
    if self.workdir.exists() and not self.workdir.is_dir():
      raise ValueError(f"--workdir={workdir} exists and is not a directory; choose another path")
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._check_config(config.to_dict())
    options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep,
                                           save_interval_steps=config.checkpoint.every, create=True)
    self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options)

  def _check_config(self, config_dict):
    path = self.workdir / "config.json"
    checkpoints = self.workdir / "checkpoints"
    has_checkpoints = checkpoints.is_dir() and any(checkpoints.iterdir())
    if not has_checkpoints:  # nothing to protect: this run's config is the record
      path.write_text(json.dumps(config_dict, indent=2, sort_keys=True))
      return
    if not path.exists():
      raise ValueError(f"{checkpoints} holds checkpoints but {path} is missing, so they cannot "
                       "be checked against this config; use a new --workdir")
    try:
      saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is corrupt ({e.msg}); use a new --workdir") from None
    must_match = _MUST_MATCH
    if "diloco" in (_lookup(saved, "outer.kind"), _lookup(config_dict, "outer.kind")):
      must_match += _MUST_MATCH_DILOCO  # the state holds one copy per island
    for key in must_match:
      if _lookup(saved, key) != _lookup(config_dict, key):
        raise ValueError(
            f"--workdir={self.workdir} holds a run with {key}={_lookup(saved, key)!r}, but this "
            f"config has {_lookup(config_dict, key)!r}; use a new --workdir to start another run "
            "or restore the old value to resume")

  def latest_step(self):
    return self.manager.latest_step()

  def restore(self, step, abstract_state):
    """(state, data position) of a saved step, placed as `abstract_state`'s shardings say."""
    return _restore(self.manager, step, abstract_state, self.workdir / "checkpoints")

  def save(self, step, state, data_position: dict, *, force=False):
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)))

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
