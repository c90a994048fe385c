"""Synthesis: labeled calibration data made from the classifier alone (data-free).

Three generators behind one registry (`SynthesisMethod`):

* ``"labeled"`` (the paper's, METHOD.md section 1): targets spread evenly over
  the classes (round-robin, then shuffled); inputs start as Gaussian noise
  mapped into the valid input range and are optimized with Adam on
  ``CE(M(x), y) + tv_weight * TV(x) + l2_weight * ||x||^2``, clipped to the
  range after every step. Each sample stops (its updates are masked out) as
  soon as ``p(y_j | x_j)`` reaches its own target confidence ``tau_j``, drawn
  uniformly from ``confidence_range``, so the set spans the decision boundary
  instead of sitting at p=1. Nothing reads BatchNorm statistics or depends on a
  layer type: any classifier with a (batch, classes) output works.
* ``"zeroq"``: ZeroQ's distilled data (Cai et al., CVPR 2020): inputs whose
  batch statistics at every BatchNormalization layer's input match the layer's
  moving mean and variance; labeled by the model's argmax. Needs BatchNorm.
* ``"noise"``: Gaussian noise in the valid range, labeled by the model's argmax.

The priors and the optimizer work on ``u`` in [-1, 1], the input range mapped
linearly (``x = mid + half * u``), so the defaults do not depend on whether the
model takes [0, 1] or [0, 255]. TV is the mean squared difference of
neighbouring values along the spatial axes that exist: H and W for NHWC
images, T for (N, T, C) signals, none for plain vectors. The L2 prior is the
mean of ``u ** 2`` (it pulls toward the middle of the range).

The valid input range comes from the model when its input goes straight into a
``Rescaling`` layer (``Rescaling(1/255)`` means raw [0, 255];
``Rescaling(1/127.5, offset=-1)`` also means [0, 255]) or a ``Normalization``
layer (mean +- 3 std, widest over channels); an explicit ``input_range``
argument overrides it (with a warning when they disagree); with neither, [0, 1]
is assumed and `SynthesisResult.assumed_range` says so.

Each batch has the same shape (the last one is padded), and one `tf.function`
runs the optimization steps for every batch: it is traced once per call.

Example:

>>> from keras_mpq.compat import keras
>>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
...                           keras.layers.Dense(3)])
>>> x, y = synthesize(model, num_samples=6, max_steps=20, progress=False)
>>> x.shape, sorted(y.tolist())
((6, 8, 8, 1), [0, 0, 1, 1, 2, 2])
>>> result = synthesize_with_info(model, num_samples=6, method="noise", progress=False)
>>> result.input_range, result.assumed_range
((0.0, 1.0), True)
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from keras_mpq.compat import is_keras3_model, keras, tf
from keras_mpq.types import InvalidInputError, UnsupportedModelError, to_jsonable, SynthesisResult

DEFAULT_INPUT_RANGE = (0.0, 1.0)
DEFAULT_TV_WEIGHT = 0.05
DEFAULT_L2_WEIGHT = 0.01
# Adam step size in the [-1, 1] input space, per method (None picks these).
DEFAULT_LEARNING_RATE = {"labeled": 0.01, "zeroq": 0.1}
# Normalization layers: the raw range taken as mean +- this many std.
NORMALIZATION_STDS = 3.0
# Optimization steps run per call of the compiled step function; the progress
# bar and the "all samples done" check update between calls.
_STEPS_PER_CALL = 10
_LOG_EPS = 1e-30

OUTPUT_KINDS = ("logits", "softmax", "sigmoid_logit", "sigmoid")


# --------------------------------------------------------------------------- registry


class SynthesisMethod(str, enum.Enum):
  """Built-in synthetic-data generators (`register_generator` adds more)."""

  LABELED = "labeled"
  ZEROQ = "zeroq"
  NOISE = "noise"


# name -> generator(classifier, options, rng, bar) -> GeneratedData
_GENERATORS: Dict[str, Callable[..., "GeneratedData"]] = {}


def register_generator(name: str):
  """Decorator that registers a synthetic-data generator under ``name``.

  A generator is called as ``fn(classifier, options, rng, bar)`` with a
  `Classifier`, the `SynthesisOptions`, a ``numpy.random.Generator`` (the only
  source of randomness it may use) and a tqdm bar counting finished samples; it
  returns `GeneratedData`.

  Example:

  >>> @register_generator("zeros")
  ... def _zeros(classifier, options, rng, bar):
  ...   x = np.zeros((options.num_samples,) + classifier.input_shape, np.float32)
  ...   return GeneratedData(x=x, y=classifier.predict_labels(x))
  >>> "zeros" in available_methods()
  True
  >>> _ = _GENERATORS.pop("zeros")
  """
  key = name.value if isinstance(name, SynthesisMethod) else str(name)

  def decorator(fn):
    if key in _GENERATORS and _GENERATORS[key] is not fn:
      raise InvalidInputError(
          f"Expected a new generator name. Received: name={key!r}, which is "
          f"already registered; registered: {available_methods()}")
    _GENERATORS[key] = fn
    return fn

  return decorator


def available_methods() -> List[str]:
  """Names of the registered generators, built-ins first."""
  builtin = [m.value for m in SynthesisMethod if m.value in _GENERATORS]
  return builtin + sorted(k for k in _GENERATORS if k not in builtin)


def get_generator(method) -> Callable[..., "GeneratedData"]:
  """The generator registered as ``method``; the error lists the valid names."""
  key = method.value if isinstance(method, SynthesisMethod) else method
  if not isinstance(key, str) or key not in _GENERATORS:
    raise InvalidInputError(
        f"Expected method to be one of {available_methods()}. Received: "
        f"method={method!r}")
  return _GENERATORS[key]


# --------------------------------------------------------------------------- data types


@dataclasses.dataclass(frozen=True)
class SynthesisOptions:
  """The knobs every generator reads (validated by `synthesize_with_info`)."""

  num_samples: int
  batch_size: int
  max_steps: int
  confidence_range: Tuple[float, float]
  tv_weight: float
  l2_weight: float
  learning_rate: Optional[float]


@dataclasses.dataclass(frozen=True)
class GeneratedData:
  """What a generator returns: inputs, labels and how the optimization went.

  ``target_confidences``/``reached`` are for generators that aim each sample
  at a confidence (the labeled one); ``info`` is free-form and JSON-able.
  """

  x: np.ndarray
  y: np.ndarray
  steps: Optional[np.ndarray] = None
  target_confidences: Optional[np.ndarray] = None
  reached: Optional[np.ndarray] = None
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A tf_keras classifier as the generators see it.

  ``forward`` maps a float32 input batch to what the model's output layer sees
  before its softmax/sigmoid when that could be recovered (``output_kind``
  ``logits``/``sigmoid_logit``), else to the model's output itself
  (``softmax``/``sigmoid``). `log_probs` turns either into
  ``(batch, num_classes)`` log-probabilities.
  """

  model: Any
  forward: Any
  output_kind: str
  num_classes: int
  input_shape: Tuple[int, ...]
  input_range: Tuple[float, float]
  input_range_source: str
  assumed_range: bool

  @property
  def spatial_axes(self) -> Tuple[int, ...]:
    """Axes of a batch that TV runs along: all but batch and channels."""
    rank = len(self.input_shape) + 1
    return tuple(range(1, rank - 1)) if rank >= 3 else ()

  def to_input(self, u):
    """Maps ``u`` in [-1, 1] to the model's input range."""
    low, high = self.input_range
    return (high + low) / 2.0 + (high - low) / 2.0 * u

  def log_probs(self, x):
    """``(batch, num_classes)`` log-probabilities of a batch (tensor in, tensor out)."""
    out = tf.cast(self.forward(x, training=False), tf.float32)
    out = tf.reshape(out, [-1, 1 if self.output_kind.startswith("sigmoid")
                           else self.num_classes])
    if self.output_kind == "logits":
      return tf.nn.log_softmax(out, axis=-1)
    if self.output_kind == "softmax":
      return tf.math.log(tf.maximum(out, _LOG_EPS))
    if self.output_kind == "sigmoid_logit":
      return tf.concat([tf.math.log_sigmoid(-out), tf.math.log_sigmoid(out)], axis=-1)
    return tf.math.log(tf.maximum(tf.concat([1.0 - out, out], axis=-1), _LOG_EPS))

  def predict_log_probs(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Eager-friendly `log_probs` over an array, in batches."""
    fn = _compiled(self, "_predict_fn", lambda: tf.function(self.log_probs))
    batch_size = max(1, min(batch_size, len(x)))
    parts = []
    for i in range(0, len(x), batch_size):
      chunk = np.asarray(x[i:i + batch_size], np.float32)
      real = len(chunk)
      if real < batch_size:  # pad: one batch shape, one trace
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, 0)])
      parts.append(fn(tf.constant(chunk)).numpy()[:real])
    return np.concatenate(parts, axis=0)

  def predict_labels(self, x: np.ndarray) -> np.ndarray:
    """The model's argmax labels for ``x`` (int64)."""
    return np.argmax(self.predict_log_probs(x), axis=-1).astype(np.int64)


def _compiled(obj, attr, make):
  """Caches a compiled function on a frozen dataclass instance."""
  fn = obj.__dict__.get(attr)
  if fn is None:
    fn = make()
    object.__setattr__(obj, attr, fn)
  return fn


def inspect_classifier(model, input_range=None) -> Classifier:
  """Checks that ``model`` is a usable classifier and reads what synthesis needs.

  Finds the number of classes, whether the output is logits, softmax,
  a sigmoid unit or its logit (looking through a final Softmax layer, a
  softmax/sigmoid Activation layer or a layer built with
  ``activation="softmax"``/``"sigmoid"`` to the logits underneath), and the
  valid input range (see the module docstring).

  Example:

  >>> from keras_mpq.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Rescaling(1 / 255),
  ...                       keras.layers.Dense(3, activation="softmax")])
  >>> c = inspect_classifier(m)
  >>> c.num_classes, c.output_kind, c.input_range
  (3, 'logits', (0.0, 255.0))
  """
  if not isinstance(model, keras.Model):
    if is_keras3_model(model):
      raise UnsupportedModelError(
          "Expected a tf_keras model. Received a Keras 3 model; load it with "
          "keras_mpq.load_model(...) first, which converts it.")
    raise InvalidInputError(
        f"Expected a tf_keras classifier (keras.Model). Received: "
        f"model={type(model).__name__}")
  inputs = getattr(model, "inputs", None)
  outputs = getattr(model, "outputs", None)
  if not inputs or not outputs:
    raise UnsupportedModelError(
        "Expected a functional or Sequential model with a defined input "
        f"(built from keras.Input(...)). Received: model {model.name!r} "
        "has no graph inputs (a subclassed or unbuilt model); wrap it as "
        "keras.Model(inp, model(inp)) with inp = keras.Input(shape).")
  if len(inputs) != 1:
    raise UnsupportedModelError(
        "Expected a model with one input. Received: "
        f"{len(inputs)} inputs {[tuple(t.shape) for t in inputs]}; "
        "synthesis makes single-input classifier data only.")
  in_shape = tuple(inputs[0].shape)[1:]
  if any(d is None for d in in_shape):
    raise UnsupportedModelError(
        "Expected a fixed input shape apart from the batch. Received: input "
        f"shape {(None,) + in_shape}; rebuild the model with a fixed shape, e.g. "
        "keras.Input((224, 224, 3)).")
  if not tf.as_dtype(inputs[0].dtype).is_floating:
    raise UnsupportedModelError(
        f"Expected a float input (synthesis differentiates through it). Received: "
        f"input dtype {inputs[0].dtype}; cast inside the model instead.")
  if len(outputs) != 1 or len(outputs[0].shape) != 2 or not outputs[0].shape[-1]:
    raise UnsupportedModelError(
        "Expected a classifier with one output of shape (batch, num_classes). "
        f"Received: output shapes {[tuple(t.shape) for t in outputs]}. End the "
        "model with a class head (e.g. GlobalAveragePooling2D and Dense(classes)), "
        "or calibrate with real data instead.")
  units = int(outputs[0].shape[-1])
  low, high, source, assumed = _input_range(model, input_range)
  forward, kind = _output_head(model, units, (low, high))
  return Classifier(model=model, forward=forward, output_kind=kind,
                    num_classes=2 if units == 1 else units,
                    input_shape=tuple(int(d) for d in in_shape),
                    input_range=(low, high), input_range_source=source,
                    assumed_range=assumed)


def _activation_name(layer) -> Optional[str]:
  if isinstance(layer, keras.layers.Softmax):
    return "softmax"
  act = getattr(layer, "activation", None)
  if act is None:
    return None
  try:
    name = keras.activations.serialize(act)
  except (ValueError, TypeError):
    name = getattr(act, "__name__", None)
  return name if isinstance(name, str) else None


def _output_head(model, units, input_range):
  """(forward, output_kind): logits under a final softmax/sigmoid when reachable."""
  out = model.outputs[0]
  layer = getattr(getattr(out, "_keras_history", None), "layer", None)
  act = _activation_name(layer) if layer is not None else None
  if act == "sigmoid" and units > 1:
    raise UnsupportedModelError(
        "Expected a single-label classifier (softmax or logits over classes, or "
        f"one sigmoid unit). Received: {units} sigmoid units in layer "
        f"{layer.name!r} (multi-label); synthesis needs one class per sample.")
  probe = _probe_batch(model, input_range)
  try:
    reference = np.asarray(model(probe, training=False), np.float64)
  except Exception as e:  # pylint: disable=broad-except
    raise UnsupportedModelError(
        f"Expected the model to run on a batch of its input shape. Received an "
        f"error from model {model.name!r}: {type(e).__name__}: {str(e)[:300]}") from None
  if not np.all(np.isfinite(reference)):
    raise UnsupportedModelError(
        f"Expected finite outputs from model {model.name!r} on inputs in "
        f"{input_range}; got NaN/Inf. Check the input_range and the weights.")
  if act in ("softmax", "sigmoid"):
    head = _logit_model(model, layer)
    if head is not None:
      logits = np.asarray(head(probe, training=False), np.float64)
      if act == "softmax":
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
      else:
        p = 1.0 / (1.0 + np.exp(-logits))
      if logits.shape == reference.shape and np.allclose(p, reference, atol=1e-4):
        return head, "logits" if act == "softmax" else "sigmoid_logit"
  # No structure to look through: read the output numerically.
  in_unit = bool(np.all((reference >= 0) & (reference <= 1)))
  if units == 1:
    return model, "sigmoid" if in_unit else "sigmoid_logit"
  sums_to_one = np.allclose(reference.sum(-1), 1.0, atol=1e-3)
  return model, "softmax" if in_unit and sums_to_one else "logits"


def _logit_model(model, layer):
  """A model sharing ``model``'s layers that outputs ``layer``'s pre-activation."""
  try:
    if isinstance(layer, (keras.layers.Softmax, keras.layers.Activation)):
      return keras.Model(model.inputs, layer.input, name=f"{model.name}_logits")
    config = dict(layer.get_config(), activation="linear",
                  name=f"{layer.name}_logits")
    clone = layer.__class__.from_config(config)
    logits = clone(layer.input)
    clone.set_weights(layer.get_weights())
    return keras.Model(model.inputs, logits, name=f"{model.name}_logits")
  except Exception:  # pylint: disable=broad-except
    return None  # nested or shared layers: fall back to the output itself


def _probe_batch(model, input_range):
  """Eight inputs spread over the range: constant low/mid/high, and noise."""
  shape = tuple(int(d) for d in model.inputs[0].shape[1:])
  rng = np.random.default_rng(1234)
  u = np.concatenate([np.full((1,) + shape, v, np.float32) for v in (-1.0, 0.0, 1.0)]
                     + [rng.uniform(-1, 1, (5,) + shape).astype(np.float32)])
  low, high = input_range
  return tf.constant((high + low) / 2 + (high - low) / 2 * u, tf.float32)


# --------------------------------------------------------------------------- input range


def _check_range(value, name="input_range") -> Tuple[float, float]:
  try:
    low, high = (float(v) for v in value)
  except (TypeError, ValueError):
    raise InvalidInputError(
        f"Expected {name}=(low, high), two finite numbers with low < high, e.g. "
        f"(0, 255). Received: {name}={value!r}") from None
  if not (math.isfinite(low) and math.isfinite(high) and low < high):
    raise InvalidInputError(
        f"Expected {name}=(low, high), two finite numbers with low < high, e.g. "
        f"(0, 255). Received: {name}={value!r}")
  return low, high


def _input_consumers(model) -> List[Any]:
  """Layers of ``model`` that take the model's input tensor directly."""
  target = model.inputs[0].ref()
  found = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    try:
      tensors = tf.nest.flatten(layer.input)
    except (AttributeError, ValueError, RuntimeError):
      continue
    if any(hasattr(t, "ref") and t.ref() == target for t in tensors):
      found.append(layer)
  return found


def _preprocessing_layer(model, depth=0):
  """The Rescaling/Normalization layer the input goes straight into, if any."""
  consumers = _input_consumers(model)
  if len(consumers) != 1:
    return None
  layer = consumers[0]
  if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
    return layer
  if isinstance(layer, keras.Model) and getattr(layer, "inputs", None) and depth < 4:
    return _preprocessing_layer(layer, depth + 1)
  return None


def infer_input_range(model) -> Optional[Tuple[float, float, str]]:
  """``(low, high, source)`` from the model's input preprocessing, or None.

  Example:

  >>> from keras_mpq.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Rescaling(1 / 127.5, offset=-1),
  ...                       keras.layers.Dense(2)])
  >>> infer_input_range(m)[:2]
  (0.0, 255.0)
  """
  layer = _preprocessing_layer(model)
  if isinstance(layer, keras.layers.Rescaling):
    scale = np.asarray(layer.scale, np.float64).ravel()
    offset = np.asarray(layer.offset, np.float64).ravel()
    if np.any(scale == 0):
      return None
    target = (-1.0, 1.0) if np.all(offset < 0) else (0.0, 1.0)
    ends = np.stack([(t - offset) / scale for t in target])  # (2, channels)
    low, high = float(ends.min()), float(ends.max())
    return low, high, (f"Rescaling layer {layer.name!r} maps [{low:g}, {high:g}] "
                       f"to [{target[0]:g}, {target[1]:g}]")
  if isinstance(layer, keras.layers.Normalization) and not getattr(layer, "invert", False):
    mean, var = getattr(layer, "mean", None), getattr(layer, "variance", None)
    if mean is None or var is None:
      return None
    mean = np.asarray(mean, np.float64).ravel()
    std = np.sqrt(np.maximum(np.asarray(var, np.float64).ravel(), 0.0))
    low = float(np.min(mean - NORMALIZATION_STDS * std))
    high = float(np.max(mean + NORMALIZATION_STDS * std))
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
      return None
    return low, high, (f"Normalization layer {layer.name!r}: mean +- "
                       f"{NORMALIZATION_STDS:g} std = [{low:g}, {high:g}]")
  return None


def _input_range(model, given):
  """(low, high, source, assumed): the argument, else inferred, else [0, 1]."""
  inferred = infer_input_range(model)
  if given is not None:
    low, high = _check_range(given)
    if inferred is not None and not np.allclose((low, high), inferred[:2], rtol=1e-6):
      warnings.warn(
          f"input_range={given!r} overrides the range read off the model "
          f"({inferred[2]}).", stacklevel=4)
    return low, high, "input_range argument", False
  if inferred is not None:
    return inferred[0], inferred[1], inferred[2], False
  return (*DEFAULT_INPUT_RANGE, "assumed [0, 1]: no Rescaling/Normalization at the "
          "input and no input_range given", True)


# --------------------------------------------------------------------------- optimizer


class _BatchOptimizer:
  """Adam on one fixed-shape batch of ``u`` in [-1, 1], with per-sample stopping.

  ``loss_fn(u, y) -> (scalar loss, score (batch,))``. A sample stops for good
  the first step its ``score`` reaches its threshold ``tau`` (that step's
  update is not applied, so the kept input is the one that reached it); a
  sample with ``tau = inf`` runs all steps. One `tf.function` runs a chunk of
  steps and is reused for every batch (``traces`` counts its tracings).
  """

  def __init__(self, batch_shape, loss_fn, learning_rate):
    self.loss_fn = loss_fn
    batch = batch_shape[0]
    self.u = tf.Variable(tf.zeros(batch_shape, tf.float32), name="synthetic_u")
    self.y = tf.Variable(tf.zeros((batch,), tf.int32), trainable=False)
    self.tau = tf.Variable(tf.zeros((batch,), tf.float32), trainable=False)
    self.active = tf.Variable(tf.zeros((batch,), tf.bool), trainable=False)
    self.steps = tf.Variable(tf.zeros((batch,), tf.int32), trainable=False)
    self.optimizer = keras.optimizers.Adam(learning_rate)
    self.optimizer.build([self.u])
    self.traces = 0
    self.losses = []
    self.batch_steps = []  # steps run per batch (whole calls of the step function)
    self.calls = []  # (steps, seconds) per call; the first one includes tracing
    self._mask_shape = [batch] + [1] * (len(batch_shape) - 1)
    self._run = tf.function(self._run_steps)

  def _run_steps(self, n_steps):
    self.traces += 1  # Python side effect: runs only while tracing
    first_loss = last_loss = tf.constant(-1.0)
    for i in tf.range(n_steps):
      with tf.GradientTape() as tape:
        loss, score = self.loss_fn(self.u, self.y)
      grad = tape.gradient(loss, self.u)
      keep = self.active & (score < self.tau)
      before = tf.identity(self.u)
      self.optimizer.apply_gradients([(grad, self.u)])
      moved = tf.clip_by_value(self.u, -1.0, 1.0)
      self.u.assign(tf.where(tf.reshape(keep, self._mask_shape), moved, before))
      self.steps.assign_add(tf.cast(keep, tf.int32))
      self.active.assign(keep)
      last_loss = tf.cast(loss, tf.float32)
      if i == 0:
        first_loss = last_loss
    return tf.reduce_sum(tf.cast(self.active, tf.int32)), first_loss, last_loss

  def timing(self) -> Dict[str, Any]:
    """Seconds of the first call (tracing included) and per step after it."""
    rest = self.calls[1:]
    steps = sum(n for n, _ in rest)
    return {"first_call_seconds": self.calls[0][1] if self.calls else None,
            "seconds_per_step": sum(t for _, t in rest) / steps if steps else None}

  def run(self, u0, y, tau, active, max_steps, on_chunk=None):
    """Optimizes one batch; returns (u, steps, still_active) as numpy.

    ``self.losses`` gets this batch's (first step's, last step's) loss.
    """
    self.u.assign(u0)
    self.y.assign(y)
    self.tau.assign(tau)
    self.active.assign(active)
    self.steps.assign(tf.zeros_like(self.steps))
    for var in self.optimizer.variables:
      var.assign(tf.zeros_like(var))
    done, losses = 0, []
    while done < max_steps:
      chunk = min(_STEPS_PER_CALL, max_steps - done)
      # Always the same chunk tensor shape and dtype: no retracing.
      tick = time.perf_counter()
      n_active, first, last = self._run(tf.constant(chunk, tf.int32))
      n_active = int(n_active)
      self.calls.append((chunk, time.perf_counter() - tick))
      losses.append((float(first), float(last)))
      done += chunk
      if on_chunk is not None:
        on_chunk(self.active.numpy())
      if n_active == 0:
        break
    self.losses.append((losses[0][0], losses[-1][1]))
    self.batch_steps.append(done)
    return self.u.numpy(), self.steps.numpy(), self.active.numpy()


def _smoothness(u, spatial_axes):
  """Per-sample mean squared difference of neighbours along each spatial axis.

  Uses ``tf.roll`` with the wrapped-around pair masked out: on CPU its gradient
  is several times cheaper than that of a strided slice.
  """
  rank = len(u.shape)
  sample_axes = list(range(1, rank))
  size = float(np.prod(u.shape[1:]))
  total = tf.zeros([tf.shape(u)[0]], tf.float32)
  for axis in spatial_axes:
    n = u.shape[axis]
    if n is None or n < 2:
      continue
    mask = tf.reshape(tf.cast(tf.range(n) > 0, u.dtype),
                      [n if a == axis else 1 for a in range(rank)])
    diff = u - tf.roll(u, shift=1, axis=axis)
    total += tf.reduce_sum(tf.square(diff) * mask, axis=sample_axes) / (size * (n - 1) / n)
  return total


def _initial_u(rng, shape):
  """``N(0, 1)`` mapped linearly so +-3 std spans [-1, 1], then clipped."""
  return np.clip(rng.standard_normal(shape) / 3.0, -1.0, 1.0).astype(np.float32)


def _batches(options):
  """(batch size, number of batches); the last batch is padded to full size."""
  batch = min(options.batch_size, options.num_samples)
  return batch, -(-options.num_samples // batch)


class _Bar:
  """Counts finished samples on a tqdm bar (advance only over real samples)."""

  def __init__(self, bar):
    self.bar = bar
    self.finished = 0

  def to(self, total_finished):
    if total_finished > self.finished:
      self.bar.update(total_finished - self.finished)
      self.finished = total_finished


# --------------------------------------------------------------------------- generators


@register_generator(SynthesisMethod.LABELED)
def _labeled(classifier: Classifier, options: SynthesisOptions, rng, bar) -> GeneratedData:
  """The paper's labeled synthesis (module docstring)."""
  n, k = options.num_samples, classifier.num_classes
  targets = rng.permutation(np.arange(n) % k).astype(np.int64)
  lo, hi = options.confidence_range
  tau = rng.uniform(lo, hi, n).astype(np.float32)
  batch, n_batches = _batches(options)
  spatial = classifier.spatial_axes
  tv_weight, l2_weight = float(options.tv_weight), float(options.l2_weight)
  sample_axes = list(range(1, len(classifier.input_shape) + 1))

  def loss_fn(u, y):
    log_p = classifier.log_probs(classifier.to_input(u))
    log_p_y = tf.gather(log_p, y, axis=1, batch_dims=1)
    per_sample = -log_p_y
    if tv_weight and spatial:
      per_sample += tv_weight * _smoothness(u, spatial)
    if l2_weight:
      per_sample += l2_weight * tf.reduce_mean(tf.square(u), axis=sample_axes)
    return tf.reduce_sum(per_sample), tf.exp(log_p_y)

  lr = options.learning_rate or DEFAULT_LEARNING_RATE["labeled"]
  opt = _BatchOptimizer((batch,) + classifier.input_shape, loss_fn, lr)
  xs, steps, reached = [], [], []
  counter = _Bar(bar)
  for b in range(n_batches):
    start = b * batch
    real = min(batch, n - start)
    y = np.zeros(batch, np.int32)
    t = np.full(batch, np.inf, np.float32)
    y[:real], t[:real] = targets[start:start + real], tau[start:start + real]
    active = np.arange(batch) < real  # padding slots never move
    u0 = _initial_u(rng, (batch,) + classifier.input_shape)
    base = counter.finished
    u, s, still = opt.run(u0, y, t, active, options.max_steps,
                          lambda act: counter.to(base + int(real - act[:real].sum())))
    counter.to(base + real)
    xs.append(u[:real])
    steps.append(s[:real])
    reached.append(~still[:real])
  x = np.asarray(classifier.to_input(np.concatenate(xs)), np.float32)
  return GeneratedData(x=x, y=targets, steps=np.concatenate(steps).astype(np.int32),
                       target_confidences=tau, reached=np.concatenate(reached),
                       info={"traces": opt.traces, "learning_rate": lr,
                             "batch_steps": opt.batch_steps, **opt.timing(),
                             "tv_weight": tv_weight,
                             "l2_weight": l2_weight, "tv_axes": list(spatial)})


def batchnorm_layers(model) -> List[Any]:
  """The BatchNormalization layers at the top level of ``model``, in order."""
  return [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]


@register_generator(SynthesisMethod.ZEROQ)
def _zeroq(classifier: Classifier, options: SynthesisOptions, rng, bar) -> GeneratedData:
  """ZeroQ distilled data: batch statistics matched to every BN layer's moving ones."""
  model = classifier.model
  bns = batchnorm_layers(model)
  if not bns:
    nested = any(isinstance(l, keras.layers.BatchNormalization)
                 for l in model.submodules)
    raise UnsupportedModelError(
        "Expected a model with BatchNormalization layers for method='zeroq' "
        "(it matches their moving statistics). Received: model "
        f"{model.name!r} has none"
        f"{' at its top level (only inside nested models)' if nested else ''}. "
        "Use method='labeled', which needs no BatchNorm.")
  try:
    stats_model = keras.Model(model.inputs, [l.input for l in bns])
  except Exception as e:  # pylint: disable=broad-except
    raise UnsupportedModelError(
        f"Expected each BatchNormalization layer to be called once in the model "
        f"graph for method='zeroq'. Received: {type(e).__name__}: {str(e)[:200]}. "
        "Use method='labeled'.") from None
  targets = []
  for layer in bns:
    axes = [a % len(layer.input.shape) for a in tf.nest.flatten(layer.axis)]
    reduce_axes = [a for a in range(len(layer.input.shape)) if a not in axes]
    targets.append((reduce_axes, layer.moving_mean,
                    tf.sqrt(layer.moving_variance + layer.epsilon)))

  def loss_fn(u, y):
    del y
    feats = stats_model(classifier.to_input(u), training=False)
    feats = feats if isinstance(feats, (list, tuple)) else [feats]
    loss = 0.0
    for h, (axes, mean, std) in zip(feats, targets):
      h = tf.cast(h, tf.float32)
      m, v = tf.nn.moments(h, axes=axes)
      loss += tf.reduce_mean(tf.square(m - tf.cast(mean, tf.float32)))
      loss += tf.reduce_mean(tf.square(tf.sqrt(v + 1e-5) - tf.cast(std, tf.float32)))
    return loss, tf.zeros([tf.shape(u)[0]], tf.float32)

  n = options.num_samples
  batch, n_batches = _batches(options)
  lr = options.learning_rate or DEFAULT_LEARNING_RATE["zeroq"]
  opt = _BatchOptimizer((batch,) + classifier.input_shape, loss_fn, lr)
  xs, steps = [], []
  counter = _Bar(bar)
  never = np.full(batch, np.inf, np.float32)
  for b in range(n_batches):
    real = min(batch, n - b * batch)
    u0 = _initial_u(rng, (batch,) + classifier.input_shape)
    u, s, _ = opt.run(u0, np.zeros(batch, np.int32), never, np.ones(batch, bool),
                      options.max_steps)
    counter.to(counter.finished + real)
    xs.append(u[:real])  # padding samples shaped the statistics, then go
    steps.append(s[:real])
  x = np.asarray(classifier.to_input(np.concatenate(xs)), np.float32)
  return GeneratedData(x=x, y=classifier.predict_labels(x),
                       steps=np.concatenate(steps).astype(np.int32),
                       info={"traces": opt.traces, "learning_rate": lr,
                             "batch_steps": opt.batch_steps, **opt.timing(),
                             "batchnorm_layers": [l.name for l in bns],
                             "bn_loss_initial": float(np.mean([a for a, _ in opt.losses])),
                             "bn_loss_final": float(np.mean([b for _, b in opt.losses]))})


@register_generator(SynthesisMethod.NOISE)
def _noise(classifier: Classifier, options: SynthesisOptions, rng, bar) -> GeneratedData:
  """Gaussian noise mapped into the valid range, labeled by the model's argmax."""
  u = _initial_u(rng, (options.num_samples,) + classifier.input_shape)
  x = np.asarray(classifier.to_input(u), np.float32)
  y = classifier.predict_labels(x)
  bar.update(options.num_samples)
  return GeneratedData(x=x, y=y)


# --------------------------------------------------------------------------- public


def _check_options(num_samples, batch_size, max_steps, confidence_range, tv_weight,
                   l2_weight, learning_rate) -> SynthesisOptions:
  def positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise InvalidInputError(
          f"Expected {name} to be a positive integer. Received: {name}={value!r}")
    return int(value)

  def non_negative(value, name):
    try:
      value = float(value)
    except (TypeError, ValueError):
      value = float("nan")
    if not math.isfinite(value) or value < 0:
      raise InvalidInputError(
          f"Expected {name} to be a finite number >= 0. Received: {name}={value!r}")
    return value

  num_samples = positive_int(num_samples, "num_samples")
  batch_size = positive_int(batch_size, "batch_size")
  max_steps = positive_int(max_steps, "max_steps")
  try:
    lo, hi = (float(v) for v in confidence_range)
  except (TypeError, ValueError):
    lo = hi = float("nan")
  if not (0.0 < lo <= hi < 1.0):
    raise InvalidInputError(
        "Expected confidence_range=(low, high) with 0 < low <= high < 1, e.g. "
        f"(0.5, 0.95). Received: confidence_range={confidence_range!r}")
  if learning_rate is not None:
    learning_rate = non_negative(learning_rate, "learning_rate")
    if learning_rate == 0:
      raise InvalidInputError("Expected learning_rate > 0. Received: learning_rate=0")
  return SynthesisOptions(num_samples, batch_size, max_steps, (lo, hi),
                          non_negative(tv_weight, "tv_weight"),
                          non_negative(l2_weight, "l2_weight"), learning_rate)


def _progress_bar(enabled, total, desc):
  from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
  if enabled is None:
    enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
  return tqdm_auto.tqdm(total=total, desc=desc, unit="sample", leave=False,
                        disable=not enabled)


def synthesize_with_info(model, num_samples: int = 256, method: str = "labeled",
                         seed: int = 0, input_range=None, batch_size: int = 64,
                         max_steps: int = 500,
                         confidence_range: Tuple[float, float] = (0.5, 0.95),
                         tv_weight: float = DEFAULT_TV_WEIGHT,
                         l2_weight: float = DEFAULT_L2_WEIGHT,
                         learning_rate: Optional[float] = None,
                         progress: Optional[bool] = None) -> SynthesisResult:
  """Synthesizes labeled calibration data from ``model``; returns a `SynthesisResult`.

  Args:
    model: a tf_keras classifier with one input of fixed shape and one
      ``(batch, classes)`` output: logits, softmax probabilities, or a single
      sigmoid unit (binary: labels 0/1).
    num_samples: how many samples; at least the number of classes.
    method: a registered generator: "labeled" (the paper's, default), "zeroq"
      (needs BatchNorm), "noise", or one added with `register_generator`.
    seed: makes the result repeatable (same seed, same arrays).
    input_range: ``(low, high)`` of valid inputs; default: read off a
      Rescaling/Normalization input layer, else [0, 1] (assumed, reported).
    batch_size: samples optimized together (the last batch is padded).
    max_steps: optimization steps per batch at most ("labeled", "zeroq").
    confidence_range: range of the per-sample target confidences ("labeled").
    tv_weight: weight of the total-variation prior ("labeled").
    l2_weight: weight of the L2 prior ("labeled").
    learning_rate: Adam step size in the [-1, 1]-scaled input space; None
      takes the method's default (`DEFAULT_LEARNING_RATE`).
    progress: show a progress bar; None: only when stderr is a terminal.

  Returns:
    A `SynthesisResult` with the inputs ``x``, labels ``y`` and per-sample
    confidences, steps and targets, plus the input range used and whether it
    was assumed.

  Raises:
    InvalidInputError: bad arguments (unknown method, too few samples, bad
      ranges).
    UnsupportedModelError: the model is not a single-input classifier, or
      "zeroq" on a model without BatchNorm.

  Example:

  >>> from keras_mpq.compat import keras
  >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4)])
  >>> r = synthesize_with_info(model, num_samples=8, max_steps=50, progress=False)
  >>> r.class_counts().tolist()
  [2, 2, 2, 2]
  >>> r.confidences.shape, r.output_kind
  ((8,), 'logits')
  """
  start = time.perf_counter()
  generator = get_generator(method)
  name = method.value if isinstance(method, SynthesisMethod) else method
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise InvalidInputError(f"Expected an integer seed. Received: seed={seed!r}")
  options = _check_options(num_samples, batch_size, max_steps, confidence_range,
                           tv_weight, l2_weight, learning_rate)
  classifier = inspect_classifier(model, input_range)
  if options.num_samples < classifier.num_classes:
    raise InvalidInputError(
        f"Expected num_samples >= the number of classes ({classifier.num_classes}) "
        f"so every class gets a sample. Received: num_samples={options.num_samples}; "
        f"pass num_samples={classifier.num_classes} or more.")
  rng = np.random.default_rng(int(seed))
  with _progress_bar(progress, options.num_samples, f"synthesize ({name})") as bar:
    data = generator(classifier, options, rng, bar)
  x = np.asarray(data.x, np.float32)
  y = np.asarray(data.y, np.int64)
  if x.shape != (options.num_samples,) + classifier.input_shape or y.shape != (len(x),):
    raise InvalidInputError(
        f"Expected generator {name!r} to return x of shape "
        f"{(options.num_samples,) + classifier.input_shape} and y of shape "
        f"({options.num_samples},). Received: {x.shape} and {y.shape}")
  log_p = classifier.predict_log_probs(x, batch_size=max(options.batch_size, 1))
  confidences = np.exp(np.take_along_axis(log_p, y[:, None], axis=1)[:, 0])
  steps = (np.zeros(len(y), np.int32) if data.steps is None
           else np.asarray(data.steps, np.int32))
  info = {"batch_size": min(options.batch_size, options.num_samples),
          "max_steps": options.max_steps,
          "confidence_range": list(options.confidence_range), **dict(data.info)}
  return SynthesisResult(
      x=x, y=y, confidences=confidences.astype(np.float32), steps=steps,
      target_confidences=data.target_confidences, reached=data.reached,
      method=name, input_range=classifier.input_range,
      input_range_source=classifier.input_range_source,
      assumed_range=classifier.assumed_range, num_classes=classifier.num_classes,
      output_kind=classifier.output_kind, seed=int(seed),
      seconds=time.perf_counter() - start, info=to_jsonable(info))


def synthesize(model, num_samples: int = 256, method: str = "labeled", seed: int = 0,
               input_range=None, batch_size: int = 64, max_steps: int = 500,
               confidence_range: Tuple[float, float] = (0.5, 0.95),
               tv_weight: float = DEFAULT_TV_WEIGHT, l2_weight: float = DEFAULT_L2_WEIGHT,
               learning_rate: Optional[float] = None,
               progress: Optional[bool] = None) -> Tuple[np.ndarray, np.ndarray]:
  """Synthesizes labeled calibration data ``(x, y)`` from ``model`` alone.

  The same as `synthesize_with_info` (which documents the arguments), keeping
  only the inputs (float32) and labels (int64).

  Example:

  >>> from keras_mpq.compat import keras
  >>> model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
  ...                           keras.layers.Dense(10)])
  >>> x, y = synthesize(model, num_samples=20, max_steps=30, progress=False)
  >>> x.shape, x.dtype.name, bool(x.min() >= 0 and x.max() <= 1)
  ((20, 28, 28, 1), 'float32', True)
  """
  result = synthesize_with_info(
      model, num_samples=num_samples, method=method, seed=seed, input_range=input_range,
      batch_size=batch_size, max_steps=max_steps, confidence_range=confidence_range,
      tv_weight=tv_weight, l2_weight=l2_weight, learning_rate=learning_rate,
      progress=progress)
  return result.x, result.y
