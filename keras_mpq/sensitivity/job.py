"""`Job`: what a sensitivity metric gets, checked (model, data, labels, bits, context, objective).

Plug-in metrics (`keras_mpq.register_metric`) receive a `Job`. `prepare`
builds one from the user's arguments; `split_holdout` sets aside the part of
the data the safeguard measures on.

>>> job = prepare(model, (x, y), (2, 4, 8), get_metric("zeroq_kl"), None, 8, 128, 0, False)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from keras_mpq.base import batching, choices
from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.progress import show_progress
from keras_mpq.base.types import (
  MAX_WEIGHT_BITS,
  MIN_WEIGHT_BITS,
  QuantizationPlan,
  check_activation_bits,
  check_weight_bits,
)
from keras_mpq.model import inputs as inputs_lib
from keras_mpq.model.outputs import (
  Heads,
  heads_of,
  num_classes_of,
  outputs_are_probabilities,
  predicted_labels,
)
from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import calibrate as calibrate_lib
from keras_mpq.quantization import fold as fold_lib

HUTCHINSON_PROBES = 16
"""Rademacher probes of the ``hessian_trace`` metric's trace estimate."""

DEFAULT_OBJECTIVE = choices.Objective.KL.value
"""Task loss of the task-loss metrics on a classifier unless told otherwise (`OBJECTIVES`)."""

DISTORTION = choices.Objective.DISTORTION.value
"""Task loss of any other model: its outputs' distortion (`keras_mpq.model.outputs.Heads.distortion`)."""

LOSS = choices.Objective.LOSS.value
"""Task loss when the user passes ``loss=``: their loss on their targets (`loss_per_sample`)."""

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
  fn: Callable[["Job"], Tuple[np.ndarray, Dict[str, Any]]]
  needs_data: bool = True
  needs_labels: bool = True
  uses_context: bool = False


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Job:
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
  evaluator: Optional[Any] = None  # the `keras_mpq.sensitivity.evaluator.Evaluator` it made
  objective: str = DEFAULT_OBJECTIVE
  x_calib: Optional[np.ndarray] = None  # range calibration part (None: x itself)
  x_all: Optional[np.ndarray] = None  # every sample (x and x_calib together)
  y_all: Optional[np.ndarray] = None
  holdout: Optional[Dict[str, Any]] = None
  clean: bool = True
  # How the weights and activation ranges are quantized (None: the stages' defaults).
  weight_method: Optional[str] = None
  bias_correction: Optional[Union[bool, str]] = None
  range_policy: Optional[str] = None
  heads: Optional[Heads] = None  # the model's outputs (`keras_mpq.model.outputs.heads_of`)
  loss: Optional[Any] = None  # the user's loss= (objective "loss"), y then `Targets`


class Targets:
  """The targets of a user's ``loss=``: one array, or one per output, sliced together.

  >>> t = Targets([np.zeros((4, 2)), np.ones(4)])
  >>> len(t), len(t[1:3]), [a.shape for a in t[:2].arrays]
  (4, 2, [(2, 2), (2,)])
  """

  def __init__(self, arrays: Sequence[np.ndarray]):
    self.arrays = tuple(np.asarray(a) for a in arrays)

  def __len__(self) -> int:
    return len(self.arrays[0])

  def __getitem__(self, index) -> "Targets":
    return Targets([a[index] for a in self.arrays])

  @property
  def value(self):
    """One array, or a list of them (what ``loss`` gets as ``y_true``)."""
    return self.arrays[0] if len(self.arrays) == 1 else list(self.arrays)


def check_targets(y, n: int, names: Sequence[str]) -> Targets:
  """The user's targets for ``loss=``: an array, or a list/dict with one per output."""
  if isinstance(y, Targets):
    arrays = list(y.arrays)
  elif isinstance(y, Mapping):
    missing = [k for k in names if k not in y]
    if missing:
      raise InvalidInputError(
          f"Expected targets for every output {list(names)} with loss=. Received: a dict "
          f"without {missing}.")
    arrays = [y[k] for k in names]
  elif isinstance(y, (list, tuple)):
    arrays = list(y)
  else:
    arrays = [y]
  if len(names) > 1 and len(arrays) != len(names):
    raise InvalidInputError(
        f"Expected one target array per output {list(names)} with loss= (a list in that "
        f"order, or a dict by name). Received: {len(arrays)} arrays.")
  try:
    arrays = [np.asarray(a) for a in arrays]
  except (TypeError, ValueError) as e:
    raise InvalidInputError(f"Expected numeric targets with loss=. Received: {e}") from None
  for name, a in zip(names, arrays):
    if len(a) != n:
      raise InvalidInputError(
          f"Expected {n} targets (one per input) for output {name!r}. Received: {len(a)}.")
  return Targets(arrays)


