"""Per-layer sensitivity to weight quantization, and the iterative bit-width search.

A `SensitivityTable` holds, for each quantizable layer ``i`` and candidate
weight bit-width ``b``, how much harm ``b`` bits in layer ``i`` do. The metrics
sit behind a small registry (`Metric`, `register_metric`, `get_metric`):

``task_interaction`` (default, the paper's)
    ``Omega_i(b | c) = L(c[i<-b]) - L(c)``: increase of the mean task loss
    (cross-entropy against the labels) when layer ``i`` goes to ``b`` bits
    while every other layer stays as in the context ``c`` (by default: every
    other layer at the highest candidate bit-width, activations quantized).
``task_float_context``
    ``Omega_i(b | float)``: the same with every other layer float and the
    activations float (the ablation without the interaction term).
``zeroq_kl``
    ``mean_j KL(M_float(x_j) || M_float[i<-b](x_j))`` (ZeroQ).
``hessian_trace``
    ``Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2`` with the trace estimated by
    Hutchinson's method on the task loss (HAWQ-V2).
``weight_mse``
    ``||Q_b(W_i) - W_i||^2 / ||W_i||^2`` (needs no data).

How the task-loss metrics are measured: the float model (BatchNorm folded) is
wrapped with tfmot once, calibrated once per context, and every (layer, bits)
pair is evaluated by assigning the layer's bits *variable* - no model is
rebuilt and no function retraced. The output of the layers before layer ``i``
does not depend on ``i``'s bits, so it is computed once per batch and only the
rest of the model (a sub-model from a tensor that cuts the graph before ``i``
to the output) is run for each bit-width. Each distinct sub-model has one
compiled function, traced once (``table.info["traces"]`` counts them).

Example:

>>> from keras_mpq import sensitivity
>>> table = sensitivity.measure_sensitivity(model, (x, y))  # doctest: +SKIP
>>> table.score("conv2", 2) > table.score("conv2", 8)  # doctest: +SKIP
True
>>> found = sensitivity.search(model, (x, y), "4bit")  # doctest: +SKIP
>>> found.plan.weight_bits  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from keras_mpq import apply as apply_lib
from keras_mpq import fileio, quantizers
from keras_mpq.compat import keras, tf, tfmot
from keras_mpq.types import (FLOAT_BITS, MAX_WEIGHT_BITS, MIN_WEIGHT_BITS, Budget,
                             CostTable, InvalidInputError, QuantizationPlan,
                             SensitivityTable,
                             check_activation_bits, check_weight_bits, to_jsonable, SearchResult)

HUTCHINSON_PROBES = 16
"""Rademacher probes of the ``hessian_trace`` metric's trace estimate."""

DEFAULT_OBJECTIVE = "kl"
"""Task loss of the task-loss metrics unless told otherwise (`OBJECTIVES`)."""

HOLDOUT = 0.5
"""Share of the data held out from range calibration for measuring losses."""

MIN_HOLDOUT_SAMPLES = 32
"""Fewest samples in each part (calibration, held-out); below twice this no part is held out."""

NOISE_Z = 2.0
"""Score differences within this many standard errors count as zero."""


# --------------------------------------------------------------------------- registry


class Metric(str, enum.Enum):
  """Names of the sensitivity metrics."""

  TASK_INTERACTION = "task_interaction"
  TASK_FLOAT_CONTEXT = "task_float_context"
  ZEROQ_KL = "zeroq_kl"
  HESSIAN_TRACE = "hessian_trace"
  WEIGHT_MSE = "weight_mse"


@dataclasses.dataclass(frozen=True)
class MetricSpec:
  """A registered metric: its function and what it needs.

  ``fn(job)`` returns ``(scores, info)`` with ``scores`` of shape
  (layers, bits). ``uses_context``: the metric depends on the other layers'
  bits (only such metrics take ``context`` and iterate in `search`).
  """

  name: str
  fn: Callable[["_Job"], Tuple[np.ndarray, Dict[str, Any]]]
  needs_data: bool = True
  needs_labels: bool = True
  uses_context: bool = False


_METRICS: Dict[str, MetricSpec] = {}


def register_metric(name: str, *, needs_data: bool = True, needs_labels: bool = True,
                    uses_context: bool = False):
  """Decorator registering ``fn(job) -> (scores, info)`` as metric ``name``."""
  def decorator(fn):
    _METRICS[str(name)] = MetricSpec(str(name), fn, needs_data, needs_labels,
                                     uses_context)
    return fn
  return decorator


def available_metrics() -> List[str]:
  """Names of the registered metrics, default first."""
  return sorted(_METRICS, key=lambda n: (n != Metric.TASK_INTERACTION.value, n))


def get_metric(name) -> MetricSpec:
  """The registered `MetricSpec` for ``name`` (a string or `Metric`).

  >>> get_metric("weight_mse").needs_data
  False
  """
  key = name.value if isinstance(name, Metric) else name
  if not isinstance(key, str) or key not in _METRICS:
    raise InvalidInputError(
        f"Expected a sensitivity metric in {available_metrics()}. "
        f"Received: metric={name!r}")
  return _METRICS[key]


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class _Job:
  """Everything a metric needs, checked."""

  folded: Any  # float tf_keras model, BatchNorm folded
  layers: Tuple[str, ...]
  bits: Tuple[int, ...]
  x: Optional[np.ndarray]
  y: Optional[np.ndarray]
  from_logits: bool
  context: Optional[Dict[str, int]]
  activation_bits: int
  layer_activation_bits: Dict[str, int]
  batch_size: int
  seed: int
  progress: bool
  default_activation_bits: int = 8
  labels: Optional[str] = None  # "given", "float model argmax" or None
  reuse_prefix: bool = True
  evaluator: Optional["_Evaluator"] = None
  objective: str = DEFAULT_OBJECTIVE
  x_calib: Optional[np.ndarray] = None  # range calibration part (None: x itself)
  x_all: Optional[np.ndarray] = None  # every sample (x and x_calib together)
  y_all: Optional[np.ndarray] = None
  holdout: Optional[Dict[str, Any]] = None
  clean: bool = True


def _check_bits(weight_bits) -> Tuple[int, ...]:
  try:
    bits = list(weight_bits)
  except TypeError:
    raise InvalidInputError(
        f"Expected weight_bits as a sequence of ints in {MIN_WEIGHT_BITS}.."
        f"{MAX_WEIGHT_BITS}, such as (2, 4, 8). Received: weight_bits={weight_bits!r}"
    ) from None
  for b in bits:
    if (isinstance(b, bool) or not isinstance(b, (int, np.integer))
        or not MIN_WEIGHT_BITS <= int(b) <= MAX_WEIGHT_BITS):
      raise InvalidInputError(
          f"Expected candidate weight bits in {MIN_WEIGHT_BITS}..{MAX_WEIGHT_BITS}, "
          f"such as (2, 4, 8). Received: weight_bits={tuple(weight_bits)!r}")
  if not bits or len(set(int(b) for b in bits)) != len(bits):
    raise InvalidInputError(
        f"Expected distinct candidate weight bits. Received: weight_bits={weight_bits!r}")
  return tuple(sorted(int(b) for b in bits))


