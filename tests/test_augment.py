"""Tests for keras_mpq.synthesis.augment: shifted copies of calibration images."""

import numpy as np
import pytest

from keras_mpq.synthesis import augment as augment_lib
from keras_mpq.base.errors import InvalidInputError


def _images(n=3, side=10, channels=2, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (n, side, side, channels)).astype(np.float32)


def test_copies_are_whole_pixel_shifts_of_their_source():
  x = _images()
  out, source = augment_lib.shifted_copies(x, 11, seed=3)
  assert out.shape == (11,) + x.shape[1:] and out.dtype == x.dtype
  np.testing.assert_array_equal(out[:3], x)  # the originals first, unchanged
  assert source.tolist() == [0, 1, 2] + [k % 3 for k in range(8)]
  r = augment_lib.MAX_SHIFT
  for j in range(3, 11):
    padded = np.pad(x[source[j]], ((r, r), (r, r), (0, 0)), mode="edge")
    shifts = [(dy, dx) for dy in range(2 * r + 1) for dx in range(2 * r + 1)
              if np.array_equal(padded[dy:dy + 10, dx:dx + 10], out[j])]
    assert shifts, j  # each copy is its source moved by at most MAX_SHIFT pixels
  # Values never leave the source's range (edge filling, no zeros brought in).
  assert out.min() >= x.min() and out.max() <= x.max()


def test_seeded_and_a_no_op_when_enough():
  x = _images()
  a, _ = augment_lib.shifted_copies(x, 9, seed=1)
  b, _ = augment_lib.shifted_copies(x, 9, seed=1)
  c, _ = augment_lib.shifted_copies(x, 9, seed=2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  same, index = augment_lib.shifted_copies(x, 2)
  np.testing.assert_array_equal(same, x[:2])
  assert index.tolist() == [0, 1]


@pytest.mark.parametrize("shape,ok", [((28, 28, 1), True), ((8, 8, 3), True),
                                      ((7, 28, 1), False), ((64,), False),
                                      ((10, 16), False), ((None, 28, 1), False)])
def test_only_images_are_shifted(shape, ok):
  assert augment_lib.can_shift(shape) is ok


def test_refuses_what_it_cannot_shift():
  with pytest.raises(InvalidInputError, match=r"\(N, H, W, C\)"):
    augment_lib.shifted_copies(np.zeros((4, 16), np.float32), 8)
