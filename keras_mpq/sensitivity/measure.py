"""`measure_sensitivity`: one sensitivity table, with any registered metric.

>>> table = measure_sensitivity(model, (x, y), metric="zeroq_kl")  # doctest: +SKIP
>>> table.score("conv2", 2) > table.score("conv2", 8)  # doctest: +SKIP
True
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from keras_mpq.base.batching import num_samples
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import SensitivityTable, to_jsonable
from keras_mpq.sensitivity.job import (
  HOLDOUT,
  NOISE_Z,
  Job,
  MetricSpec,
  apply_holdout,
  check_objective,
  resolve_objective,
  prepare,
)
from keras_mpq.sensitivity.metrics import get_metric

# --------------------------------------------------------------------------- what is known


def respect_known(scores, bits: Sequence[int], stderr=None, z: float = NOISE_Z
                  ) -> Tuple[np.ndarray, Dict[str, Any]]:
  """Scores made consistent with what is known about quantization, before allocation.

  Per layer (row; columns are ascending ``bits``):

  1. NaN or infinite scores (a layer whose loss diverges at those bits) are
     replaced by a penalty above every finite score (10 x the largest
     magnitude + 1), so the allocator takes them only when nothing else fits.
  2. Scores are taken relative to the layer's highest bit-width.
  3. A difference within ``z`` standard errors (``stderr``, same shape; the
     errors of the two bit-widths combined) counts as zero: the measurement
     cannot tell it from noise.
  4. More bits are never predicted worse: going down the bit-widths, each
     score is at least the one above it (a running maximum), so every score
     is >= 0 and the highest bit-width scores 0.

  Returns ``(clean, info)``; ``info`` counts what each step changed.

  >>> clean, info = respect_known([[0.5, -0.2, 0.0], [0.01, 0.3, 0.0]], (2, 4, 8),
  ...                             stderr=[[0.1, 0.1, 0.0], [0.1, 0.1, 0.0]])
  >>> clean.tolist(), info["zeroed_as_noise"], info["raised_for_monotonicity"]
  ([[0.5, 0.0, 0.0], [0.3, 0.3, 0.0]], 2, 1)
  """
  raw = np.array(scores, dtype=np.float64)
  order = np.argsort(np.asarray(bits))
  if raw.ndim != 2 or raw.shape[1] != len(order):
    raise InvalidInputError(
        f"Expected scores of shape (layers, {len(order)}). Received: shape {raw.shape}")
  s = raw[:, order]
  bad = ~np.isfinite(s)
  info: Dict[str, Any] = {"non_finite": int(bad.sum()), "noise_z": float(z)}
  if bad.all():
    raise InvalidInputError(
        "Expected finite sensitivity scores. Received: every score is NaN or infinite "
        "(the model's loss diverges at every measured bit-width). Check that the float "
        "model's outputs are finite on the data.")
  if bad.any():
    penalty = 10.0 * float(np.max(np.abs(s[~bad]))) + 1.0
    s[bad] = penalty
    info["non_finite_penalty"] = penalty
  rel = s - s[:, -1:]
  zeroed = 0
  if stderr is not None:
    se = np.array(stderr, dtype=np.float64)[:, order]
    se = np.where(np.isfinite(se), se, 0.0)
    se_rel = np.sqrt(se * se + se[:, -1:] ** 2)
    noise = (np.abs(rel) <= z * se_rel) & ~bad & (rel != 0)
    zeroed = int(noise.sum())
    rel[noise] = 0.0
  mono = np.maximum.accumulate(rel[:, ::-1], axis=1)[:, ::-1]
  raised = int(np.sum(mono > rel + 1e-15))
  clean = np.empty_like(mono)
  clean[:, order] = mono
  info.update({"zeroed_as_noise": zeroed, "raised_for_monotonicity": raised,
               "all_zero": bool(np.all(clean == 0))})
  return clean, info


# --------------------------------------------------------------------------- public API


def measure_sensitivity(model, data, weight_bits: Sequence[int] = (2, 4, 8),
                        metric: str = "task_interaction", context=None,
                        activation_bits: int = 8, batch_size: int = 128, seed: int = 0,
                        progress: Optional[bool] = None, *,
                        reuse_prefix: bool = True, objective: Optional[str] = None,
                        holdout: float = HOLDOUT, clean: bool = True,
                        weight_method: Optional[str] = None,
                        bias_correction: Optional[Union[bool, str]] = None,
                        range_policy: Optional[str] = None,
                        loss=None) -> SensitivityTable:
  """Scores every (quantizable layer, candidate weight bit-width) of ``model``.

  Args:
    model: a float tf_keras Sequential/functional classifier (BatchNorm is
      folded first; layer names are kept).
    data: ``(x, y)`` with integer (or one-hot) labels, or ``x`` alone (or
      ``(x, None)``): then the float model's argmax labels it. Synthetic or
      real. Not needed for ``weight_mse`` (pass None).
    weight_bits: candidate bit-widths, each in 2..8.
    metric: one of `available_metrics()`; see the module docstring.
    context: for ``task_interaction`` only: the other layers' bits, as a
      `QuantizationPlan` or ``{layer: bits}`` (missing layers get
      ``max(weight_bits)``; ``FLOAT_BITS`` keeps a layer float). Default: all
      layers at ``max(weight_bits)``.
    activation_bits: activation bits (8 or 16) of the quantized context.
    batch_size: evaluation batch size.
    seed: seeds the Hutchinson probes and the held-out split.
    progress: progress bar (None: only when stderr is a terminal).
    reuse_prefix: compute the layers before each layer once per batch for all
      its bit-widths (False evaluates the full model each time: same numbers,
      slower; for checking).
    objective: task loss of ``task_interaction`` / ``task_float_context``:
      ``"kl"`` (divergence from the float model's soft outputs, the default
      for a classifier) or ``"cross_entropy"`` (against the labels);
      ``"distortion"`` for any other model (the default there; see
      `keras_mpq.model.outputs.Heads`).
    holdout: share of ``data`` held out from range calibration; losses are
      measured on it (`split_holdout`: needs >= 64 samples, else nothing is
      held out and ``info["holdout"]["note"]`` says so).
    clean: pass the scores through `respect_known` (monotone in bits, noise
      counted as zero, NaN/Inf as a penalty); the measured scores stay in
      ``info["raw_scores"]``.
    loss: your own task loss, with ``data=(x, y)``: a Keras loss (a name such
      as ``"mse"`` or a ``keras.losses.Loss``) or a callable
      ``fn(y_true, y_pred)``, per sample or averaged (``y`` and the outputs
      are lists, in the model's order, for several outputs); used instead of
      the default objective (``objective="loss"``).

  Returns:
    A `SensitivityTable` (rows in model order, columns ascending bits). Its
    ``info`` holds the context and float losses, the number of evaluations,
    wall seconds, per-layer prefix reuse, and the compiled functions' trace
    counts.

  Example:

  >>> import numpy as np
  >>> from keras_mpq.base.compat import keras
  >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
  >>> table = measure_sensitivity(model, None, metric="weight_mse")
  >>> table.layers, table.bits, bool(table.score("fc", 2) > table.score("fc", 8))
  (('fc',), (2, 4, 8), True)
  """
  spec = get_metric(metric)
  objective = check_objective(objective)
  job = prepare(model, data, weight_bits, spec, context, activation_bits, batch_size,
                 seed, progress, loss=loss)
  job.reuse_prefix = bool(reuse_prefix)
  job.weight_method, job.bias_correction, job.range_policy = (
      weight_method, bias_correction, range_policy)
  objective = resolve_objective(job, objective)
  job.clean = bool(clean)
  apply_holdout(job, holdout)
  return measure(job, spec)


def measure(job: Job, spec: MetricSpec) -> SensitivityTable:
  t0 = time.perf_counter()
  scores, info = spec.fn(job)
  seconds = time.perf_counter() - t0
  info = dict(info)
  scores = np.asarray(scores, dtype=np.float64)
  if job.clean:
    raw = scores
    scores, known = respect_known(raw, job.bits, info.get("stderr"))
    info["cleaning"] = known
    info["raw_scores"] = [[float(v) if np.isfinite(v) else None for v in row]
                          for row in raw]
  info.update({"metric_seconds": {spec.name: round(seconds, 4)},
               "wall_seconds": round(seconds, 4),
               "num_samples": 0 if job.x_all is None else int(num_samples(job.x_all)),
               "holdout": job.holdout,
               "labels": job.labels,
               "seed": job.seed, "batch_size": job.batch_size})
  info.setdefault("evaluations", 0)
  return SensitivityTable(job.layers, job.bits, scores, spec.name, to_jsonable(info))
