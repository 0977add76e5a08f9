"""Sequence layouts: permutations, who holds what, balance, the local reorders, errors."""
import numpy as np
import pytest

from lcjax.ops.layouts import (check_sequence_split, inverse_layout, ring_block_starts,
                               sequence_layout, unzip_halves, zip_halves)

SPLITS = [(1, 8), (2, 4), (4, 2), (8, 1), (3, 1), (1, 3), (3, 2)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("R,U", SPLITS)
def test_permutation_and_inverse(R, U, layout):
  S = 2 * R * U * 5
  perm = sequence_layout(S, R, U, layout)
  assert perm.dtype == np.int32 and perm.shape == (S,)
  np.testing.assert_array_equal(np.sort(perm), np.arange(S))
  x = np.random.default_rng(0).normal(size=(2, S))
  np.testing.assert_array_equal(x[:, perm][:, inverse_layout(perm)], x)
  if layout == "contiguous":
    np.testing.assert_array_equal(perm, np.arange(S))


@pytest.mark.parametrize("R,U", SPLITS)
def test_zigzag_ring_rank_holds_chunks_r_and_mirror(R, U):
  """Ring-major: ring rank r's R-th of the stored sequence is global chunks r and 2R-1-r."""
  S = 2 * R * U * 3
  c = S // (2 * R)
  slabs = sequence_layout(S, R, U, "zigzag").reshape(R, S // R)
  for r in range(R):
    want = np.concatenate([np.arange(r * c, (r + 1) * c),
                           np.arange((2 * R - 1 - r) * c, (2 * R - r) * c)])
    np.testing.assert_array_equal(np.sort(slabs[r]), want)


@pytest.mark.parametrize("R,U", SPLITS)
def test_zigzag_balances_causal_work_on_every_device(R, U):
  """Causal work of a device ~ sum over its queries of (position + 1): equal on every device."""
  S = 2 * R * U * 4
  shards = sequence_layout(S, R, U, "zigzag").reshape(R * U, -1)
  work = (shards + 1).sum(axis=1)
  assert np.all(work == work[0]), work
  contiguous = (sequence_layout(S, R, U, "contiguous").reshape(R * U, -1) + 1).sum(axis=1)
  assert R * U == 1 or contiguous[-1] > contiguous[0]


@pytest.mark.parametrize("U", [1, 2, 3, 4])
def test_unzip_gives_both_chunks_in_global_order(U):
  """After the Ulysses all-to-all, unzip turns the ring chunk into [chunk r | chunk 2R-1-r]."""
  R, S = 2, 2 * 2 * U * 3
  c = S // (2 * R)
  slabs = sequence_layout(S, R, U, "zigzag").reshape(R, 1, S // R)  # [ring, batch, tokens]
  for r in range(R):
    got = np.asarray(unzip_halves(slabs[r], U, axis=1))[0]
    want = np.concatenate([np.arange(r * c, (r + 1) * c),
                           np.arange((2 * R - 1 - r) * c, (2 * R - r) * c)])
    np.testing.assert_array_equal(got, want)
  x = np.arange(2 * S * 3).reshape(2, S, 3)
  np.testing.assert_array_equal(np.asarray(zip_halves(unzip_halves(x, U), U)), x)
  lse = np.arange(2 * 3 * S).reshape(2, 3, S)
  np.testing.assert_array_equal(np.asarray(zip_halves(unzip_halves(lse, U, 2), U, 2)), lse)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("over_ulysses", [False, True])
@pytest.mark.parametrize("R,U", [(2, 4), (4, 2), (3, 2)])
def test_ring_block_starts_are_contiguous_ranges(R, U, layout, over_ulysses):
  """Every half a ring member holds is one contiguous range of global indices."""
  S = 2 * R * U * 2
  starts, half = ring_block_starts(S, R, U, layout, ring_over_ulysses=over_ulysses)
  members = R * U if over_ulysses else R
  perm = sequence_layout(S, R, U, layout).reshape(members, -1)
  if not over_ulysses and layout == "zigzag":
    perm = np.asarray(unzip_halves(perm, U))
  assert starts.shape[0] == members and starts.shape[1] * half == S // members
  for m in range(members):
    for h, start in enumerate(starts[m]):
      np.testing.assert_array_equal(perm[m, h * half:(h + 1) * half],
                                    np.arange(start, start + half))


def test_errors_name_the_numbers_and_the_fix():
  with pytest.raises(ValueError, match=r"100 .* 2 \* ring \* ulysses = 2 \* 4 \* 2 = 16 .* 96 or 112"):
    sequence_layout(100, 4, 2, "zigzag")
  with pytest.raises(ValueError, match=r"100 .* ring \* ulysses = 3 \* 1 = 3 .* 99 or 102"):
    sequence_layout(100, 3, 1, "contiguous")
  with pytest.raises(ValueError, match=r"use seq_len 16, or change mesh.ring"):
    check_sequence_split(8, 8, 1, "zigzag")
  with pytest.raises(ValueError, match="unknown sequence layout 'striped'"):
    sequence_layout(16, 2, 1, "striped")
  with pytest.raises(ValueError, match="ring size must be a positive integer"):
    sequence_layout(16, 0, 1, "zigzag")