def check_loss(loss) -> Callable:
  """``loss`` as a function of ``(y_true, y_pred)`` giving one value per sample.

  A Keras loss (a name such as ``"mse"``, a ``keras.losses.Loss`` instance,
  made to reduce nothing) or a callable; values over more than the batch
  axis are averaged per sample.
  """
  if isinstance(loss, str):
    try:
      return keras.losses.get(loss)
    except ValueError:
      raise InvalidInputError(
          f"Expected loss as a Keras loss name (such as 'mse'), a keras.losses.Loss or a "
          f"callable fn(y_true, y_pred). Received: loss={loss!r}") from None
  if isinstance(loss, keras.losses.Loss):
    config = dict(loss.get_config(), reduction="none")
    return loss.__class__.from_config(config)
  if callable(loss):
    return loss
  raise InvalidInputError(
      f"Expected loss as a Keras loss name, a keras.losses.Loss or a callable "
      f"fn(y_true, y_pred). Received: loss of type {type(loss).__name__}")


def loss_per_sample(loss: Callable, y: Targets, outputs, names: Sequence[str] = ()) -> np.ndarray:
  """``loss(y_true, y_pred)`` per sample (float64); a scalar stands for every sample."""
  y_true = y.value
  y_pred = outputs
  if isinstance(y_true, list):
    y_true = [tf.constant(a) for a in y_true]
    y_pred = [tf.constant(a) for a in outputs]
  else:
    y_pred = tf.constant(outputs)
    y_true = tf.constant(y_true.reshape(outputs.shape) if y_true.size == outputs.size
                         and y_true.shape != outputs.shape else y_true)
  try:
    value = np.asarray(loss(y_true, y_pred), np.float64)
  except Exception as e:  # pylint: disable=broad-except  # the user's function
    raise InvalidInputError(
        f"Expected loss= to take (y_true, y_pred) for this model's outputs {list(names)}. "
        f"Received {type(e).__name__}: {str(e)[:300]}") from None
  n = len(y)
  value = np.full(n, float(value)) if value.ndim == 0 else value.reshape(n, -1).mean(axis=1)
  if not np.all(np.isfinite(value)):
    raise InvalidInputError(
        f"Expected finite values from loss= on the outputs {list(names)}. Received: "
        f"{int(np.sum(~np.isfinite(value)))} of {n} samples NaN or infinite. Check that y "
        "matches the outputs (shape, scale, order).")
  return value


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
  """Checks the model (`keras_mpq.model.checks.check_model`); folds BatchNorm if it has any."""
  from keras_mpq.model import checks as model_checks_lib  # pylint: disable=g-import-not-at-top
  model_checks_lib.check_model(model)
  if any(isinstance(l, keras.layers.BatchNormalization) for l in model.layers):
    return fold_lib.fold_batchnorm(model)
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


def check_context(context, layers: Sequence[str], bits: Tuple[int, ...]
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


def prepare(model, data, weight_bits, spec: MetricSpec, context, activation_bits,
             batch_size, seed, progress, loss=None) -> Job:
  bits = _check_bits(weight_bits)
  activation_bits = check_activation_bits(activation_bits)
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
      batch_size < 1):
    raise InvalidInputError(
        f"Expected a positive integer batch_size. Received: batch_size={batch_size!r}")
  folded = _fold(model)
  layers = tuple(access_lib.plan_layers(folded))
  ctx, ctx_plan = check_context(context, layers, bits)
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
  x_raw, y_raw = (_split_data(data) if len(folded.inputs) == 1
                  else inputs_lib.split_data(folded, data))
  x = y = None
  labels = None
  from_logits = True
  heads = heads_of(folded)
  if spec.needs_data:
    if x_raw is None:
      raise InvalidInputError(
          f"Metric {spec.name!r} needs data. Expected data=(x, y) or data=x with x of "
          f"inputs {inputs_lib.describe(folded)}. "
          "Received: data=None. Use keras_mpq.synthesize(model) when you have none.")
    x = calibrate_lib.check_data(folded, x_raw, "data")
    if loss is not None:
      if spec.name == Metric.HESSIAN_TRACE.value:
        raise InvalidInputError(
            f"Metric {spec.name!r} takes a classifier's labels, not loss=. Use "
            "metric='task_interaction' with loss=.")
      if y_raw is None:
        raise InvalidInputError(
            "Expected data=(x, y) with loss=: the loss compares the outputs with your "
            "targets y. Received: no targets. Pass data=(x, y), or leave loss=None to "
            "measure the outputs' distortion from the float model's.")
      y, labels = check_targets(y_raw, batching.num_samples(x), heads.names), "given (loss=)"
    elif heads.classifier:
      from_logits = not outputs_are_probabilities(folded, x)
      num_classes = num_classes_of(folded)
      if y_raw is not None:
        y, labels = _check_labels(y_raw, batching.num_samples(x), num_classes), "given"
      elif spec.needs_labels:
        y = predicted_labels(folded, x, from_logits, batch_size)
        labels = "float model argmax"
    else:
      _refuse_labels(spec, heads, y_raw)
  job = Job(folded, layers, bits, x, y, from_logits, ctx, activation_bits, layer_act,
             int(batch_size), int(seed), show_progress(progress), default_act, labels)
  job.x_all, job.y_all = x, y
  job.heads = heads
  job.loss = None if loss is None else check_loss(loss)
  return job