def _fold(model):
  """Checks the model (`keras_mpq.model_io.check_model`); folds BatchNorm if it has any."""
  from keras_mpq import model_io  # pylint: disable=g-import-not-at-top
  model_io.check_model(model)
  if any(isinstance(l, keras.layers.BatchNormalization) for l in model.layers):
    return apply_lib.fold_batchnorm(model)
  return model


def _split_data(data) -> Tuple[Any, Any]:
  if data is None:
    return None, None
  if isinstance(data, (tuple, list)):
    if len(data) != 2:
      raise InvalidInputError(
          "Expected data as (x, y) or an array x. Received: a sequence of "
          f"{len(data)} items")
    return data[0], data[1]
  return data, None


def _check_labels(y, n: int, num_classes: int) -> np.ndarray:
  try:
    y = np.asarray(y)
  except (TypeError, ValueError) as e:
    raise InvalidInputError(f"Expected labels as a numeric array. Received: {e}") from None
  if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
    y = np.argmax(y, axis=1)  # one-hot
  elif y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1 or len(y) != n:
    raise InvalidInputError(
        f"Expected labels of shape ({n},) (class indices) or ({n}, {num_classes}) "
        f"(one-hot). Received: shape {y.shape}")
  if not np.issubdtype(y.dtype, np.number):
    raise InvalidInputError(
        f"Expected integer class labels. Received: labels of dtype {y.dtype}")
  bad = ~np.isfinite(y) | (y != np.round(y)) if y.size else np.zeros(0, bool)
  if np.any(bad):
    raise InvalidInputError(
        "Expected integer class labels. Received: non-integer values such as "
        f"{y[np.argmax(bad)]!r}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise InvalidInputError(
        f"Expected labels in 0..{num_classes - 1} (the model has {num_classes} "
        f"outputs). Received: labels in {int(y.min())}..{int(y.max())}")
  return y.astype(np.int64)


def _outputs_are_probabilities(model, x) -> bool:
  """True when the model ends in a softmax (rows >= 0 summing to 1), else logits.

  A one-unit output (a binary classifier) is a sigmoid probability when it
  lies in [0, 1], else its logit.
  """
  out = np.asarray(model(x[:64], training=False), dtype=np.float64)
  in_unit = bool(np.all(out >= 0) and np.all(out <= 1 + 1e-6))
  if out.ndim == 2 and out.shape[1] == 1:
    return in_unit
  return in_unit and bool(np.allclose(out.sum(axis=1), 1.0, atol=1e-3))


def num_classes_of(model) -> int:
  """Classes of a classifier's output: its units, or 2 for one sigmoid/logit unit."""
  return max(2, int(model.outputs[0].shape[-1]))


def to_log_probs(out, from_logits: bool):
  """``(batch, classes)`` log-probabilities of a classifier output (a tensor).

  Softmax probabilities or logits over classes; one unit is a binary
  classifier's sigmoid probability (or logit) of class 1, so it becomes two
  columns, ``log(1 - p)`` and ``log(p)``.
  """
  out = tf.cast(out, tf.float32)
  if out.shape[-1] == 1:
    if from_logits:
      return tf.concat([tf.math.log_sigmoid(-out), tf.math.log_sigmoid(out)], axis=-1)
    p = tf.clip_by_value(out, 1e-12, 1.0 - 1e-7)
    return tf.concat([tf.math.log(1.0 - p), tf.math.log(p)], axis=-1)
  if from_logits:
    return tf.nn.log_softmax(out, axis=-1)
  return tf.math.log(tf.clip_by_value(out, 1e-12, 1.0))


def predicted_labels(model, x: np.ndarray, from_logits: bool,
                     batch_size: int = 128) -> np.ndarray:
  """The float model's class for each input (argmax; for one unit: p > 0.5)."""
  out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
  if out.ndim == 2 and out.shape[1] == 1:
    return (out[:, 0] > (0.0 if from_logits else 0.5)).astype(np.int64)
  return np.argmax(out, axis=-1).astype(np.int64)


def _check_context(context, layers: Sequence[str], bits: Tuple[int, ...]
                   ) -> Tuple[Optional[Dict[str, int]], Optional[QuantizationPlan]]:
  if context is None:
    return None, None
  plan = None
  if isinstance(context, QuantizationPlan):
    plan, given = context, dict(context.weight_bits)
  elif isinstance(context, Mapping):
    given = dict(context)
  else:
    raise InvalidInputError(
        "Expected context as a QuantizationPlan or a mapping layer -> bits. "
        f"Received: {type(context).__name__}")
  unknown = sorted(set(map(str, given)) - set(layers))
  if unknown:
    raise InvalidInputError(
        f"Expected context layers among the model's quantizable layers {list(layers)}. "
        f"Received unknown layers: {unknown}")
  full = {name: max(bits) for name in layers}
  for name, b in given.items():
    full[str(name)] = check_weight_bits(b, f"context[{name!r}]")
  return full, plan


def _show_progress(progress) -> bool:
  if progress is None:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())
  return bool(progress)


def _prepare(model, data, weight_bits, spec: MetricSpec, context, activation_bits,
             batch_size, seed, progress) -> _Job:
  bits = _check_bits(weight_bits)
  activation_bits = check_activation_bits(activation_bits)
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
      batch_size < 1):
    raise InvalidInputError(
        f"Expected a positive integer batch_size. Received: batch_size={batch_size!r}")
  folded = _fold(model)
  layers = tuple(apply_lib.plan_layers(folded))
  ctx, ctx_plan = _check_context(context, layers, bits)
  if ctx is not None and not spec.uses_context:
    raise InvalidInputError(
        f"Metric {spec.name!r} measures every layer against the float model and takes "
        f"no context. Received: context={context!r}. Use metric='task_interaction' "
        "for a context, or pass context=None.")
  layer_act = {name: activation_bits for name in layers}
  default_act = activation_bits
  if ctx_plan is not None:
    default_act = ctx_plan.default_activation_bits
    layer_act = {name: ctx_plan.act_bits(name) for name in layers}
  x_raw, y_raw = _split_data(data)
  x = y = None
  labels = None
  from_logits = True
  if spec.needs_data:
    if x_raw is None:
      raise InvalidInputError(
          f"Metric {spec.name!r} needs data. Expected data=(x, y) or data=x with x of "
          f"shape (N, {', '.join(str(d) for d in folded.inputs[0].shape[1:])}). "
          "Received: data=None. Use keras_mpq.synthesize(model) when you have none.")
    x = apply_lib.check_data(folded, x_raw, "data")
    from_logits = not _outputs_are_probabilities(folded, x)
    num_classes = num_classes_of(folded)
    if y_raw is not None:
      y, labels = _check_labels(y_raw, len(x), num_classes), "given"
    elif spec.needs_labels:
      y = predicted_labels(folded, x, from_logits, batch_size)
      labels = "float model argmax"
  job = _Job(folded, layers, bits, x, y, from_logits, ctx, activation_bits, layer_act,
             int(batch_size), int(seed), _show_progress(progress), default_act, labels)
  job.x_all, job.y_all = x, y
  return job


def _check_objective(objective) -> str:
  if objective is None:
    return DEFAULT_OBJECTIVE
  if objective not in _OBJECTIVES:
    raise InvalidInputError(
        f"Expected objective in {list(OBJECTIVES)} (or None for {DEFAULT_OBJECTIVE!r}). "
        f"Received: objective={objective!r}")
  return str(objective)


