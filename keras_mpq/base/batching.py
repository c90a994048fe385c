"""Splitting arrays into batches: one rule for every stage.

>>> [(s.start, s.stop) for s in batch_slices(5, 2)]
[(0, 2), (2, 4), (4, 5)]
>>> num_batches(5, 2)
3
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
  """Slices of ``range(n)`` of at most ``batch_size``, in order."""
  for start in range(0, n, batch_size):
    yield slice(start, min(n, start + batch_size))


def batches(x, batch_size: int) -> Iterator[np.ndarray]:
  """``x`` (an array) in consecutive batches of at most ``batch_size``."""
  x = np.asarray(x)
  for s in batch_slices(len(x), batch_size):
    yield x[s]


def num_batches(n: int, batch_size: int) -> int:
  """How many batches of ``batch_size`` hold ``n`` items (the last one may be short)."""
  return -(-n // batch_size)
