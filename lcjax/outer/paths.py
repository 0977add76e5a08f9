"""DiPaCo's grid of paths (arXiv 2403.10616): levels of candidate modules, one module per level.

`outer.modules = "K_1xK_2x...xK_L"` gives level l (the model's `levels[l]`, `model.num_levels`
of them) K_l candidate modules, so there are P = K_1 ... K_L paths. Path p picks module
`index(p, l)` of level l: the digits of p in the mixed radix (K_1, ..., K_L), the last level
fastest ("2x2": path 0 = (0, 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1)).

Every parameter belongs to one *group* of modules:
  shared   one module that every path uses (the embedding, the final norm and the head, unless
           private; a level with K_l = 1);
  level l  K_l modules, path p using module index(p, l);
  private  P modules, one per path (`outer.private`: embed, head, level<i>).
The outer state stores a group's parameters with a leading dimension of its module count
(1, K_l or P), so each module is held once.
"""
import dataclasses
import math

import numpy as np


def parse_modules(spec: str, num_levels: int) -> tuple[int, ...]:
  """"2x4" -> (2, 4); one factor per level of the model."""
  try:
    factors = tuple(int(f) for f in spec.lower().split("x"))
  except ValueError:
    factors = ()
  if not factors or min(factors) < 1:
    raise ValueError(f"outer.modules must read K1xK2x... with positive integers (modules per "
                     f"level), e.g. '2x2'; got {spec!r}")
  if len(factors) != num_levels:
    raise ValueError(f"outer.modules={spec!r} gives {len(factors)} levels but the model has "
                     f"model.num_levels={num_levels}; give one factor per level (or set "
                     f"model.num_levels={len(factors)})")
  return factors


def parse_private(spec: str, num_levels: int, tie_embeddings: bool) -> frozenset:
  """"embed,level0" -> {"embed", "level0"}: the parts each path keeps to itself."""
  names = frozenset(s.strip() for s in spec.split(",") if s.strip())
  valid = {"embed", "head", *(f"level{i}" for i in range(num_levels))}
  bad = sorted(names - valid)
  if bad:
    raise ValueError(f"outer.private: unknown parts {bad}; valid: embed, head, level0 .. "
                     f"level{num_levels - 1} (model.num_levels={num_levels})")
  if "head" in names and tie_embeddings and "embed" not in names:
    raise ValueError("outer.private='head' with model.tie_embeddings=True: the head is the "
                     "embedding; make 'embed' private too, or untie the embeddings")
  return names


@dataclasses.dataclass(frozen=True)
class PathGrid:
  modules: tuple[int, ...]   # K_l per level
  private: frozenset = frozenset()

  @property
  def num_paths(self) -> int:
    return math.prod(self.modules)

  def index(self, path: int, level: int) -> int:
    """The module of `level` that `path` uses."""
    return (path // math.prod(self.modules[level + 1:])) % self.modules[level]

  def group(self, top_key: str, level: int | None = None) -> str:
    """The group of the parameters under model key `top_key` (`level` for "levels")."""
    if top_key == "levels":
      name = f"level{level}"
      if name in self.private:
        return "private"
      return "shared" if self.modules[level] == 1 else name
    part = "embed" if top_key == "embed" else "head"  # lm_head and final_norm go with the head
    return "private" if part in self.private else "shared"

  def count(self, group: str) -> int:
    """Modules in a group."""
    if group == "shared":
      return 1
    if group == "private":
      return self.num_paths
    return self.modules[int(group.removeprefix("level"))]

  def module_of(self, group: str, path: int) -> int:
    """The module of `group` that `path` uses."""
    if group == "shared":
      return 0
    if group == "private":
      return path
    return self.index(path, int(group.removeprefix("level")))

  def table(self, group: str) -> np.ndarray:
    """[P] int32: the module of `group` each path uses."""
    return np.array([self.module_of(group, p) for p in range(self.num_paths)], np.int32)

  def paths_through(self, group: str) -> np.ndarray:
    """[modules] int: how many paths use each module of `group`."""
    return np.bincount(self.table(group), minlength=self.count(group))

  def describe(self, path: int) -> str:
    return "(" + ", ".join(str(self.index(path, l)) for l in range(len(self.modules))) + ")"


def grid_of(config) -> PathGrid:
  """The grid of a (validated) DiPaCo config."""
  o, m = config.outer, config.model
  return PathGrid(parse_modules(o.modules, m.num_levels),
                  parse_private(o.private, m.num_levels, m.tie_embeddings))


def groups_of(params: dict, grid: PathGrid) -> dict:
  """The params tree with each leaf replaced by its group's name."""
  def label(tree, group):
    return {k: label(v, group) for k, v in tree.items()} if isinstance(tree, dict) else group

  return {top: ({l: label(v, grid.group("levels", int(l))) for l, v in sub.items()}
                if top == "levels" else label(sub, grid.group(top)))
          for top, sub in params.items()}