def split_holdout(n: int, holdout: float = HOLDOUT, seed: int = 0
                  ) -> Tuple[Optional[np.ndarray], np.ndarray, Dict[str, Any]]:
  """Indices ``(calibration, held_out, info)`` of a data set of ``n`` samples.

  Activation ranges are calibrated on the first part and losses measured on
  the held-out part, so a measured loss is not fitted to its own samples.
  Each part needs `MIN_HOLDOUT_SAMPLES` (32), so the split needs at least 64
  samples; with fewer (or ``holdout=0``) nothing is held out: ``calibration``
  is None, every sample serves both, and ``info["note"]`` says so.

  >>> cal, held, info = split_holdout(256)
  >>> len(cal), len(held), info["held_out"]
  (128, 128, 128)
  >>> split_holdout(40)[2]["held_out"]
  0
  """
  if isinstance(holdout, bool) or not isinstance(holdout, (int, float, np.floating)) or not (
      0.0 <= float(holdout) < 1.0):
    raise InvalidInputError(
        f"Expected holdout as a share in [0, 1), such as 0.5. Received: holdout={holdout!r}")
  held = int(round(n * float(holdout)))
  if holdout == 0 or held < MIN_HOLDOUT_SAMPLES or n - held < MIN_HOLDOUT_SAMPLES:
    note = ("nothing held out: " + ("holdout=0" if holdout == 0 else
            f"{n} samples are fewer than the {2 * MIN_HOLDOUT_SAMPLES} a held-out part "
            f"needs ({MIN_HOLDOUT_SAMPLES} to calibrate ranges, {MIN_HOLDOUT_SAMPLES} "
            "to measure); losses are measured on the calibration samples"))
    return None, np.arange(n), {"samples": n, "held_out": 0, "calibration": n,
                                "note": note}
  order = np.random.default_rng(seed).permutation(n)
  return (np.sort(order[held:]), np.sort(order[:held]),
          {"samples": n, "held_out": held, "calibration": n - held})


def _apply_holdout(job: _Job, holdout: float) -> None:
  if job.x is None:
    return
  cal, held, info = split_holdout(len(job.x_all), holdout, job.seed)
  job.holdout = info
  if cal is not None:
    job.x_calib = job.x_all[cal]
    job.x = job.x_all[held]
    job.y = None if job.y_all is None else job.y_all[held]


# --------------------------------------------------------------------------- evaluator


def _batches(n: int, batch_size: int) -> Iterator[slice]:
  for start in range(0, n, batch_size):
    yield slice(start, min(n, start + batch_size))


