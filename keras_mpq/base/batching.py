"""Splitting arrays into batches: one rule for every stage.

A model's inputs ``x`` are one array, or for a model with several inputs a
list of arrays (one per input, in ``model.inputs`` order, the same first
dimension; `keras_mpq.model.inputs.check_inputs` makes them so). Every stage
that counts, slices, batches or joins inputs does it through `num_samples`,
`take`, `batches` and `concat`, which treat both forms alike.

>>> [(s.start, s.stop) for s in batch_slices(5, 2)]
[(0, 2), (2, 4), (4, 5)]
>>> num_batches(5, 2)
3
>>> x = [np.zeros((5, 2)), np.ones((5, 3))]
>>> num_samples(x), [a.shape for a in take(x, slice(0, 2))]
(5, [(2, 2), (2, 3)])
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Sequence

import numpy as np


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
  """Slices of ``range(n)`` of at most ``batch_size``, in order."""
  for start in range(0, n, batch_size):
    yield slice(start, min(n, start + batch_size))


def several(x) -> bool:
  """True when ``x`` holds several inputs (a list or tuple of arrays), not one array."""
  return isinstance(x, (list, tuple))


def num_samples(x) -> int:
  """How many samples ``x`` (one array, or a list of arrays, one per input) holds."""
  return len(x[0]) if several(x) else len(x)


def take(x, index):
  """``x[index]`` of one array, or of each input's array of a list (a list back)."""
  if several(x):
    return [a[index] for a in x]
  return x[index]


def map_inputs(fn: Callable[[Any], Any], x):
  """``fn`` applied to one array, or to each input's array of a list (a list back)."""
  if several(x):
    return [fn(a) for a in x]
  return fn(x)


def concat(parts: Sequence[Any]):
  """Parts (each one array, or each a list of arrays per input) joined along the samples."""
  if parts and several(parts[0]):
    return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]
  return np.concatenate(parts, axis=0)


def batches(x, batch_size: int) -> Iterator[Any]:
  """``x`` (an array, or a list of arrays per input) in consecutive batches of at most ``batch_size``."""
  x = [np.asarray(a) for a in x] if several(x) else np.asarray(x)
  for s in batch_slices(num_samples(x), batch_size):
    yield take(x, s)


def num_batches(n: int, batch_size: int) -> int:
  """How many batches of ``batch_size`` hold ``n`` items (the last one may be short)."""
  return -(-n // batch_size)


def as_list(x) -> List[Any]:
  """``x`` as a list of per-input arrays (one array becomes a list of one)."""
  return list(x) if several(x) else [x]
