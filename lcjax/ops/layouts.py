"""Sequence layouts for sequence parallelism: which global tokens each device stores.

The global sequence of length S is stored permuted, `stored = global[:, perm]`, then cut into
R * U equal shards in ring-major order: shard `r * U + u` lives on ring rank r, Ulysses rank u.

- `contiguous`: perm is the identity; ring rank r holds global chunk r of R.
- `zigzag`: the sequence is cut into 2P pieces (P = R U) and shard d holds pieces d and 2P-1-d,
  so causal work is the same on every device (zigzag ring attention, as in
  zhuzilin/ring-flash-attention; cf. striped attention, arXiv 2311.09431). Seen per ring rank,
  r holds chunks r and 2R-1-r of 2R: Ulysses rank u holds piece u of chunk r and piece U-1-u of
  chunk 2R-1-r. Every device, not only every ring rank, is balanced, so all-gather KV and a ring
  over both axes are too. Needs S % (2 R U) == 0.

After a Ulysses all-to-all over the U devices of ring rank r, the ring chunk arrives as
[A0 B(U-1) | A1 B(U-2) | ...] (A pieces of chunk r, B of chunk 2R-1-r); `unzip_halves` reorders it
to [A0 A1 ... | B0 B1 ...], chunk r then chunk 2R-1-r, each in global order; `zip_halves` undoes it.
"""
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag")


def check_sequence_split(seq_len: int, ring_size: int, ulysses_size: int, layout: str) -> None:
  """Raises ValueError, naming the numbers and the fix, unless the split is valid."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown sequence layout {layout!r}; choose one of {LAYOUTS}")
  for name, n in (("ring", ring_size), ("ulysses", ulysses_size)):
    if int(n) != n or n < 1:
      raise ValueError(f"{name} size must be a positive integer; got {n}")
  shards = ring_size * ulysses_size
  need = 2 * shards if layout == "zigzag" else shards
  if seq_len % need:
    what = f"2 * ring * ulysses = 2 * {ring_size} * {ulysses_size}" if layout == "zigzag" else \
           f"ring * ulysses = {ring_size} * {ulysses_size}"
    lower, upper = seq_len // need * need, (seq_len // need + 1) * need
    fix = f"{lower} or {upper}" if lower else f"{upper}"
    raise ValueError(
        f"sequence length {seq_len} must be divisible by {what} = {need} for the {layout} "
        f"layout; use seq_len {fix}, or change mesh.ring / mesh.ulysses")


def sequence_layout(seq_len: int, ring_size: int, ulysses_size: int = 1,
                    layout: str = "zigzag") -> np.ndarray:
  """int32 [S] permutation: perm[i] is the global index of the token stored at position i."""
  check_sequence_split(seq_len, ring_size, ulysses_size, layout)
  if layout == "contiguous":
    return np.arange(seq_len, dtype=np.int32)
  P = ring_size * ulysses_size
  p = seq_len // (2 * P)
  d = np.arange(P)[:, None, None]
  piece = np.where(np.arange(2)[None, :, None] == 0, d, 2 * P - 1 - d)
  return (piece * p + np.arange(p)).reshape(seq_len).astype(np.int32)


def inverse_layout(perm) -> np.ndarray:
  """int32 [S] inverse permutation: global = stored[:, inverse_layout(perm)]."""
  perm = np.asarray(perm)
  inv = np.empty_like(perm)
  inv[perm] = np.arange(perm.size, dtype=perm.dtype)
  return inv


def unzip_halves(x, groups: int, axis: int = 1):
  """Along `axis`: [a0 b(g-1) | a1 b(g-2) | ...] -> [a0 a1 ... | b0 b1 ...] for g = groups."""
  if groups == 1:
    return x
  n = x.shape[axis]
  y = x.reshape(x.shape[:axis] + (groups, 2, n // (2 * groups)) + x.shape[axis + 1:])
  a, b = (jnp.take(y, h, axis=axis + 1) for h in (0, 1))
  return jnp.concatenate([a, jnp.flip(b, axis)], axis).reshape(x.shape)


def zip_halves(x, groups: int, axis: int = 1):
  """Inverse of `unzip_halves`."""
  if groups == 1:
    return x
  n = x.shape[axis]
  y = x.reshape(x.shape[:axis] + (2, groups, n // (2 * groups)) + x.shape[axis + 1:])
  a, b = (jnp.take(y, h, axis=axis) for h in (0, 1))
  return jnp.stack([a, jnp.flip(b, axis)], axis + 1).reshape(x.shape)


def ring_block_starts(seq_len: int, ring_size: int, ulysses_size: int, layout: str,
                      ring_over_ulysses: bool) -> tuple[np.ndarray, int]:
  """Static table of the global start index of each half held by each ring member, and its length.

  Returns (starts [ring members, halves] int32, half length). With `ring_over_ulysses` the ring
  runs over all R * U devices (member r * U + u holds its own shard); otherwise over the R ring
  ranks, each holding its whole ring chunk after the Ulysses all-to-all (and `unzip_halves`).
  Every half is a contiguous range of global indices, which is what lets the ring skip block
  pairs from the layout alone (see `ring.py`).
  """
  R, U, S = ring_size, ulysses_size, seq_len
  members = R * U if ring_over_ulysses else R
  if layout == "contiguous":
    size = S // members
    return (np.arange(members, dtype=np.int32) * size)[:, None], size
  # per member: (Ulysses ranks in its group, half, piece); a half is a contiguous range, whatever
  # the order of its pieces, so its start is its smallest index
  perm = sequence_layout(S, R, U, layout).reshape(members, 1 if ring_over_ulysses else U, 2, -1)
  half_len = perm.shape[1] * perm.shape[3]
  return perm.min(axis=(1, 3)).astype(np.int32), half_len
