"""Activation range policies: which (min, max) an activation tensor is quantized to.

One function, `choose_range`, picks a tensor's range from its values under a
policy. The Keras model (`keras_mpq.quantization.calibrate.calibrate`) and the exported file
(`keras_mpq.export.recipe.quantize_with_recipe`) both call it on the same calibration
data, so the two quantize each activation the same way.

Policies (`RANGE_POLICIES`):

- ``"minmax"``: the smallest and largest value seen. Nothing seen is clipped.
- ``"percentile"``: the 0.01th and 99.99th percentiles. Rare outliers are
  clipped, which buys a finer step for the rest.
- ``"mse"``: per tensor, among clipping candidates (the min/max range, the
  percentile ranges and the min/max scaled by 0.30-0.99), the one with the
  least mean squared quantization error on the values seen. The min/max
  range is itself a candidate, and this policy clips only where clipping
  lowers the error on the calibration data by at least `MIN_GAIN` (1%).

Example:

>>> import numpy as np
>>> v = np.concatenate([np.linspace(0, 1, 10000), [40.0]])
>>> choose_range(v, bits=8, policy="minmax").range
(0.0, 40.0)
>>> round(choose_range(v, bits=8, policy="percentile").high, 2)
1.0
>>> choose_range(v, bits=8, policy="mse").candidate  # clipping 40 costs more than it buys
'minmax'
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

from keras_mpq.base import batching, choices
from keras_mpq.base.errors import InvalidInputError

RANGE_POLICIES = choices.values(choices.RangePolicy)
DEFAULT_RANGE_POLICY = choices.RangePolicy.MINMAX.value
"""Chosen by `benchmarks/bench_calibration_data.py` (BENCHMARKS.md, "Activation
range policy"): on synthetic calibration data, whose ranges already fall short
of real data's, clipping further does not raise LiteRT accuracy at 8 bits."""

PERCENTILE = 0.01
"""Percent of values clipped at each end by the ``percentile`` policy."""
MIN_GAIN = 0.01
"""The ``mse`` policy clips only where that lowers the error by this fraction."""
MAX_RANGE_SAMPLES = 256
"""Most calibration samples activation ranges are measured on: the Keras
model's (`keras_mpq.quantization.calibrate.calibrate`) and the exported file's alike take the
same seeded subset of a larger set (`range_subset`), so both quantize each
activation to the same range (the file's calibration runs them in one batch)."""


def subset_indices(n: int, limit: int, seed: int = 0) -> np.ndarray:
  """Sorted indices of a seeded subset of at most ``limit`` of ``n`` samples (all when fewer).

  The one rule for every "measure on a subset" in keras_mpq (activation
  ranges here, the sensitivity search in `keras_mpq.api`).

  >>> subset_indices(10, 4).tolist()
  [2, 4, 5, 7]
  """
  if n <= limit:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def range_subset(x, limit: int = MAX_RANGE_SAMPLES, seed: int = 0) -> np.ndarray:
  """The at most ``limit`` samples of ``x`` activation ranges are measured on (seeded, in order).

  >>> range_subset(np.arange(10), limit=4).tolist()
  [2, 4, 5, 7]
  """
  if batching.several(x):  # several inputs: the same samples of each
    n = batching.num_samples(x)
    return list(x) if n <= limit else batching.take(x, subset_indices(n, limit, seed))
  x = np.asarray(x)
  return x if len(x) <= limit else x[subset_indices(len(x), limit, seed)]


MAX_VALUES = 1 << 18
"""Values kept per tensor (a seeded random subset; min and max always kept)."""
_SCALES = (0.99, 0.97, 0.95, 0.92, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3)


@dataclasses.dataclass(frozen=True)
class ChosenRange:
  """A tensor's quantization range and where it came from.

  Attributes:
    low, high: the range written.
    observed: (min, max) of the values seen.
    candidate: which candidate won ("minmax", "percentile" or "scale 0.85").
  """
  low: float
  high: float
  observed: Tuple[float, float]
  candidate: str

  @property
  def range(self) -> Tuple[float, float]:
    return (self.low, self.high)

  @property
  def clipped(self) -> bool:
    return (self.low, self.high) != self.observed


def check_range_policy(policy: Optional[str]) -> str:
  """Returns ``policy`` (None: `DEFAULT_RANGE_POLICY`) or raises InvalidInputError."""
  if policy is None:
    return DEFAULT_RANGE_POLICY
  if policy not in RANGE_POLICIES:
    raise InvalidInputError(
        f"Expected range_policy to be one of {', '.join(RANGE_POLICIES)}. "
        f"Received: {policy!r}")
  return policy


def sample_values(values, max_values: int = MAX_VALUES, seed: int = 0) -> np.ndarray:
  """Flattens ``values`` to at most ``max_values`` floats, keeping its min and max."""
  v = np.asarray(values, np.float32).ravel()
  v = v[np.isfinite(v)]
  if v.size <= max_values:
    return v
  rng = np.random.default_rng(seed)
  keep = v[rng.choice(v.size, max_values - 2, replace=False)]
  return np.concatenate([keep, [v.min(), v.max()]])


def quantization_mse(v: np.ndarray, low: float, high: float, bits: int) -> float:
  """Mean squared error of asymmetric ``bits``-bit quantization of ``v`` to [low, high].

  The grid is TFLite's: the range is widened to hold 0, which is exact.
  """
  low, high = min(low, 0.0), max(high, 0.0)
  if high - low <= 0:
    return float(np.mean(v ** 2))
  levels = (1 << bits) - 1
  scale = (high - low) / levels
  zero = np.round(-low / scale)
  q = np.clip(np.round(v / scale) + zero, 0, levels)
  return float(np.mean(((q - zero) * scale - v) ** 2))


def _candidates(v: np.ndarray):
  lo, hi = float(v.min()), float(v.max())
  yield "minmax", lo, hi
  p_lo, p_hi = np.percentile(v, [PERCENTILE, 100 - PERCENTILE])
  yield "percentile", float(p_lo), float(p_hi)
  for s in _SCALES:
    yield f"scale {s:g}", lo * s, hi * s


def choose_range(values, bits: int = 8, policy: str = DEFAULT_RANGE_POLICY,
                 seed: int = 0) -> ChosenRange:
  """The range to quantize a tensor with ``values`` to, under ``policy``.

  Args:
    values: the tensor's values on the calibration data (any shape; at most
      `MAX_VALUES` of them are used, min and max always among them).
    bits: activation bits (8 or 16).
    policy: one of `RANGE_POLICIES`.
    seed: picks the value subset repeatably.

  Returns:
    A `ChosenRange`. A tensor with no finite value gets (0, 0).

  >>> choose_range([0.0, 0.5, 1.0, 2.0], policy="minmax").range
  (0.0, 2.0)
  """
  policy = check_range_policy(policy)
  v = sample_values(values, seed=seed)
  if v.size == 0:
    return ChosenRange(0.0, 0.0, (0.0, 0.0), "minmax")
  observed = (float(v.min()), float(v.max()))
  cands = list(_candidates(v))
  if policy == "minmax":
    name, lo, hi = cands[0]
  elif policy == "percentile":
    name, lo, hi = cands[1]
  else:
    errors = [quantization_mse(v, lo, hi, bits) for _, lo, hi in cands]
    best = int(np.argmin(errors))
    if errors[best] > errors[0] * (1 - MIN_GAIN):
      best = 0
    name, lo, hi = cands[best]
  return ChosenRange(float(lo), float(hi), observed, name)