def _refuse_labels(spec: MetricSpec, heads: Heads, y_raw) -> None:
  """A model that is not a classifier is measured without labels (its outputs' distortion)."""
  what = ", ".join(f"{h.name!r} ({h.kind}, shape {tuple(h.shape)})" for h in heads.heads)
  if spec.name == Metric.HESSIAN_TRACE.value:
    raise InvalidInputError(
        f"Metric {spec.name!r} needs a classifier's labels. Received: a model whose "
        f"outputs are {what}. Use metric='task_interaction' (it measures the outputs' "
        "distortion from the float model's) or 'weight_mse'.")
  if y_raw is not None:
    raise InvalidInputError(
        "Expected data=x alone for a model that is not a single-label classifier: its "
        "sensitivity is the distortion of its outputs from the float model's, which "
        f"needs no labels. Received: labels for a model whose outputs are {what}. "
        "Pass data=x.")


def check_objective(objective) -> Optional[str]:
  """``objective`` checked against `OBJECTIVES`; None stays None (the model decides: `resolve_objective`)."""
  if objective is None:
    return None
  if objective not in OBJECTIVES:
    raise InvalidInputError(
        f"Expected objective in {list(OBJECTIVES)} (or None: {DEFAULT_OBJECTIVE!r} for a "
        f"classifier, {DISTORTION!r} otherwise). Received: objective={objective!r}")
  return str(objective)


def resolve_objective(job: Job, objective: Optional[str]) -> str:
  """Sets and returns ``job.objective``: ``objective``, or the default for the model's outputs.

  A classifier takes ``kl`` (default), ``cross_entropy`` or ``distortion``
  (the same KL, through its head); any other model ``distortion`` only.
  """
  objective = check_objective(objective)
  classifier = job.heads is None or job.heads.classifier
  if job.loss is not None:
    if objective not in (None, LOSS):
      raise InvalidInputError(
          f"Expected objective=None or {LOSS!r} with loss= (the loss is the objective). "
          f"Received: objective={objective!r}")
    job.objective = LOSS
    return LOSS
  if objective is None:
    objective = DEFAULT_OBJECTIVE if classifier else DISTORTION
  elif not classifier and objective != DISTORTION:
    names = [h.name for h in job.heads.heads]
    raise InvalidInputError(
        f"Expected objective={DISTORTION!r} (or None) for a model that is not a "
        f"single-label classifier (outputs {names}): {objective!r} needs a classifier's "
        f"class probabilities. Received: objective={objective!r}.")
  job.objective = objective
  return objective


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


def apply_holdout(job: Job, holdout: float) -> None:
  if job.x is None:
    return
  cal, held, info = split_holdout(batching.num_samples(job.x_all), holdout, job.seed)
  job.holdout = info
  if cal is not None:
    job.x_calib = batching.take(job.x_all, cal)
    job.x = batching.take(job.x_all, held)
    job.y = None if job.y_all is None else job.y_all[held]


# --------------------------------------------------------------------------- evaluator


def _cross_entropy(log_probs: np.ndarray, y: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """Per-sample cross-entropy against the labels ``y`` (``ref`` unused)."""
  del ref
  return -log_probs[np.arange(len(y)), y].astype(np.float64)


def _kl(log_probs: np.ndarray, y: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """Per-sample ``KL(float || model)``; ``ref`` holds the float model's log-probabilities."""
  del y
  ref = ref.astype(np.float64)
  return np.sum(np.exp(ref) * (ref - log_probs.astype(np.float64)), axis=-1)


OBJECTIVE_FNS = {choices.Objective.CROSS_ENTROPY.value: _cross_entropy, choices.Objective.KL.value: _kl}
"""The classifier objectives over log-probabilities; ``distortion`` is the `Evaluator`'s (it needs the heads)."""
OBJECTIVES = tuple(OBJECTIVE_FNS) + (DISTORTION, LOSS)
"""Task-loss objectives: ``cross_entropy`` against the labels, ``kl`` from the float
model (classifiers), ``distortion`` of every output from the float model's (any
model), ``loss``: the user's ``loss=`` on their targets."""
