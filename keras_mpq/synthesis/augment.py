"""Cheap extra calibration images: shifted copies of the ones there are.

Low-bit rounding (GPTQ's and AdaRound's Hessians) and the scale tuning of
`keras_mpq.quantization.distill` fit better on more calibration samples than the
sensitivity search needs, and synthesizing a sample costs about 150 forward
and backward passes. A copy of a synthetic image moved by a few pixels costs
nothing and is as good a calibration sample to a convolutional model: on the
MNIST CNNs, data-free uniform 2-bit AdaRound plus tuning on 256 synthetic
images and 768 shifted copies scored 85.3% on average (Keras, 2,000 test
images, four trained copies: two models x two seeds, two shift seeds), against
84.05% on 1024 synthetic images and 84.6% on 256, for a quarter of the
synthesis time (issue 13; copies shifted by at most one pixel: 85.0%).
`keras_mpq.quantize` uses it data-free where the budget forces layers below 3
bits (`keras_mpq.recipe.default_calibration_sizes`).

Example:

>>> import numpy as np
>>> x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
>>> more, source = shifted_copies(x, 5, seed=0)
>>> more.shape, source.tolist()[:2]
((5, 8, 8, 1), [0, 1])
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from keras_mpq.base.errors import InvalidInputError

MAX_SHIFT = 2
"""Largest shift in pixels along each image axis (edge values fill the border).
On the MNIST CNNs at 28x28, shifts of up to 1 pixel helped less (see above)."""
MIN_SIDE = 8
"""Smallest image side that gets shifted copies (4x `MAX_SHIFT`)."""


def can_shift(shape) -> bool:
  """True for channels-last images ``(H, W, C)`` (no batch axis) with both sides >= `MIN_SIDE`."""
  shape = tuple(shape)
  return (len(shape) == 3 and all(isinstance(s, (int, np.integer)) and s >= MIN_SIDE
                                  for s in shape[:2]))


def shifted_copies(x: np.ndarray, total: int, max_shift: int = MAX_SHIFT, seed: int = 0
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """``x`` followed by shifted copies of its images, ``total`` samples in all.

  Copy ``k`` of image ``i`` (the images taken in turn) moves it by a seeded
  random whole-pixel offset in ``[-max_shift, max_shift]`` along height and
  width, the border filled with the edge values. Returns ``(images, source)``
  with ``source[j]`` the index in ``x`` that sample ``j`` came from (to copy
  labels).
  """
  x = np.asarray(x)
  if x.ndim != 4 or not can_shift(x.shape[1:]):
    raise InvalidInputError(
        f"Expected channels-last images (N, H, W, C) with H, W >= {MIN_SIDE} to shift. "
        f"Received: shape {x.shape}")
  n, h, w = x.shape[:3]
  if total <= n:
    return x[:total], np.arange(total)
  extra = total - n
  rng = np.random.default_rng(seed)
  source = np.concatenate([np.arange(n), np.arange(extra) % n])
  r = int(max_shift)
  padded = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
  dy = rng.integers(0, 2 * r + 1, extra)
  dx = rng.integers(0, 2 * r + 1, extra)
  copies = np.empty((extra,) + x.shape[1:], x.dtype)
  for j in range(extra):
    i = source[n + j]
    copies[j] = padded[i, dy[j]:dy[j] + h, dx[j]:dx[j] + w]
  return np.concatenate([x, copies]), source