def _cross_entropy(log_probs: np.ndarray, y: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """Per-sample cross-entropy against the labels ``y`` (``ref`` unused)."""
  del ref
  return -log_probs[np.arange(len(y)), y].astype(np.float64)


def _kl(log_probs: np.ndarray, y: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """Per-sample ``KL(float || model)``; ``ref`` holds the float model's log-probabilities."""
  del y
  ref = ref.astype(np.float64)
  return np.sum(np.exp(ref) * (ref - log_probs.astype(np.float64)), axis=-1)


_OBJECTIVES = {"cross_entropy": _cross_entropy, "kl": _kl}
OBJECTIVES = tuple(_OBJECTIVES)
"""Task-loss objectives: ``cross_entropy`` against the labels, ``kl`` from the float model."""


class _Evaluator:
  """One tfmot-quantized model, two compiled functions, and the (layer, bits) loop.

  The model is quantized once; contexts and (layer, bits) pairs are variable
  assignments. The graph is split at tensors that cut it (``c_1 .. c_K``,
  each the input of a weight layer, in model order) into segments
  ``input -> c_1 -> ... -> c_K -> output``. Two compiled functions serve every
  evaluation:

  * ``prefix(x) -> [c_1, ..., c_K]``: the cut tensors at the context, once
    per batch;
  * ``evaluate(start, [h_0, ..., h_K]) -> log-probabilities``: runs the
    segments from ``start`` on (``h_start`` injected; the earlier segments
    sit in ``tf.cond`` branches that are not taken, so they cost nothing).

  A layer after cut ``c_k`` is evaluated with ``start = k`` for each of its
  bit-widths. Both functions have fixed input signatures and count their
  traces in ``traces`` (each must stay at 1: bits are variables, ``start`` a
  tensor).
  """

  def __init__(self, folded, layers: Sequence[str], x: np.ndarray, y: Optional[np.ndarray],
               from_logits: bool, batch_size: int, layer_activation_bits: Mapping[str, int],
               default_activation_bits: int = 8, x_calib: Optional[np.ndarray] = None):
    self.layers = tuple(layers)
    self.x, self.y = x, y  # what losses are measured on (the held-out part)
    self.x_calib = x if x_calib is None else x_calib  # what activation ranges see
    self._float_ref: Optional[List[np.ndarray]] = None
    self.last_stderr: Optional[np.ndarray] = None
    self.from_logits = from_logits
    self.batch_size = batch_size
    build_plan = QuantizationPlan({n: FLOAT_BITS for n in self.layers},
                                  dict(layer_activation_bits), default_activation_bits)
    self.qmodel = apply_lib.quantize_model(folded, build_plan)
    wrapper_type = tfmot.quantization.keras.QuantizeWrapper
    self.wrappers = {l.layer.name: l for l in self.qmodel.layers
                     if isinstance(l, wrapper_type)}
    self.traces: Dict[str, int] = collections.Counter()
    self.context: Dict[str, int] = {n: FLOAT_BITS for n in self.layers}
    self.activations = False
    self.evaluations = 0  # passes over the data (the part after a cut counts as one)
    self.batch_calls = 0
    self._layer_start: Dict[str, int] = {}
    self._cut_names: List[str] = []  # layer whose input is c_k, k = 1..K
    self._segments: List[Any] = []
    self._cuts_for_reuse: Optional[bool] = None
    self._prefix_fn = None
    self._evaluate_fn = None
    self._dummies: List[tf.Tensor] = []
    apply_lib.set_activation_quantization(self.qmodel, False)
    # Each (layer, bits) is measured with the weights apply_plan would give it
    # (apply_lib.DEFAULT_WEIGHT_METHOD): kernel and bias swapped in, no retrace.
    self.bank = apply_lib.WeightBank(self.qmodel, self.x_calib, batch_size=batch_size) \
        if x is not None else None

  def _set_bits(self, bits: Mapping[str, int]) -> None:
    if self.bank is not None:
      self.bank.set_weight_bits(bits)
    else:
      apply_lib.set_weight_bits(self.qmodel, bits)

  # --- graph cuts and segments

  def _split(self, reuse_prefix: bool) -> None:
    """Finds the cut tensors and builds the segments and both compiled functions."""
    if self._cuts_for_reuse is not None:
      if self._cuts_for_reuse != reuse_prefix:
        raise ValueError("An evaluator is split once; make a new one to change reuse.")
      return
    qmodel = self.qmodel
    model_input_ids = {id(t) for t in qmodel.inputs}
    cut_tensors: List[Any] = []
    suffix_layers: List[set] = []
    start: Dict[str, int] = {}
    for name in self.layers:
      wrapper = self.wrappers[name]
      t = wrapper.input
      k = len(cut_tensors)
      if (reuse_prefix and not isinstance(t, (list, tuple)) and id(t) not in model_input_ids):
        known = [j for j, c in enumerate(cut_tensors, start=1) if c is t]
        if known:  # several layers read the same cut tensor
          start[name] = known[0]
          continue
        after = _layers_after(qmodel, t)  # None: not a cut
        if after is not None and id(wrapper) in after:
          cut_tensors.append(t)
          suffix_layers.append(after)
          self._cut_names.append(name)
          start[name] = k + 1
          continue
      # Not a cut: the latest cut before it, if the layer lies after it.
      start[name] = k if k and id(wrapper) in suffix_layers[-1] else 0
    # Segments between consecutive cuts; a cut that does not follow from the
    # previous one (not expected for true cuts) is dropped.
    bounds = [qmodel.inputs[0]]
    segments = []
    kept = [0]
    for k, t in enumerate(cut_tensors, start=1):
      try:
        seg = keras.Model(bounds[-1], t)
      except (ValueError, TypeError, KeyError):
        continue
      segments.append(seg)
      bounds.append(t)
      kept.append(k)
    segments.append(keras.Model(bounds[-1], qmodel.outputs[0]))
    renumber = {old: new for new, old in enumerate(kept)}
    self._layer_start = {n: renumber.get(s, 0) for n, s in start.items()}
    self._cut_names = [self._cut_names[k - 1] for k in kept[1:]]
    self._segments = segments
    self._cuts_for_reuse = reuse_prefix
    self._compile(bounds)

  def _compile(self, bounds) -> None:
    traces, segments = self.traces, self._segments
    shapes = [tuple(t.shape[1:]) for t in bounds]
    self._dummies = [tf.zeros((0,) + tuple(1 if d is None else d for d in s)) for s in shapes]
    out_shapes = shapes[1:]
    to_log_probs = self._log_probs

    def evaluate(start, hs):
      traces["evaluate"] += 1  # Python side: runs once per trace, never per call
      h = hs[0]
      for k, seg in enumerate(segments):
        if k:
          h = tf.cond(tf.equal(start, k), lambda k=k: hs[k], lambda h=h: h)
        if k < len(out_shapes):
          dummy = self._dummies[k + 1]
          h = tf.cond(start <= k, lambda seg=seg, h=h: seg(h, training=False),
                      lambda dummy=dummy: dummy)
        else:
          h = seg(h, training=False)
      return to_log_probs(h)

    specs = [tf.TensorSpec((None,) + s, tf.float32) for s in shapes]
    self._evaluate_fn = tf.function(
        evaluate, input_signature=[tf.TensorSpec((), tf.int32), specs])
    prefix_model = keras.Model(self.qmodel.inputs, list(bounds[1:]) + list(self.qmodel.outputs))

    def prefix(x):
      traces["prefix"] += 1
      outs = prefix_model(x, training=False)
      outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
      return outs[:-1], to_log_probs(outs[-1])

    self._prefix_fn = tf.function(prefix, input_signature=[specs[0]])

  def _log_probs(self, out):
    return to_log_probs(out, self.from_logits)

  def prefix(self, xb) -> Tuple[List[Any], np.ndarray]:
    """The cut tensors and the output log-probabilities of one batch, at the context."""
    self.batch_calls += 1
    cuts, log_probs = self._prefix_fn(xb)
    return cuts, log_probs.numpy()

  def _inputs(self, start: int, xb, cut_values) -> List[Any]:
    hs = list(self._dummies)
    if start == 0:
      hs[0] = xb
    else:
      hs[start] = cut_values[start - 1]
    return hs

  def run(self, start: int, hs) -> np.ndarray:
    self.batch_calls += 1
    return self._evaluate_fn(tf.constant(start, tf.int32), hs).numpy()

  def concrete_function_counts(self) -> Dict[str, int]:
    fns = {"evaluate": self._evaluate_fn, "prefix": self._prefix_fn}
    return {k: int(f.experimental_get_tracing_count()) for k, f in fns.items()
            if f is not None}

  # --- contexts

  def set_context(self, bits: Mapping[str, int], activations: bool) -> None:
    """Sets every layer's bits; calibrates activation ranges when they are quantized."""
    self._set_bits(bits)
    self.context = {n: int(bits[n]) for n in self.layers}
    if activations:
      apply_lib.calibrate(self.qmodel, self.x_calib, batch_size=self.batch_size)
    else:
      apply_lib.set_activation_quantization(self.qmodel, False)
    self.activations = activations

  def loss(self, reuse_prefix: bool = True) -> float:
    """Mean cross-entropy of the model as it stands, over the data."""
    self._split(reuse_prefix)
    return self.mean_objective("cross_entropy", reuse_prefix)

  def mean_objective(self, objective: str, reuse_prefix: bool = True) -> float:
    """Mean of ``objective`` (see `OBJECTIVES`) of the model as it stands, over the data."""
    return float(np.mean(self.sample_objective(objective, reuse_prefix)))

  def sample_objective(self, objective: str, reuse_prefix: bool = True) -> np.ndarray:
    """``objective`` of the model as it stands, one value per sample (float64)."""
    self._split(reuse_prefix)
    objective_fn = _OBJECTIVES[objective]
    refs = self.float_reference(reuse_prefix) if objective == "kl" else None
    rows = []
    for k, s in enumerate(_batches(len(self.x), self.batch_size)):
      out = self.prefix(tf.constant(self.x[s]))[1]
      rows.append(np.asarray(objective_fn(out, None if self.y is None else self.y[s],
                                          None if refs is None else refs[k]),
                             dtype=np.float64))
    self.evaluations += 1
    return np.concatenate(rows)

  def float_reference(self, reuse_prefix: bool = True) -> List[np.ndarray]:
    """The float model's log-probabilities per batch (computed once; the context is kept)."""
    if self._float_ref is None:
      self._split(reuse_prefix)
      saved, acts = dict(self.context), self.activations
      self._set_bits({n: FLOAT_BITS for n in self.layers})
      apply_lib.set_activation_quantization(self.qmodel, False)
      try:
        self._float_ref = [self.prefix(tf.constant(self.x[s]))[1]
                           for s in _batches(len(self.x), self.batch_size)]
      finally:
        self._set_bits(saved)
        apply_lib.set_activation_quantization(self.qmodel, acts)
      self.evaluations += 1
    return self._float_ref

  def float_loss(self, reuse_prefix: bool = True) -> float:
    """Loss with every layer float and activations float; the context is restored."""
    saved, acts = dict(self.context), self.activations
    self._set_bits({n: FLOAT_BITS for n in self.layers})
    apply_lib.set_activation_quantization(self.qmodel, False)
    try:
      return self.loss(reuse_prefix)
    finally:
      self._set_bits(saved)
      apply_lib.set_activation_quantization(self.qmodel, acts)

  # --- the (layer, bits) loop

  def layer_scores(self, bits: Sequence[int], objective: str, reuse_prefix: bool = True,
                   progress: bool = False) -> Tuple[np.ndarray, float, Dict[str, bool],
                                                    Dict[str, Optional[str]]]:
    """Per (layer, b): (sum over data of objective at c[i<-b] - same at c) / N.

    Returns ``(scores, context_value, prefix_reuse, prefix_cut)``;
    ``context_value`` is the objective's mean at the context itself (the
    context loss for cross-entropy). A bit-width equal to the layer's context
    bits is not evaluated: its score is 0.
    The standard error of each score (from the per-sample
    differences, which pair every sample with itself at the context) is left
    in ``self.last_stderr``.
    """
    self._split(reuse_prefix)
    objective_fn = _OBJECTIVES[objective]
    groups: Dict[int, List[int]] = collections.OrderedDict()
    for i, name in enumerate(self.layers):
      groups.setdefault(self._layer_start[name], []).append(i)
    n = len(self.x)
    pairs = [(i, j) for i, name in enumerate(self.layers) for j, b in enumerate(bits)
             if b != self.context[name]]
    bar = _progress_bar(len(pairs) * len(range(0, n, self.batch_size)), progress,
                        f"sensitivity ({objective})")
    refs = self.float_reference(reuse_prefix) if objective == "kl" else None
    base = 0.0
    totals = np.zeros((len(self.layers), len(bits)))
    squares = np.zeros((len(self.layers), len(bits)))
    try:
      for k, s in enumerate(_batches(n, self.batch_size)):
        xb = tf.constant(self.x[s])
        yb = self.y[s] if self.y is not None else None
        cut_values, out = self.prefix(xb)  # cuts and output at the context
        ref = out if refs is None else refs[k]
        ref_rows = objective_fn(out, yb, ref)
        base += float(np.sum(ref_rows))
        for start, idxs in groups.items():
          hs = self._inputs(start, xb, cut_values)
          for i in idxs:
            name, ctx_bits = self.layers[i], self.context[self.layers[i]]
            try:
              for j, b in enumerate(bits):
                if b == ctx_bits:
                  continue
                self._set_bits({name: b})
                diff = objective_fn(self.run(start, hs), yb, ref) - ref_rows
                totals[i, j] += float(np.sum(diff))
                squares[i, j] += float(np.sum(diff * diff))
                if bar is not None:
                  bar.update(1)
            finally:
              self._set_bits({name: ctx_bits})
    finally:
      if bar is not None:
        bar.close()
    self.evaluations += 1 + len(pairs)
    cut_of = {name: (self._cut_names[self._layer_start[name] - 1]
                     if self._layer_start[name] else None) for name in self.layers}
    reuse = {name: cut is not None for name, cut in cut_of.items()}
    mean = totals / n
    with np.errstate(invalid="ignore", over="ignore"):
      var = np.maximum(squares / n - mean * mean, 0.0) * n / max(n - 1, 1)
      self.last_stderr = np.sqrt(var / n)
    return mean, base / n, reuse, cut_of


def _layers_after(qmodel, t) -> Optional[set]:
  """Ids of the layers between tensor ``t`` and the outputs if ``t`` cuts the graph, else None.

  What ``keras.Model(t, qmodel.outputs).layers`` holds (and the 'Graph
  disconnected' error for a tensor that does not cut), found by walking the
  graph back from the outputs, stopping at ``t``: a walk of the node graph,
  where building that Model for each of a large model's layers took minutes.
  """
  try:
    inputs = {id(x) for x in qmodel.inputs}
    seen, layers, stack = set(), set(), list(qmodel.outputs)
    while stack:
      tensor = stack.pop()
      if tensor is t or id(tensor) in seen:
        continue
      seen.add(id(tensor))
      if id(tensor) in inputs:
        return None  # the input reaches the outputs around t: not a cut
      history = tensor._keras_history  # pylint: disable=protected-access
      layers.add(id(history.layer))
      stack.extend(history.layer._inbound_nodes[history.node_index].keras_inputs)  # pylint: disable=protected-access
    return layers
  except (AttributeError, IndexError, TypeError):  # not a tf_keras graph: build the Model
    try:
      return {id(l) for l in keras.Model(t, qmodel.outputs).layers}
    except (ValueError, TypeError, KeyError):  # 'Graph disconnected': not a cut
      return None


def _progress_bar(total: int, show: bool, desc: str):
  if not show or total <= 0:
    return None
  from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
  return tqdm_auto.tqdm(total=total, desc=desc, leave=False)


def _evaluator_for(job: _Job) -> _Evaluator:
  if job.evaluator is None:
    job.evaluator = _Evaluator(job.folded, job.layers, job.x, job.y, job.from_logits,
                               job.batch_size, job.layer_activation_bits,
                               job.default_activation_bits, x_calib=job.x_calib)
  return job.evaluator


def _task_metric(job: _Job, context: Mapping[str, int], activations: bool,
                 objective: str) -> Tuple[np.ndarray, Dict[str, Any]]:
  ev = _evaluator_for(job)
  traces_before = dict(ev.traces)
  evals_before = ev.evaluations
  t0 = time.perf_counter()
  ev.set_context(context, activations)
  t_calib = time.perf_counter() - t0
  scores, context_value, reuse, cuts = ev.layer_scores(job.bits, objective,
                                                       job.reuse_prefix, job.progress)
  stderr = ev.last_stderr
  is_float = not activations and all(b == FLOAT_BITS for b in context.values())
  context_loss = float_loss = None
  if objective == "cross_entropy":
    context_loss = context_value
  elif job.y is not None:
    context_loss = ev.loss(job.reuse_prefix)
  if job.y is not None:
    float_loss = context_loss if is_float else ev.float_loss(job.reuse_prefix)
  info = {
      "context": dict(context),
      "activations_quantized": activations,
      "objective": objective,
      "context_objective": context_value,
      "stderr": stderr,
      "context_loss": context_loss,
      "float_loss": float_loss,
      "evaluations": ev.evaluations - evals_before,
      "pair_evaluations": sum(1 for n in job.layers for b in job.bits if b != context[n]),
      "prefix_reuse": reuse,
      "prefix_cut": cuts,
      "calibration_seconds": round(t_calib, 4),
      "traces": dict(ev.traces),
      "new_traces": {k: v - traces_before.get(k, 0) for k, v in ev.traces.items()
                     if v - traces_before.get(k, 0)},
      "concrete_functions": ev.concrete_function_counts(),
  }
  return scores, info


# --------------------------------------------------------------------------- metrics


@register_metric(Metric.TASK_INTERACTION.value, uses_context=True)
def _task_interaction(job: _Job):
  context = job.context or {n: max(job.bits) for n in job.layers}
  return _task_metric(job, context, True, job.objective)


@register_metric(Metric.TASK_FLOAT_CONTEXT.value)
def _task_float_context(job: _Job):
  return _task_metric(job, {n: FLOAT_BITS for n in job.layers}, False, job.objective)


@register_metric(Metric.ZEROQ_KL.value, needs_labels=False)
def _zeroq_kl(job: _Job):
  return _task_metric(job, {n: FLOAT_BITS for n in job.layers}, False, "kl")


def _kernels(folded, name: str) -> List[Tuple[Any, Tuple[int, ...]]]:
  layer = folded.get_layer(name)
  return [(getattr(layer, attr), axes) for attr, axes in quantizers.weight_spec(layer)]


def _quantization_error(folded, name: str, bits: int) -> Tuple[float, float, int]:
  """(||Q_b(W) - W||^2, ||W||^2, n) summed over the layer's kernels."""
  return quantizers.quantization_error(
      [(var.numpy(), axes) for var, axes in _kernels(folded, name)], bits)


@register_metric(Metric.WEIGHT_MSE.value, needs_data=False, needs_labels=False)
def _weight_mse(job: _Job):
  scores = np.zeros((len(job.layers), len(job.bits)))
  for i, name in enumerate(job.layers):
    for j, b in enumerate(job.bits):
      err, norm, _ = _quantization_error(job.folded, name, b)
      scores[i, j] = err / norm if norm > 0 else 0.0
  return scores, {}


def hessian_traces(folded, x: np.ndarray, y: np.ndarray, layers: Sequence[str],
                   from_logits: bool = True, probes: int = HUTCHINSON_PROBES,
                   batch_size: int = 128, seed: int = 0) -> Dict[str, float]:
  """Hutchinson estimates of each layer's Hessian trace of the mean task loss.

  ``Tr(H_ii) = E[v_i^T (H v)_i]`` for Rademacher ``v`` over all layers'
  kernels at once, so one Hessian-vector product per probe (nested
  ``GradientTape``s, compiled once) serves every layer.

  >>> hessian_traces(model, x, y, ["conv1"], probes=4)  # doctest: +SKIP
  {'conv1': 12.3}
  """
  variables, owner = [], []
  for name in layers:
    for var, _ in _kernels(folded, name):
      variables.append(var)
      owner.append(name)
  rng = np.random.default_rng(seed)
  n = len(x)

  def body(xb, yb, *vs):
    with tf.GradientTape() as outer:
      outer.watch(variables)
      with tf.GradientTape() as inner:
        inner.watch(variables)
        out = folded(xb, training=False)
        if out.shape[-1] == 1:  # binary: two-column log-probabilities
          log_probs = to_log_probs(out, from_logits)
          loss = -tf.reduce_sum(tf.gather(log_probs, yb, axis=1, batch_dims=1))
        else:
          loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
              yb, out, from_logits=from_logits))
      grads = inner.gradient(loss, variables)
      gv = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vs)])
    hv = outer.gradient(gv, variables)
    return [tf.reduce_sum(v * h) for v, h in zip(vs, hv)]

  signature = ([tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32),
                tf.TensorSpec((None,), tf.int64)]
               + [tf.TensorSpec(v.shape, tf.float32) for v in variables])
  hvp = tf.function(body, input_signature=signature)
  traces = {name: 0.0 for name in layers}
  for _ in range(int(probes)):
    vs = [tf.constant(rng.choice(np.array([-1.0, 1.0], np.float32), size=v.shape))
          for v in variables]
    for s in _batches(n, batch_size):
      parts = hvp(tf.constant(x[s]), tf.constant(y[s]), *vs)
      for name, part in zip(owner, parts):
        traces[name] += float(part.numpy()) / n / probes
  return traces


