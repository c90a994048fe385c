"""Error-minimizing weight quantization: clipping search, GPTQ rounding, bias correction.

Plain NumPy functions from a layer's kernel, its bit-width and (optionally)
statistics of its calibration inputs to integers and per-channel scales, on
the grid keras_mpq uses everywhere (per output channel, symmetric, narrow
range: levels ``-q..q`` with ``q = 2^(b-1) - 1``). No tfmot here: `apply`,
`sensitivity` and `export` call these functions and keep no copy of them.

The methods, each selectable (`METHODS`):

* ``"rtn"``: round to nearest on the max-abs grid (scale = max|w| / q).
* ``"mse"``: per-channel clipping search: the scale ``alpha * max|w| / q``
  (alpha in (0, 1]) that minimizes the channel's weight squared error, or,
  when input statistics are given, its output squared error
  ``dw^T H dw`` with ``H = E[x x^T]`` of the layer's inputs.
* ``"gptq"``: the clipping search's scales, then GPTQ (Frantar et al., 2022)
  rounding: columns quantized one at a time, the error of each pushed onto
  the columns not yet quantized through the inverse Hessian. Dense layers
  use their inputs directly, convolutions their im2col patches, depthwise
  convolutions one small Hessian per input channel.
* ``"gptq-damped"``: GPTQ on ``H + mean(diag H) I`` (damping
  `GPTQ_DAMP_STRONG`), halfway between GPTQ and the clipping search: for
  Hessians of inputs unlike the real ones, which full GPTQ fits too closely
  (it was the data-free default with the first synthetic generator).

* ``"adaround"``: GPTQ's integers refined by AdaRound (Nagel et al., 2020):
  each weight's choice between rounding down and up is relaxed to a soft
  value and optimized with Adam on the layer's output error ``dw^T H dw``,
  with a regularizer that anneals the soft values to 0 or 1. It runs at up
  to `ADAROUND_MAX_BITS` bits, where it measured better than GPTQ
  (benchmarks/results/quantizer.md); above, and for kernels whose cost would
  exceed `ADAROUND_MAX_FLOPS`, the kernel keeps GPTQ's rounding.

With input statistics, every rounding step ends by refitting each channel's
scale to its integers (the least-squares scale on ``dw^T H dw``,
`refit_scales`), which at 2 bits is worth as much as the rounding itself.

Whatever is asked, each output channel keeps the candidate (round to
nearest, clipped, GPTQ, AdaRound) with the lowest error on the layer's own measure
(output error with statistics, weight error without), so no channel is worse
than round to nearest on that measure. Every kept channel holds ``+-q`` in
at least one weight, so the dequantized kernel's max-abs re-derivation
(what the Keras fake quantizer, `keras_mpq.quantization.access.bake` and ai-edge-quantizer
compute) gives back exactly these scales and integers.

`bias_correction` removes the mean output shift the quantized kernel (and
quantized inputs) cause, per output channel (Nagel et al., 2019, empirical
form).

Example:

>>> import numpy as np
>>> from keras_mpq.quantization import weights
>>> w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
>>> rtn = weights.quantize_kernel(w, 3, (0,), method="rtn")
>>> mse = weights.quantize_kernel(w, 3, (0,), method="mse")
>>> mse.error <= rtn.error
True
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import threadpoolctl

from keras_mpq.base import choices
from keras_mpq.base import layers as layers_lib
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import FLOAT_BITS, check_weight_bits

METHODS = choices.values(choices.WeightMethod)
ALPHAS = np.linspace(0.2, 1.0, 33)  # clipping candidates, 0.025 apart; 1.0 is round to nearest
GPTQ_DAMP = 0.01  # damping, a fraction of the mean Hessian diagonal
# Damping where a layer has fewer input rows than inputs (a rank-deficient Hessian).
GPTQ_DAMP_FEW_ROWS = 0.1
# 'gptq-damped': H + mean(diag H) * I, for Hessians of synthetic inputs (data-free), which
# GPTQ otherwise fits too closely (benchmarks/results/quantizer.md: it lost to clipping).
GPTQ_DAMP_STRONG = 1.0
GPTQ_BLOCK = 128
GPTQ_MAX_DIM = 2048  # inputs per Hessian block (`gptq`'s ``max_dim``)
# AdaRound (`adaround`): Adam steps on the soft rounding, the rounding regularizer's
# weight, and the most floating-point work one kernel may take (steps x the cost of
# one H dw product); a bigger kernel keeps GPTQ's rounding and says so in its notes.
ADAROUND_STEPS = 1000
ADAROUND_LAMBDA = 0.01
ADAROUND_MAX_FLOPS = 2e10  # about a second on one core; plain CNN's 3136x64 Dense is over
_ADAROUND_ELEMENTWISE = 64  # elementwise operations per weight and step (sigmoid, Adam, ...)
# Above this many bits 'adaround' keeps GPTQ's rounding: at 4 bits it measured the same
# as GPTQ on both MNIST CNNs (within 0.25 points), at 2 and 3 bits up to 3 points above.
ADAROUND_MAX_BITS = 3
_TINY = np.finfo(np.float32).tiny


def _bmm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """``a @ b`` per group; one group goes through 2-D BLAS (numpy's stacked matmul on
  ``(1, 28, 28) @ (1, 28, 672)`` measured about 30x slower here)."""
  if a.shape[0] == 1 and b.shape[0] == 1:
    return np.matmul(a[0], b[0])[None]
  return np.matmul(a, b)


def qmax_of(bits: int) -> float:
  """Largest integer level at ``bits`` (narrow range): ``2^(b-1) - 1``.

  >>> qmax_of(4)
  7.0
  """
  return float(2 ** (int(bits) - 1) - 1)


# --------------------------------------------------------------------------- input statistics


@dataclasses.dataclass
class InputStats:
  """Moments of a layer's inputs as its kernel sees them (one row per output position).

  ``kind`` is ``"matrix"`` (Dense: the input vector; Conv: its im2col patch,
  ordered as ``kernel.reshape(-1, out)``) or ``"depthwise"`` (one patch per
  input channel, ``(C, kh*kw)``). ``hessian_sum`` is the sum of ``x x^T``
  over ``hessian_rows`` rows (a random subset when there are many),
  ``mean_sum`` the sum of ``x`` over all ``rows``.
  """

  kind: str
  hessian_sum: np.ndarray  # (1, d, d) or (C, k, k), float64
  mean_sum: np.ndarray  # (1, d) or (C, k), float64
  rows: int = 0
  hessian_rows: int = 0
  kept: Optional[list] = dataclasses.field(default_factory=list)  # rows, while fewer than d
  # GPTQ's factorizations of this Hessian, shared by every bit-width (`gptq`'s ``cache``).
  factorizations: Dict[tuple, tuple] = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def empty(cls, kind: str, groups: int, dim: int) -> "InputStats":
    return cls(kind, np.zeros((groups, dim, dim)), np.zeros((groups, dim)))

  def update(self, columns: np.ndarray, hessian_columns: Optional[np.ndarray] = None) -> None:
    """Adds rows: ``(n, G, d)`` arrays (all rows for the mean, a subset for the Hessian)."""
    columns = np.asarray(columns, np.float64)
    hcols = columns if hessian_columns is None else np.asarray(hessian_columns, np.float64)
    self.mean_sum += columns.sum(axis=0)
    self.rows += len(columns)
    # float32 products (half the time of float64; the sum stays float64).
    h32 = np.ascontiguousarray(hcols.transpose(1, 2, 0), np.float32)  # (G, d, n)
    self.hessian_sum += _bmm(h32, np.swapaxes(h32, 1, 2))
    self.hessian_rows += len(hcols)
    self.factorizations.clear()
    if self.kept is not None:
      self.kept.append(hcols.astype(np.float32))
      if self.hessian_rows >= self.dim:
        self.kept = None

  def factor(self) -> Optional[np.ndarray]:
    """``F`` with ``F^T F = E[x x^T]`` per group ``(G, r, d)`` when ``r < d`` rows, else None.

    Errors ``dw^T H dw`` then cost ``r d`` instead of ``d^2`` per channel.
    """
    if not self.kept:
      return None
    rows = np.concatenate(self.kept, axis=0)  # (r, G, d)
    return np.ascontiguousarray(rows.transpose(1, 0, 2)) / np.sqrt(max(self.hessian_rows, 1))

  @property
  def mean(self) -> np.ndarray:
    return self.mean_sum / max(self.rows, 1)

  @property
  def hessian(self) -> np.ndarray:
    """``E[x x^T]`` per group, ``(G, d, d)``."""
    return self.hessian_sum / max(self.hessian_rows, 1)

  @property
  def dim(self) -> int:
    return int(self.hessian_sum.shape[-1])


_STATS_LAYERS = ("Dense", "Conv1D", "Conv2D", "DepthwiseConv2D")


def stats_kind(layer) -> Optional[str]:
  """'matrix', 'depthwise', or None when `layer_columns` does not cover this layer."""
  name = type(layer).__name__
  if name not in _STATS_LAYERS:
    return None
  cfg = layer.get_config()
  if int(cfg.get("groups", 1) or 1) != 1 or cfg.get("padding") == "causal":
    return None
  if cfg.get("data_format", "channels_last") not in (None, "channels_last"):
    return None
  return "depthwise" if name == "DepthwiseConv2D" else "matrix"


def layer_columns(layer, x) -> np.ndarray:
  """The inputs ``x`` of ``layer`` as its kernel sees them: ``(rows, G, d)``.

  Dense: each input vector (leading axes flattened); Conv1D/Conv2D: each
  im2col patch (``tf.image.extract_patches``, same padding, strides and
  dilation as the layer); DepthwiseConv2D: each patch of each input channel.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  kind = stats_kind(layer)
  if kind is None:
    raise InvalidInputError(
        f"Expected a Dense, Conv1D, Conv2D or DepthwiseConv2D layer. Received: "
        f"{type(layer).__name__} {layer.name!r}")
  x = np.asarray(x, np.float32)
  name = type(layer).__name__
  if name == "Dense":
    return x.reshape(-1, 1, x.shape[-1])
  cfg = layer.get_config()
  ksize = tuple(cfg["kernel_size"])
  strides = tuple(cfg["strides"])
  rates = tuple(cfg["dilation_rate"])
  if name == "Conv1D":
    x = x[:, None]  # (N, 1, L, C)
    ksize, strides, rates = (1,) + ksize, (1,) + strides, (1,) + rates
  patches = tf.image.extract_patches(
      x, sizes=(1,) + ksize + (1,), strides=(1,) + strides + (1,),
      rates=(1,) + rates + (1,), padding=cfg["padding"].upper()).numpy()
  channels = x.shape[-1]
  patches = patches.reshape(-1, int(np.prod(ksize)) * channels)
  if kind == "matrix":
    return patches[:, None, :]
  return patches.reshape(len(patches), int(np.prod(ksize)), channels).transpose(0, 2, 1)


