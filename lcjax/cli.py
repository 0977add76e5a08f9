"""The one place where a command's bad input becomes one line, `lcjax: error: <what, the fix>`.

Every entry point (lcjax.main, lcjax.sample, scripts/fit.py) parses its flags and runs its body
through `run`: errors a user can cause (ValueError, OSError, ImportError, absl flag errors)
print one line and exit 1; a run stopped on purpose (`Stop`: a non-finite loss, a preemption)
prints its own line and exits with its own code. Anything else is a bug and keeps its traceback
(so does every error with LCJAX_TRACEBACK=1).

Configs: `--config=FILE.py[:ARG]` (a file whose get_config(ARG) returns a ConfigDict), then any
number of `--config.section.key=VALUE`, each parsed as the type of the key's default.
"""
import importlib.util
import json
import os
import pathlib
import sys

import ml_collections
from absl import flags

PREFIX = "lcjax: error:"


class Stop(Exception):
  """A run that stopped on purpose: `str(self)` is its one line, `code` its exit status."""

  def __init__(self, line: str, code: int):
    super().__init__(line)
    self.code = code


def one_line(error: BaseException) -> str:
  if isinstance(error, OSError) and error.filename:
    return f"{error.filename}: {error.strerror or error}"
  text = " ".join(str(error).split()) or type(error).__name__
  return text


def run(body, argv) -> int:
  """body(argv) -> None; the exit status of running it, errors reported in one line."""
  try:
    body(argv)
  except Stop as e:
    print(str(e), file=sys.stderr, flush=True)
    return e.code
  except (ValueError, OSError, ImportError, flags.Error) as e:
    if os.environ.get("LCJAX_TRACEBACK"):
      raise
    print(f"{PREFIX} {one_line(e)}", file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt:
    print("lcjax: interrupted", file=sys.stderr, flush=True)
    return 130
  return 0


def read_json(path, missing: str, corrupt: str):
  """The JSON file `path`; ValueError in one line, `missing` or `corrupt` (the fix) after what
  went wrong, if it is absent or not JSON."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"{path} not found; {missing}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is corrupt ({e.msg} at line {e.lineno}); {corrupt}") from None


def parse_flags(flag_values: flags.FlagValues, argv, required=(), doc=""):
  """Parses argv (program name first) into flag_values; returns the positional arguments left.
  --help prints `doc` and the flags, and exits 0. ValueError in one line for an unknown flag, a
  bad value, a missing required flag or a stray argument."""
  if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv[1:]):
    print(f"{doc.strip()}\n\n{flag_values.get_help()}")
    raise SystemExit(0)
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    raise ValueError(f"{e}; see --help") from None
  for name in required:
    if flag_values[name].value is None:
      raise ValueError(f"--{name} is required")
  if len(rest) > 1:
    raise ValueError(f"unexpected arguments {rest[1:]}; every option is a --flag=value")
  return rest


def split_overrides(argv, name="config"):
  """(argv without the `--config.a.b=v` overrides, {"a.b": "v"} in order)."""
  kept, overrides, args = [], {}, list(argv)
  while args:
    arg = args.pop(0)
    if arg.startswith(f"--{name}.") or arg.startswith(f"-{name}."):
      key, eq, value = arg.lstrip("-")[len(name) + 1:].partition("=")
      if not eq:
        if not args:
          raise ValueError(f"--{name}.{key} needs a value: --{name}.{key}=VALUE")
        value = args.pop(0)
      overrides[key] = value
    else:
      kept.append(arg)
  return kept, overrides


def load_config(spec: str) -> ml_collections.ConfigDict:
  """get_config() of the config file `spec` ("path.py" or "path.py:arg")."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config={path}: no such file; give the path of an experiment config "
                     "(e.g. experiments/tiny_cpu.py)")
  module_spec = importlib.util.spec_from_file_location("lcjax_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ValueError(f"--config={path}:{e.lineno}: syntax error ({e.msg}); fix the file") from None
  except Exception as e:  # the config file's own code failed; the user's to fix
    raise ValueError(f"--config={path} fails to load ({type(e).__name__}: {one_line(e)}); fix "
                     "the file") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ValueError(f"--config={path} defines no get_config(); a config file's get_config() "
                     "returns the experiment's ConfigDict")
  try:
    config = get_config(arg) if arg else get_config()
  except Exception as e:
    raise ValueError(f"--config={spec}: get_config() fails ({type(e).__name__}: "
                     f"{one_line(e)}); fix the file") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"--config={path}: get_config() returned {type(config).__name__}, not an "
                     "ml_collections.ConfigDict")
  return config


def _parse_value(key, text, default):
  kind = type(default)
  if kind is bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0"):
      raise ValueError(f"--config.{key}={text!r} must be true or false")
    return lowered in ("true", "1")
  try:
    return kind(text) if kind in (int, float) else text
  except ValueError:
    raise ValueError(f"--config.{key}={text!r} must be {'an integer' if kind is int else 'a number'}"
                     f" (its default is {default!r})") from None


def apply_overrides(config, overrides: dict, reference) -> ml_collections.ConfigDict:
  """`config` with each {"a.b": "text"} set, parsed as the type of reference's a.b."""
  tree = config.to_dict()
  for key, text in overrides.items():
    parts = key.split(".")
    ref, node = reference, tree
    for i, part in enumerate(parts):
      if not isinstance(ref, ml_collections.ConfigDict) or part not in ref:
        where = ".".join(parts[:i])
        known = ", ".join(sorted(ref.keys())) if isinstance(ref, ml_collections.ConfigDict) else ""
        raise ValueError(f"unknown config key '{key}' (from --config.{key}); known keys "
                         f"{'in ' + where if where else 'here'}: {known}")
      ref = ref[part]
      if i < len(parts) - 1:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
          raise ValueError(f"config key '{'.'.join(parts[:i + 1])}' must be a section")
    if isinstance(ref, ml_collections.ConfigDict):
      raise ValueError(f"--config.{key} names a section; set one of its keys: "
                       f"{', '.join(sorted(ref.keys()))}")
    node[parts[-1]] = _parse_value(key, text, ref)
  return ml_collections.ConfigDict(tree)