@register_metric(Metric.HESSIAN_TRACE.value)
def _hessian_trace(job: _Job):
  traces = hessian_traces(job.folded, job.x_all, job.y_all, job.layers, job.from_logits,
                          HUTCHINSON_PROBES, job.batch_size, job.seed)
  scores = np.zeros((len(job.layers), len(job.bits)))
  for i, name in enumerate(job.layers):
    for j, b in enumerate(job.bits):
      err, _, count = _quantization_error(job.folded, name, b)
      scores[i, j] = traces[name] / count * err
  return scores, {"hessian_trace": traces, "probes": HUTCHINSON_PROBES,
                  "evaluations": HUTCHINSON_PROBES}


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
                        holdout: float = HOLDOUT, clean: bool = True) -> SensitivityTable:
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
      ``"kl"`` (divergence from the float model's soft outputs, the default)
      or ``"cross_entropy"`` (against the labels).
    holdout: share of ``data`` held out from range calibration; losses are
      measured on it (`split_holdout`: needs >= 64 samples, else nothing is
      held out and ``info["holdout"]["note"]`` says so).
    clean: pass the scores through `respect_known` (monotone in bits, noise
      counted as zero, NaN/Inf as a penalty); the measured scores stay in
      ``info["raw_scores"]``.

  Returns:
    A `SensitivityTable` (rows in model order, columns ascending bits). Its
    ``info`` holds the context and float losses, the number of evaluations,
    wall seconds, per-layer prefix reuse, and the compiled functions' trace
    counts.

  Example:

  >>> import numpy as np
  >>> from keras_mpq.compat import keras
  >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
  >>> table = measure_sensitivity(model, None, metric="weight_mse")
  >>> table.layers, table.bits, bool(table.score("fc", 2) > table.score("fc", 8))
  (('fc',), (2, 4, 8), True)
  """
  spec = get_metric(metric)
  objective = _check_objective(objective)
  job = _prepare(model, data, weight_bits, spec, context, activation_bits, batch_size,
                 seed, progress)
  job.reuse_prefix = bool(reuse_prefix)
  job.objective = objective
  job.clean = bool(clean)
  _apply_holdout(job, holdout)
  return _measure(job, spec)


def _measure(job: _Job, spec: MetricSpec) -> SensitivityTable:
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
               "num_samples": 0 if job.x_all is None else int(len(job.x_all)),
               "holdout": job.holdout,
               "labels": job.labels,
               "seed": job.seed, "batch_size": job.batch_size})
  info.setdefault("evaluations", 0)
  return SensitivityTable(job.layers, job.bits, scores, spec.name, to_jsonable(info))


def budget_context(bits: Sequence[int], layers: Sequence[str], budget, costs: CostTable,
                   pinned: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
  """The highest uniform plan that fits ``budget`` (pinned layers as pinned).

  The context at the budget for ``search(context="budget")``: for a 4.5-bit
  average and candidates (2, 4, 8), every layer at 4 bits.

  >>> from keras_mpq.types import CostTable
  >>> costs = CostTable(("a", "b"), (2, 4, 8), {"avg_bits": np.array([[1, 2, 4]] * 2)})
  >>> budget_context((2, 4, 8), ("a", "b"), "4.5bit", costs)
  {'a': 4, 'b': 4}
  """
  budget = Budget.parse(budget)
  pinned = dict(pinned or {})
  for b in sorted(bits, reverse=True):
    plan = QuantizationPlan({n: int(pinned.get(n, b)) for n in layers})
    if budget.is_satisfied_by(plan, costs):
      return dict(plan.weight_bits)
  return {n: int(pinned.get(n, min(bits))) for n in layers}


CONTEXTS = ("highest", "budget")
"""Named first contexts of `search`: every other layer at the highest bits, or at the budget."""


def search(model, data, budget, weight_bits: Sequence[int] = (2, 4, 8), rounds: int = 3,
           metric: str = "task_interaction", pinned: Optional[Mapping[str, int]] = None,
           costs: Optional[CostTable] = None, seed: int = 0, activation_bits: int = 8,
           batch_size: int = 128, progress: Optional[bool] = None, *,
           objective: Optional[str] = None, context="highest", holdout: float = HOLDOUT,
           safeguard: bool = True, table: Optional[SensitivityTable] = None
           ) -> SearchResult:
  """Sensitivity, allocation, re-measurement in rounds, and a measured safeguard.

  Round 0 measures ``metric`` in the first context and allocates
  (`keras_mpq.allocation.allocate`, exact, on scores cleaned by
  `respect_known`); each plan's loss ``L(plan)`` (``objective``) is measured
  on the held-out part of ``data`` with activation ranges calibrated on the
  rest. Round ``k`` re-measures with the context set to round ``k-1``'s plan
  and re-allocates. It stops when the plan no longer changes, or after
  ``rounds``, or when a plan comes back from an earlier round; metrics
  without a context stop after round 0. The allocated plan is the round
  with the lowest measured loss among those that meet the budget.

  The safeguard (``safeguard=True``) then measures, the same way, every
  uniform plan that fits the budget (pinned layers as pinned) and one greedy
  plan (`keras_mpq.allocation.greedy`) and returns the best measured of all,
  ties going to more bits (a candidate within two standard errors of the
  lowest loss that has at least its bits in every layer wins;
  ``selection["tie_break"]`` says so); ``plan.info["selection"]`` names the
  winner, every candidate's measured loss and the margins. When every
  cleaned score is zero (no layer measured worse than its highest bits beyond
  the noise) the scores carry no information: the best measured uniform plan
  that fits is returned, with a note (also without the safeguard).

  Args:
    model: float tf_keras classifier (BatchNorm folded here).
    data: ``(x, y)`` or ``x`` (labelled by the float model's argmax).
    budget: a `Budget` or a string `Budget.parse` takes (``"4bit"``, ``"48KB"``).
    weight_bits: candidate bits, each in 2..8.
    rounds: at most this many measure-allocate rounds (>= 1).
    metric: a registered metric name.
    pinned: ``{layer: bits}`` fixed before allocation.
    costs: a `CostTable` (default: `keras_mpq.costs.cost_table` of the model).
    seed, activation_bits, batch_size, progress: as in `measure_sensitivity`.
    objective: ``"kl"`` or ``"cross_entropy"`` (as in `measure_sensitivity`);
      also what plans are measured by.
    context: first context of a context metric: ``"highest"`` (every other
      layer at the highest candidate bits), ``"budget"`` (at the highest
      uniform bits that fit the budget, `budget_context`), or a plan /
      ``{layer: bits}``.
    holdout: share of ``data`` held out from range calibration (`split_holdout`).
    safeguard: compare the allocated plan with the uniform and greedy plans.
    table: a `SensitivityTable` already measured for this model, data and
      first context (same layers and bits): round 0 uses it instead of
      measuring again (sweeping budgets over one measurement).

  Returns:
    A `SearchResult`.

  Example:

  >>> found = search(model, (x, y), "4bit", rounds=3)  # doctest: +SKIP
  >>> found.plan.info["selection"]["winner"]  # doctest: +SKIP
  'allocated'
  """
  return search_budgets(model, data, [budget], weight_bits, rounds, metric, pinned, costs,
                        seed, activation_bits, batch_size, progress, objective=objective,
                        context=context, holdout=holdout, safeguard=safeguard,
                        table=table)[0]


def search_budgets(model, data, budgets: Sequence[Any], weight_bits: Sequence[int] = (2, 4, 8),
                   rounds: int = 3, metric: str = "task_interaction",
                   pinned: Optional[Mapping[str, int]] = None,
                   costs: Optional[CostTable] = None, seed: int = 0,
                   activation_bits: int = 8, batch_size: int = 128,
                   progress: Optional[bool] = None, *, objective: Optional[str] = None,
                   context="highest", holdout: float = HOLDOUT, safeguard: bool = True,
                   table: Optional[SensitivityTable] = None) -> List[SearchResult]:
  """`search` at each of ``budgets``, sharing one quantized model and every measurement.

  A sensitivity table measured in a context, and a plan's measured loss, are
  measured once and reused by every budget that needs them (a budget sweep
  over the default context measures the sensitivity once). Arguments as for
  `search`; returns one `SearchResult` per budget, in order.

  >>> results = search_budgets(model, (x, y), ["6bit", "4bit"])  # doctest: +SKIP
  """
  from keras_mpq import allocation  # pylint: disable=g-import-not-at-top
  from keras_mpq import costs as costs_lib  # pylint: disable=g-import-not-at-top
  spec = get_metric(metric)
  objective = _check_objective(objective)
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
    raise InvalidInputError(f"Expected rounds >= 1. Received: rounds={rounds!r}")
  budgets = [Budget.parse(b) for b in budgets]
  # Labels are needed to measure L(plan), whatever the metric.
  job = _prepare(model, data, weight_bits, get_metric(Metric.TASK_INTERACTION.value),
                 None, activation_bits, batch_size, seed, progress)
  job.objective = objective
  _apply_holdout(job, holdout)
  if costs is None:
    costs = costs_lib.cost_table(job.folded, bits=job.bits,
                                 activation_bits=job.activation_bits)
  elif not isinstance(costs, CostTable):
    raise InvalidInputError(
        f"Expected costs as a keras_mpq.CostTable. Received: {type(costs).__name__}")
  if isinstance(context, str):
    if context not in CONTEXTS:
      raise InvalidInputError(
          f"Expected context in {list(CONTEXTS)}, a QuantizationPlan or a mapping "
          f"layer -> bits. Received: context={context!r}")
    given_context = None
  else:
    given_context, _ = _check_context(context, job.layers, job.bits)
  if table is not None and (
      not isinstance(table, SensitivityTable) or table.layers != job.layers
      or table.bits != job.bits):
    raise InvalidInputError(
        f"Expected table as a SensitivityTable of layers {list(job.layers)} and bits "
        f"{list(job.bits)}. Received: "
        + (f"layers {list(table.layers)}, bits {list(table.bits)}"
           if isinstance(table, SensitivityTable) else type(table).__name__))
  evaluator = _evaluator_for(job)
  measured_cache: Dict[Tuple[int, ...], np.ndarray] = {}
  table_cache: Dict[Any, SensitivityTable] = {}

  def measure_samples(weight_bits_: Mapping[str, int]) -> np.ndarray:
    key = tuple(int(weight_bits_[n]) for n in job.layers)
    if key not in measured_cache:
      evaluator.set_context(weight_bits_, True)
      measured_cache[key] = evaluator.sample_objective(objective)
    return measured_cache[key]

  def table_at(context_k, k: int) -> SensitivityTable:
    if k == 0 and table is not None:
      return table
    key = None if context_k is None else tuple(int(context_k[n]) for n in job.layers)
    if key not in table_cache:
      job.context = context_k
      table_cache[key] = _measure(job, spec)
    return table_cache[key]

  results = []
  for budget in budgets:
    if context == "budget":
      first = budget_context(job.bits, job.layers, budget, costs, pinned)
    else:
      first = given_context
    if not spec.uses_context:
      first = None
    label = ("highest" if first is None else
             "budget" if context == "budget" else "given")
    results.append(_search_one(job, spec, budget, costs, pinned, rounds, first, table_at,
                               measure_samples, safeguard, evaluator, allocation, label))
  return results


def _search_one(job: _Job, spec: MetricSpec, budget: Budget, costs: CostTable, pinned,
                rounds: int, first, table_at, measure_samples, safeguard: bool, evaluator,
                allocation, context_label: str) -> SearchResult:
  """One budget of `search_budgets`: the rounds, then the safeguard."""
  def measure(weight_bits: Mapping[str, int]) -> float:
    return float(np.mean(measure_samples(weight_bits)))
  history: List[Dict[str, Any]] = []
  plans: List[QuantizationPlan] = []
  tables: List[SensitivityTable] = []
  table = None
  context_k = first
  for k in range(int(rounds)):
    t0 = time.perf_counter()
    table = table_at(context_k, k)
    tables.append(table)
    plan = allocation.allocate(table, budget, costs, pinned)
    measured = measure(plan.weight_bits)
    changed = not plans or plan.weight_bits != plans[-1].weight_bits
    seen = [p.weight_bits for p in plans]
    repeat_of = seen.index(plan.weight_bits) if plan.weight_bits in seen else None
    history.append({
        "round": k, "weight_bits": dict(plan.weight_bits),
        "context": dict(context_k) if context_k else "highest",
        "predicted": table.predicted(plan), "measured_loss": measured,
        "objective": job.objective,
        "cost": costs.plan_cost(plan, budget.kind), "budget": budget.to_dict(),
        "within_budget": budget.is_satisfied_by(plan, costs), "changed": changed,
        "repeat_of": repeat_of,
        "seconds": round(time.perf_counter() - t0, 3)})
    plans.append(plan)
    if repeat_of is not None or not spec.uses_context:
      break  # the plan no longer changes (or cycles back): more rounds repeat it
    context_k = dict(plan.weight_bits)
  ok = [r for r in history if r["within_budget"]]
  best = min(ok or history, key=lambda r: (r["measured_loss"], r["round"]))
  allocated = plans[best["round"]]
  all_zero = bool(np.all(tables[0].scores == 0))
  selection = _select(allocated, tables[0], budget, costs, pinned, job, measure_samples,
                      safeguard, all_zero)
  chosen = selection.pop("plan")
  info = dict(allocated.info)
  if selection["winner"] != "allocated":
    info.pop("note", None)
    info.update({"method": selection["winner"],
                 "achieved": {kind: costs.plan_cost(chosen, kind) for kind in costs.table},
                 "predicted_loss": tables[0].predicted(chosen)})
  info["search"] = {"round": best["round"], "measured_loss": best["measured_loss"],
                    "rounds": len(history), "metric": spec.name, "objective": job.objective,
                    "context": context_label, "holdout": job.holdout,
                    "traces": dict(evaluator.traces)}
  info["selection"] = selection
  chosen = QuantizationPlan(dict(chosen.weight_bits), info=to_jsonable(info))
  return SearchResult(chosen, table, tuple(to_jsonable(history)))


def _select(allocated: QuantizationPlan, table: SensitivityTable, budget: Budget,
            costs: CostTable, pinned, job: _Job, measure_samples, safeguard: bool,
            all_zero: bool, z: float = NOISE_Z) -> Dict[str, Any]:
  """The safeguard: the best measured of the allocated, uniform and greedy plans.

  Ties go to more bits: a candidate whose measured loss exceeds the lowest by
  no more than ``z`` standard errors of the per-sample difference (paired:
  the same held-out samples) cannot be told from the best; if it also has at
  least the best's bits in every layer, it wins (the costliest such one).
  Without this, a plan at the lowest bits could win on a difference at the
  level of rounding (an untrained model whose outputs barely move scores
  every plan alike). A mixed plan is not overruled by a uniform one that is
  merely costlier: neither has more bits everywhere, so the measurement
  decides.
  """
  from keras_mpq import allocation  # pylint: disable=g-import-not-at-top
  pinned = dict(pinned or {})
  candidates: List[Tuple[str, QuantizationPlan]] = []
  if not all_zero:
    candidates.append(("allocated", allocated))
  if safeguard or all_zero:
    for b in sorted(job.bits, reverse=True):
      plan = QuantizationPlan({n: int(pinned.get(n, b)) for n in job.layers})
      if budget.is_satisfied_by(plan, costs):
        candidates.append((f"uniform {b}-bit", plan))
  if safeguard and not all_zero:
    candidates.append(("greedy", allocation.greedy(table, budget, costs, pinned)))
  rows, seen = [], {}
  for rank, (name, plan) in enumerate(candidates):
    key = tuple(plan.weight_bits[n] for n in job.layers)
    if key in seen:
      seen[key]["also"].append(name)
      continue
    samples = measure_samples(plan.weight_bits)
    row = {"name": name, "also": [], "weight_bits": dict(plan.weight_bits),
           "cost": costs.plan_cost(plan, budget.kind),
           "measured_loss": float(np.mean(samples)),
           "predicted": table.predicted(plan), "_rank": rank, "_plan": plan,
           "_samples": samples}
    seen[key] = row
    rows.append(row)
  if not rows:  # cannot happen: the cheapest uniform plan fits any feasible budget
    rows = [{"name": "allocated", "also": [], "weight_bits": dict(allocated.weight_bits),
             "cost": costs.plan_cost(allocated, budget.kind),
             "measured_loss": float(np.mean(measure_samples(allocated.weight_bits))),
             "predicted": 0.0, "_rank": 0, "_plan": allocated}]
  finite = [r for r in rows if np.isfinite(r["measured_loss"])] or rows
  ranked = sorted(finite, key=lambda r: (r["measured_loss"], r["_rank"]))
  win, tie = _tie_to_more_bits(ranked, z)
  ranked = [win] + [r for r in ranked if r is not win]
  alloc_row = next((r for r in rows if "allocated" in [r["name"]] + r["also"]), None)
  out: Dict[str, Any] = {
      "winner": win["name"], "objective": job.objective,
      "measured_on": (f"{job.holdout['held_out']} held-out samples" if job.holdout
                      and job.holdout.get("held_out") else "the calibration samples"),
      "winner_loss": win["measured_loss"],
      "allocated_loss": None if alloc_row is None else alloc_row["measured_loss"],
      "gain_over_allocated": (None if alloc_row is None
                              else alloc_row["measured_loss"] - win["measured_loss"]),
      "runner_up": ranked[1]["name"] if len(ranked) > 1 else None,
      "margin": (ranked[1]["measured_loss"] - win["measured_loss"]
                 if len(ranked) > 1 else None),
      "candidates": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
      "safeguard": bool(safeguard), "plan": win["_plan"]}
  if tie is not None:
    out["tie_break"] = tie
  if all_zero:
    out["note"] = ("Every sensitivity score is zero within the measurement noise, so the "
                   "scores cannot rank layers: the plan is the best measured uniform plan "
                   "that fits the budget.")
  return out


def _tie_to_more_bits(ranked: List[Dict[str, Any]], z: float
                      ) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
  """The costliest candidate with at least the best's bits everywhere, within noise of it.

  ``ranked``: candidate rows sorted by measured loss, each with its
  ``weight_bits`` and per-sample losses (``_samples``). Returns
  ``(winner, tie_break)``; ``tie_break`` is ``None`` when the lowest-loss
  candidate wins, else what it was tied with.
  """
  best = ranked[0]
  base = best.get("_samples")
  if base is None or len(base) < 2:
    return best, None
  tied = []
  for r in ranked:
    if any(r["weight_bits"][n] < b for n, b in best["weight_bits"].items()):
      continue  # fewer bits somewhere: not "more bits" than the best
    d = np.asarray(r["_samples"], np.float64) - base
    mean = float(np.mean(d))
    se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
    if np.isfinite(mean) and np.isfinite(se) and mean <= z * se:
      tied.append((r, mean, se))
  win, mean, se = max(tied, key=lambda t: (t[0]["cost"], -t[0]["measured_loss"],
                                           -t[0]["_rank"]))
  if win is best:
    return best, None
  return win, {"rule": "more bits", "lowest_loss": best["name"],
               "loss_above_lowest": mean, "stderr": se, "noise_z": float(z),
               "tied": [t[0]["name"] for t in tied]}