def accumulate(stats: Optional[InputStats], layer, x, max_hessian_rows: int = 4096,
               rng: Optional[np.random.Generator] = None) -> InputStats:
  """Adds one batch of ``layer``'s inputs to ``stats`` (a new one when None)."""
  cols = layer_columns(layer, x)
  if stats is None:
    stats = InputStats.empty(stats_kind(layer), cols.shape[1], cols.shape[2])
  hcols = cols
  if len(cols) > max_hessian_rows:
    rng = rng if rng is not None else np.random.default_rng(0)
    hcols = cols[rng.choice(len(cols), max_hessian_rows, replace=False)]
  stats.update(cols, hcols)
  return stats


# --------------------------------------------------------------------------- layouts


def _to_groups(w: np.ndarray, reduce_axes: Sequence[int], kind: Optional[str]):
  """Kernel -> ``(G, d, n)`` (d: weights per channel, n: channels per group) and its inverse."""
  axes = tuple(a % w.ndim for a in reduce_axes)
  keep = tuple(a for a in range(w.ndim) if a not in axes)
  perm = axes + keep
  moved = w.transpose(perm)
  d = int(np.prod([w.shape[a] for a in axes]))
  n = int(np.prod([w.shape[a] for a in keep])) if keep else 1
  flat = moved.reshape(d, n)
  groups = 1
  if kind == "depthwise":  # (kh, kw, C, M): channel (c, m) sees input channel c
    groups = w.shape[keep[0]]
    flat3 = flat.reshape(d, groups, n // groups).transpose(1, 0, 2)
  else:
    flat3 = flat[None]
  inverse_perm = np.argsort(perm)
  moved_shape = moved.shape

  def back(g: np.ndarray) -> np.ndarray:
    f = g.transpose(1, 0, 2).reshape(d, n) if groups > 1 or kind == "depthwise" else g[0]
    return f.reshape(moved_shape).transpose(inverse_perm)

  return flat3, back


def _fake(w3: np.ndarray, scales: np.ndarray, qmax: float):
  ints = np.clip(np.round(w3 / scales[:, None, :]), -qmax, qmax)
  return ints, ints * scales[:, None, :]


@dataclasses.dataclass
class _Factor:
  """``F`` (``(G, r, d)``, r < d) standing for ``H = F^T F`` in error measures."""
  f: np.ndarray


def _channel_error(dw: np.ndarray, hessian) -> np.ndarray:
  """Per channel ``(G, n)``: ``sum dw^2``, or ``dw^T H dw`` (``H`` an array or a `_Factor`)."""
  if hessian is None:
    return np.sum(dw * dw, axis=1)
  if isinstance(hessian, _Factor):  # ||F dw||^2: cheaper than dw^T F^T F dw
    fd = _bmm(hessian.f.astype(dw.dtype, copy=False), dw)
    return np.sum(fd * fd, axis=1)
  return np.sum(dw * _metric_times(hessian, dw), axis=1)


def _maxabs_scales(w3: np.ndarray, qmax: float) -> np.ndarray:
  """`keras_mpq.base.layers.channel_scales` of ``(G, d, n)`` weights: 1 for dead channels (integers 0)."""
  return layers_lib.channel_scales(np.max(np.abs(w3), axis=1), qmax)


def _dead_channels(w3: np.ndarray) -> np.ndarray:
  """``(G, n)``: channels below `keras_mpq.base.layers.MIN_WEIGHT_BOUND`, which quantize to 0."""
  return np.max(np.abs(w3), axis=1) < layers_lib.MIN_WEIGHT_BOUND


def clip_search(w3: np.ndarray, bits: int, hessian: Optional[np.ndarray] = None,
                alphas: Sequence[float] = ALPHAS, refine: int = 2
                ) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel clipping ``(G, d, n)`` -> (scales ``(G, n)``, their errors ``(G, n)``).

  Scales ``alpha * max|w| / q``: every other alpha of ``alphas`` first, then
  the ``refine`` neighbours on each side of each channel's best. The error
  is the weight squared error, or ``dw^T H dw`` when ``hessian``
  (``(G, d, d)``) is given. ``alpha = 1`` (round to nearest) is always a
  candidate, so the result is never worse than it on that measure.
  """
  qmax = qmax_of(bits)
  w64 = np.asarray(w3, np.float64)
  h32 = hessian if hessian is None or isinstance(hessian, _Factor) else np.asarray(
      hessian, np.float32)
  base = _maxabs_scales(w64, qmax)
  alphas = np.sort(np.asarray(alphas, np.float64))
  if alphas[-1] < 1.0:
    alphas = np.append(alphas, 1.0)

  def error(alpha):  # alpha: (G, n)
    s = np.maximum(base * alpha, _TINY)
    dw = (_fake(w64, s, qmax)[1] - w64).astype(np.float32)
    return _channel_error(dw, h32).astype(np.float64)

  last = len(alphas) - 1
  best_i = np.full(base.shape, last)
  best_e = error(np.ones(base.shape))
  coarse = list(range(last - 2, -1, -2)) if refine else list(range(last))
  for i in coarse:
    e = error(np.full(base.shape, alphas[i]))
    better = e < best_e
    best_i = np.where(better, i, best_i)
    best_e = np.where(better, e, best_e)
  if refine:
    center = best_i.copy()
    for off in range(-refine, refine + 1):
      if off == 0:
        continue
      idx = center + off
      valid = (idx >= 0) & (idx < last)
      e = error(alphas[np.clip(idx, 0, last)])
      better = valid & (e < best_e)
      best_i = np.where(better, idx, best_i)
      best_e = np.where(better, e, best_e)
  return np.maximum(base * alphas[best_i], _TINY), best_e


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
  """Upper-triangular ``U`` with ``U^T U = H^-1`` per group, without forming ``H^-1``.

  With ``J`` the reversal, ``J H J = M M^T`` (lower Cholesky) gives
  ``H = R R^T`` with ``R = J M J`` upper triangular, so ``U = R^-1``.
  """
  if h.shape[0] > 1:  # many small Hessians (depthwise: one per channel): one batched call
    m = np.linalg.cholesky(np.ascontiguousarray(h[:, ::-1, ::-1], np.float32))
    out = np.linalg.inv(np.ascontiguousarray(m[:, ::-1, ::-1])).astype(np.float64)
    if not np.all(np.isfinite(out)):
      raise np.linalg.LinAlgError("non-finite inverse Hessian")
    return out
  from scipy import linalg  # pylint: disable=g-import-not-at-top
  out = np.empty(h.shape, np.float64)
  for g in range(h.shape[0]):
    # float32, as GPTQ's reference code: half the time; the damping keeps it stable.
    m = linalg.cholesky(np.ascontiguousarray(h[g, ::-1, ::-1], np.float32), lower=True)
    r = np.ascontiguousarray(m[::-1, ::-1])
    out[g] = linalg.solve_triangular(r, np.eye(h.shape[1], dtype=np.float32), lower=False)
  if not np.all(np.isfinite(out)):
    raise np.linalg.LinAlgError("non-finite inverse Hessian")
  return out


def gptq(w3: np.ndarray, scales: np.ndarray, bits: int, hessian: np.ndarray,
         damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK, act_order: bool = True,
         max_dim: int = 2048, cache: Optional[Dict[tuple, tuple]] = None,
         _span: Tuple[int, int] = (0, -1)) -> np.ndarray:
  """GPTQ rounding of ``(G, d, n)`` weights on the given per-channel scales; returns integers.

  ``hessian`` is ``E[x x^T]`` per group ``(G, d, d)``. Inputs that were
  always zero get a unit diagonal; ``damp`` times the mean diagonal is added
  for stability (raise it when there are fewer samples than inputs). Layers
  with more than ``max_dim`` inputs per channel are split into blocks of at
  most ``max_dim`` inputs, each with its own Hessian block (the Cholesky
  factorization then costs ``d * max_dim^2``, not ``d^3``).

  The factorization depends on the Hessian alone, not on the weights or
  the bits: pass the same dict as ``cache`` (`InputStats.factorizations`)
  and every bit-width of a layer after the first reuses it.
  """
  qmax = qmax_of(bits)
  g, d, n = w3.shape
  if d > max_dim:  # block-diagonal: each block of inputs on its own (cost d * max_dim^2)
    cuts = np.linspace(0, d, -(-d // max_dim) + 1).astype(int)
    return np.concatenate([
        gptq(w3[:, a:b], scales, bits, np.asarray(hessian)[:, a:b, a:b], damp, block,
             act_order, max_dim, cache, (a, b)) for a, b in zip(cuts[:-1], cuts[1:])], axis=1)
  key = (float(damp), bool(act_order), int(max_dim)) + tuple(_span)
  if cache is not None and key in cache:
    perm, upper = cache[key]
  else:
    perm, upper = _factorize(hessian, damp, act_order)
    if cache is not None:
      cache[key] = (perm, upper)
  inv_perm = np.argsort(perm, axis=1)
  w = np.take_along_axis(np.asarray(w3, np.float64), perm[:, :, None], axis=1)
  s = np.asarray(scales, np.float64)  # (G, n)
  ints = np.zeros_like(w)
  for i1 in range(0, d, block):
    i2 = min(i1 + block, d)
    w1 = w[:, i1:i2, :].copy()
    err1 = np.zeros_like(w1)
    u1 = upper[:, i1:i2, i1:i2]
    for i in range(i2 - i1):
      col = w1[:, i, :]  # (G, n)
      q = np.clip(np.round(col / s), -qmax, qmax)
      ints[:, i1 + i, :] = q
      e = (col - q * s) / u1[:, i, i][:, None]
      w1[:, i:, :] -= u1[:, i, i:][:, :, None] * e[:, None, :]
      err1[:, i, :] = e
    if i2 < d:
      w[:, i2:, :] -= _bmm(np.swapaxes(upper[:, i1:i2, i2:], 1, 2), err1)
  return np.take_along_axis(ints, inv_perm[:, :, None], axis=1)


def _metric_times(metric, dw: np.ndarray) -> np.ndarray:
  """``H dw`` per group (``H`` an array or a `_Factor`; None: the identity)."""
  if metric is None:
    return dw
  if isinstance(metric, _Factor):
    f = metric.f.astype(dw.dtype, copy=False)
    return _bmm(np.swapaxes(f, 1, 2), _bmm(f, dw))
  return _bmm(metric.astype(dw.dtype, copy=False), dw)


def refit_scales(w3: np.ndarray, ints: np.ndarray, scales: np.ndarray, metric=None
                 ) -> np.ndarray:
  """Per channel, the scale ``s`` minimizing ``(s i - w)^T H (s i - w)`` for fixed integers.

  ``s = i^T H w / i^T H i`` (``H`` the identity when ``metric`` is None);
  channels where that is not positive keep ``scales``. Never worse on the
  measure than ``scales`` with the same integers.

  >>> w = np.array([[[0.9], [-1.1], [0.1]]])
  >>> refit_scales(w, np.array([[[1.0], [-1.0], [0.0]]]), np.array([[1.1]])).round(3).tolist()
  [[1.0]]
  """
  w = np.asarray(w3, np.float64)
  i = np.asarray(ints, np.float64)
  hi = _metric_times(metric, i)
  num = np.sum(w * hi, axis=1)
  den = np.sum(i * hi, axis=1)
  ok = (den > 0) & (num > 0) & np.isfinite(num) & np.isfinite(den)
  return np.where(ok, np.maximum(num / np.where(ok, den, 1.0), _TINY), scales)


def _rectified_sigmoid(v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """AdaRound's ``h(v) = clip(1.2 sigmoid(v) - 0.1, 0, 1)`` and its derivative."""
  sig = 1.0 / (1.0 + np.exp(-v))
  raw = sig * 1.2 - 0.1
  dh = np.where((raw > 0) & (raw < 1), 1.2 * sig * (1 - sig), 0.0).astype(v.dtype)
  return np.clip(raw, 0.0, 1.0), dh


def adaround(w3: np.ndarray, scales: np.ndarray, bits: int, metric, init: np.ndarray,
             steps: int = ADAROUND_STEPS, lam: float = ADAROUND_LAMBDA, damp: float = GPTQ_DAMP,
             seed_scale: float = 0.95) -> np.ndarray:
  """AdaRound on ``(G, d, n)`` weights at fixed ``scales``, started from ``init``; integers.

  Each weight rounds to ``floor(w/s)`` or one above, ``h`` in [0, 1] deciding
  (a rectified sigmoid of a free variable, started at ``seed_scale`` toward
  ``init``'s choice). Adam minimizes the relative output error
  ``sum dw^T (H + damp * mean diag H * I) dw / sum w^T H w`` plus
  ``lam * sum (1 - |2h - 1|^beta)``, ``beta`` annealed from 20 to 2 after the
  first fifth of the steps (Nagel et al., 2020). Returns the hard rounding
  of the result, inside ``-q..q``.
  """
  qmax = qmax_of(bits)
  w = np.asarray(w3, np.float32)
  s = np.asarray(scales, np.float32)[:, None, :]
  if isinstance(metric, _Factor):
    diag = np.sum(metric.f.astype(np.float64) ** 2, axis=1)  # (G, d)
    metric = _Factor(np.asarray(metric.f, np.float32))
  else:
    diag = np.einsum("gii->gi", np.asarray(metric, np.float64))
    metric = np.asarray(metric, np.float32)
  extra = (damp * np.mean(diag, axis=1)).astype(np.float32)[:, None, None]  # (G, 1, 1)

  def h_dw(dw):
    return _metric_times(metric, dw) + extra * dw

  r = w / s
  low = np.clip(np.floor(r), -qmax, qmax)
  span = np.clip(np.floor(r) + 1, -qmax, qmax) - low  # 0 where clipped: nothing to choose
  up = np.clip(np.asarray(init, np.float32) - low, 0.0, 1.0) > 0.5
  start = np.where(up, seed_scale, 1.0 - seed_scale)
  p = np.clip((start + 0.1) / 1.2, 1e-4, 1 - 1e-4)
  v = np.log(p / (1 - p)).astype(np.float32)
  norm = float(np.sum(w * h_dw(w))) or 1.0
  free = span > 0
  # Small products, many steps: one BLAS thread (on 2 busy cores, 2 threads measured
  # 3-10x slower per step, waiting on each other).
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    _adaround_steps(v, w, s, low, span, free, h_dw, norm, steps, lam)
  h, _ = _rectified_sigmoid(v)
  return (low + span * (h >= 0.5)).astype(np.float64)


def _adaround_steps(v, w, s, low, span, free, h_dw, norm, steps, lam) -> None:
  """`adaround`'s Adam steps on ``v`` (in place)."""
  m1 = np.zeros_like(v)
  m2 = np.zeros_like(v)
  lr, b1, b2 = 0.01, 0.9, 0.999
  for t in range(1, int(steps) + 1):
    h, dh = _rectified_sigmoid(v)
    dw = s * (low + span * h) - w
    grad = (2.0 / norm) * h_dw(dw) * s * span * dh
    frac = t / steps
    if frac > 0.2:
      beta = 20.0 + (2.0 - 20.0) * (frac - 0.2) / 0.8
      u = 2 * h - 1
      grad = grad - lam * 2 * beta * np.abs(u) ** (beta - 1) * np.sign(u) * dh * free
    m1 = b1 * m1 + (1 - b1) * grad
    m2 = b2 * m2 + (1 - b2) * grad * grad
    v -= lr * (m1 / (1 - b1 ** t)) / (np.sqrt(m2 / (1 - b2 ** t)) + 1e-8)


def adaround_flops(w3: np.ndarray, metric, steps: int = ADAROUND_STEPS) -> float:
  """Work of `adaround` on ``w3``: ``steps`` x (the product ``H dw`` + `_ADAROUND_ELEMENTWISE`
  operations per weight)."""
  g, d, n = w3.shape
  per = 4.0 * metric.f.shape[1] * d * n if isinstance(metric, _Factor) else 2.0 * d * d * n
  return float(steps) * g * (per + _ADAROUND_ELEMENTWISE * d * n)


def _factorize(hessian: np.ndarray, damp: float, act_order: bool
               ) -> Tuple[np.ndarray, np.ndarray]:
  """(column order ``(G, d)``, upper ``U`` with ``U^T U = H^-1`` in that order) for `gptq`."""
  h = np.array(hessian, np.float64, copy=True)
  g, d = h.shape[0], h.shape[1]
  diag = np.einsum("gii->gi", h)
  dead = diag <= 0
  if np.any(dead):
    gi, di = np.nonzero(dead)
    h[gi, di, di] = 1.0
    diag = np.einsum("gii->gi", h)
  mean_diag = np.mean(diag, axis=1)
  h[:, np.arange(d), np.arange(d)] += (damp * mean_diag)[:, None]
  if act_order:
    perm = np.argsort(-np.einsum("gii->gi", h), axis=1, kind="stable")
  else:
    perm = np.tile(np.arange(d), (g, 1))
  h = np.take_along_axis(np.take_along_axis(h, perm[:, :, None], axis=1), perm[:, None, :],
                         axis=2)
  return perm, _upper_cholesky_of_inverse(h)  # U^T U = H^-1


# --------------------------------------------------------------------------- one kernel


@dataclasses.dataclass
class QuantizedKernel:
  """One kernel quantized: ``values == integers * scales`` (kernel layout, float32).

  ``method`` is the step the layer actually used ('rtn', 'mse' or 'gptq');
  ``channels`` counts the output channels that kept each candidate;
  ``error`` and ``rtn_error`` are the layer's error on ``measure`` ('output'
  with input statistics, 'weight' without) for the result and for round to
  nearest; ``notes`` says why a step fell back.
  """

  values: np.ndarray
  integers: np.ndarray
  scales: np.ndarray
  method: str
  channels: Dict[str, int]
  error: float
  rtn_error: float
  measure: str
  notes: Tuple[str, ...] = ()


def _pin(ints: np.ndarray, w3: np.ndarray, scales: np.ndarray, qmax: float) -> np.ndarray:
  """Channels whose max |int| < q: the weight largest relative to its scale set to +-q."""
  out = ints.copy()
  top = np.max(np.abs(out), axis=1)  # (G, n)
  nonzero = np.max(np.abs(w3), axis=1) > 0
  need = (top < qmax) & nonzero
  if np.any(need):
    idx = np.argmax(np.abs(w3), axis=1)  # (G, n)
    gi, ni = np.nonzero(need)
    di = idx[gi, ni]
    out[gi, di, ni] = np.sign(w3[gi, di, ni]) * qmax
  return out


def quantize_kernel(kernel, bits: int, reduce_axes: Sequence[int], method: str = "gptq",
                    stats: Optional[InputStats] = None, min_rows: Optional[int] = None
                    ) -> QuantizedKernel:
  """Integers and per-channel scales for one kernel at ``bits``.

  Args:
    kernel: the float kernel (Keras layout).
    bits: 2..8.
    reduce_axes: kernel axes reduced to one scale per output channel.
    method: 'rtn', 'mse' (clipping search), 'gptq' (clipping, then GPTQ),
      'adaround' (GPTQ's integers refined by AdaRound) or
      'gptq-damped' (GPTQ on a strongly damped Hessian).
    stats: `InputStats` of the layer's calibration inputs, or None
      (data-free: weight error only, GPTQ falls back to 'mse').
    min_rows: fewest input rows for a Hessian step (default: the number of
      weights per channel); with fewer, GPTQ runs with `GPTQ_DAMP_FEW_ROWS`.

  Returns:
    A `QuantizedKernel`; ``scales`` keeps the reduced axes as size 1.
  """
  if method not in METHODS:
    raise InvalidInputError(f"Expected method in {METHODS}. Received: method={method!r}")
  bits = check_weight_bits(bits)
  if bits == FLOAT_BITS:
    raise InvalidInputError("Expected integer bits (2..8). Received: FLOAT_BITS")
  w = np.asarray(kernel, np.float32)
  qmax = qmax_of(bits)
  notes = []
  kind = stats.kind if stats is not None else None
  w3, back = _to_groups(w, reduce_axes, kind)
  w64 = w3.astype(np.float64)
  hessian = None
  if stats is not None:
    if stats.hessian_sum.shape[0] != w3.shape[0] or stats.dim != w3.shape[1]:
      raise InvalidInputError(
          f"Expected input statistics for {w3.shape[0]} group(s) of {w3.shape[1]} inputs. "
          f"Received: {stats.hessian_sum.shape[0]} of {stats.dim}")
    if stats.hessian_rows == 0:
      notes.append("no calibration rows: weight error only")
    elif not np.all(np.isfinite(stats.hessian_sum)):
      notes.append("non-finite calibration inputs: weight error only")
    else:
      hessian = stats.hessian
  measure = "output" if hessian is not None else "weight"
  # Fewer rows than inputs: measure errors through the rows themselves (cheaper).
  factor = stats.factor() if hessian is not None else None
  metric = _Factor(factor) if factor is not None else hessian

  rtn_s = _maxabs_scales(w64, qmax)
  finite = np.all(np.isfinite(w64))
  if not finite:
    notes.append("non-finite kernel: round to nearest")
  rtn_i, rtn_q = _fake(w64, rtn_s, qmax)
  rtn_e = _channel_error(rtn_q - w64, metric) if finite else np.zeros(rtn_s.shape)
  cands = {"rtn": (rtn_i, rtn_s, rtn_e)}
  used = "rtn"
  if finite and method != "rtn":
    s, _ = clip_search(w64, bits, metric)
    i_c, q_c = _fake(w64, s, qmax)
    cands["mse"] = (i_c, s, _channel_error(q_c - w64, metric))
    used = "mse"
    if method in ("gptq", "gptq-damped", "adaround"):
      if hessian is None:
        notes.append("gptq needs calibration inputs: clipping only")
      else:
        damp = GPTQ_DAMP_STRONG if method == "gptq-damped" else GPTQ_DAMP
        need = w3.shape[1] if min_rows is None else int(min_rows)
        if stats.hessian_rows < need:
          damp = max(damp, GPTQ_DAMP_FEW_ROWS)
          notes.append(f"{stats.hessian_rows} input rows < {need} inputs: damped Hessian")
        def rounded(ints):  # pinned to +-q, scales refit, error; None when not finite
          ints = _pin(ints, w64 / s[:, None, :], s, qmax)
          fitted = refit_scales(w64, ints, s, metric)
          err = _channel_error(ints * fitted[:, None, :] - w64, metric)
          return (ints, fitted, err) if np.all(np.isfinite(err)) else None

        try:
          cand = rounded(gptq(w64, s, bits, hessian, damp=damp, max_dim=GPTQ_MAX_DIM,
                              cache=stats.factorizations))
          if cand is not None:
            cands["gptq"] = cand
            used = "gptq"
          else:
            notes.append("gptq gave non-finite values: clipping only")
        except np.linalg.LinAlgError:
          notes.append("Hessian not positive definite: clipping only")
        if method == "adaround" and "gptq" in cands and bits <= ADAROUND_MAX_BITS:
          flops = adaround_flops(w64, metric, ADAROUND_STEPS)
          if flops > ADAROUND_MAX_FLOPS:
            notes.append(f"adaround skipped: {flops / 1e9:.0f} GFLOP > "
                         f"{ADAROUND_MAX_FLOPS / 1e9:.0f}: GPTQ's rounding kept")
          else:
            cand = rounded(adaround(w64, s, bits, metric, cands["gptq"][0],
                                    steps=ADAROUND_STEPS, lam=ADAROUND_LAMBDA, damp=damp))
            if cand is not None:
              cands["adaround"] = cand
              used = "adaround"
            else:
              notes.append("adaround gave non-finite values: GPTQ kept")
  # Per channel: the candidate with the lowest error (ties keep the simpler one).
  names = list(cands)
  errors = np.stack([cands[k][2] for k in names])  # (K, G, n)
  choice = np.argmin(errors, axis=0)  # first minimum: rtn wins ties
  # Dead channels stay at rtn's zeros whatever the errors say (a candidate
  # pinned to +-q there would re-quantize to other integers in the file).
  choice = np.where(_dead_channels(w64), 0, choice)
  ints = np.zeros_like(w64)
  scales = np.zeros(rtn_s.shape)
  for k, name in enumerate(names):
    sel = choice == k
    ints = np.where(sel[:, None, :], cands[name][0], ints)
    scales = np.where(sel, cands[name][1], scales)
  channels = {name: int(np.sum(choice == k)) for k, name in enumerate(names)}
  err = float(np.sum(np.take_along_axis(errors, choice[None], 0)))
  scales32 = scales.astype(np.float32)
  values = (ints * scales32[:, None, :]).astype(np.float32)
  kernel_ints = back(np.nan_to_num(ints, nan=0.0)).astype(np.int32)
  kernel_values = back(values)
  keep_shape = [1 if a in tuple(x % w.ndim for x in reduce_axes) else w.shape[a]
                for a in range(w.ndim)]
  scale_kernel = back(np.broadcast_to(scales32[:, None, :], w3.shape))
  scale_kernel = scale_kernel.max(axis=tuple(x % w.ndim for x in reduce_axes), keepdims=True)
  if channels.get(used, 0) == 0 and used != "rtn":
    used = max(channels, key=lambda k: channels[k])
  return QuantizedKernel(kernel_values, kernel_ints, scale_kernel.reshape(keep_shape),
                         used, channels, err, float(np.sum(rtn_e)), measure, tuple(notes))


def bias_correction(kernel, quantized, reduce_axes: Sequence[int], mean_float: np.ndarray,
                    mean_quantized: Optional[np.ndarray] = None, kind: str = "matrix"
                    ) -> Tuple[np.ndarray, Optional[str]]:
  """Per-channel bias change that removes the mean output shift; ``(delta, note)``.

  ``E[W x_f] - E[Wq x_q]`` with ``x_f`` the float model's inputs and ``x_q``
  the quantized model's (the same when ``mean_quantized`` is None); means as
  `InputStats.mean` gives them. Returns zeros and a note when the result is
  not finite. ``delta`` is flat, in the layer's bias order.

  >>> w = np.array([[1.0], [-1.0]]); wq = np.array([[0.5], [-1.0]])
  >>> bias_correction(w, wq, (0,), np.array([[2.0, 0.0]]))[0].tolist()
  [1.0]
  """
  w3, _ = _to_groups(np.asarray(kernel, np.float64), reduce_axes, kind)
  q3, _ = _to_groups(np.asarray(quantized, np.float64), reduce_axes, kind)
  mf = np.asarray(mean_float, np.float64)
  mq = mf if mean_quantized is None else np.asarray(mean_quantized, np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    delta = np.einsum("gd,gdn->gn", mf, w3) - np.einsum("gd,gdn->gn", mq, q3)
  delta = delta.reshape(-1)
  if not np.all(np.isfinite(delta)):
    return np.zeros_like(delta), "non-finite bias correction: skipped"
  return delta.astype(np.float32), None


def output_error(kernel, quantized, reduce_axes: Sequence[int], stats: InputStats) -> float:
  """``E||(Wq - W) x||^2`` summed over output channels, from the input statistics."""
  w3, _ = _to_groups(np.asarray(kernel, np.float64), reduce_axes, stats.kind)
  q3, _ = _to_groups(np.asarray(quantized, np.float64), reduce_axes, stats.kind)
  return float(np.sum(_channel_error(q3 - w3, stats.hessian)))
