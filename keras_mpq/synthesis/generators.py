"""Synthesis: labeled calibration data made from the classifier alone (data-free).

Three generators behind one registry (`SynthesisMethod`):

* ``"labeled"`` (the paper's, METHOD.md section 1, run to a fixed point):
  targets spread evenly over the classes (round-robin, then shuffled), each
  sample with its own target confidence ``tau_j`` drawn uniformly from
  ``confidence_range``; inputs start as Gaussian noise mapped into the valid
  input range and are optimized with Adam, clipped to the range every step,
  for ``max_steps`` steps on

      KL(q_j || M(x_j)) + tv_weight * TV(x) + l2_weight * ||x||^2
                        + bn_weight * BN(x)          (only where BN exists)

  where ``q_j`` puts ``tau_j`` on the target class and spreads the rest
  evenly. Its minimum holds each sample at its target confidence while the
  priors keep working: samples are no longer stopped (still noise) the first
  step they reach ``tau_j`` (``objective="stop"`` keeps that first version for
  comparison). ``BN(x)`` matches the batch statistics at every BatchNorm
  layer's input to its moving mean and variance (DeepInversion, Genie): the
  strongest data-free signal where the model has it, absent where it does
  not, so the generator still works on BN-free models. Random jitter of the
  input (DeepInversion) is on for images, and each image is made through a
  fixed Gaussian blur (``x = Blur(u)``, `synthesis_losses.Blur`, half a pixel
  at 28x28): without it the classifier's gradient paints pixel-fine texture
  over the whole frame, and GPTQ/AdaRound fitted to those patches rounded the
  first layers badly (data-free uniform 2-bit plain CNN 90.1/91.3% -> 92.8/94.8%,
  separable CNN 78.6/48.5% -> 84.9/57.3%; BENCHMARKS.md). The defaults were chosen by
  calibrating 8-bit models on the result (BENCHMARKS.md, *Synthesis*):
  targets in [0.9, 0.999] give activation ranges much closer to real data's
  than the boundary-hugging [0.5, 0.95], which left every range too narrow.
* ``"zeroq"``: ZeroQ's distilled data (Cai et al., CVPR 2020): inputs whose
  batch statistics at every BatchNormalization layer's input match the layer's
  moving mean and variance; labeled by the model's argmax. Needs BatchNorm.
* ``"noise"``: Gaussian noise in the valid range, labeled by the model's argmax.

The priors and the optimizer (`keras_mpq.synthesis.losses`) work on ``u`` in
[-1, 1], the input range mapped linearly (``x = mid + half * u``), so the
defaults do not depend on whether the model takes [0, 1] or [0, 255]. TV is
the mean squared difference of neighbouring values along the spatial axes
that exist: H and W for NHWC images, T for (N, T, C) signals, none for plain
vectors. The L2 prior is the mean of ``u ** 2``. The valid input range comes
from `keras_mpq.model.input_range` (the model's Rescaling/Normalization layer, an
explicit ``input_range``, or an assumed [0, 1] that the result reports).

Each batch has the same shape (the last one is padded), and one `tf.function`
runs the optimization steps for every batch: it is traced once per call.

Example:

>>> from keras_mpq.base.compat import keras
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
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from keras_mpq.base import batching
from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import InvalidInputError, UnsupportedModelError
from keras_mpq.base.progress import Bar
from keras_mpq.base.results import SynthesisResult
from keras_mpq.base.types import to_jsonable
from keras_mpq.synthesis import losses as losses_lib
from keras_mpq.synthesis.classifier import Classifier, inspect_classifier

DEFAULT_TV_WEIGHT = 0.05
DEFAULT_L2_WEIGHT = 0.01
# Weight of the BatchNorm-statistics term of the labeled objective (models with BN).
# 100 (with learning rate 0.1) made inputs whose statistics bias correction and
# GPTQ can learn from: 1 left the pixel mean at 0.48 where MNIST has 0.13
# (BENCHMARKS.md, *Calibration data*).
DEFAULT_BN_WEIGHT = 100.0
OBJECTIVES = ("hold", "stop")
# Adam step size in the [-1, 1] input space, per method (None picks these).
# 0.1 for "labeled" (with the BN weight of 100) gave activation ranges closer to
# real data's than 0.01 within the same 150 steps, with BatchNorm and without.
DEFAULT_LEARNING_RATE = {"labeled": 0.1, "zeroq": 0.1, "diverse": 0.1}
# The step size of ``objective="stop"`` (the first labeled generator).
STOP_LEARNING_RATE = 0.01
# Steps per batch when max_steps is None, per method.
DEFAULT_MAX_STEPS = {"labeled": 150, "zeroq": 500, "diverse": 150}
# Weight of the "diverse" generator's spread term: minus the mean log standard
# deviation of each output value over the batch (per sample, like the priors).
DEFAULT_SPREAD_WEIGHT = 1.0
DEFAULT_CONFIDENCE_RANGE = (0.9, 0.999)
# Random shift of the labeled generator's inputs when jitter=None: this share
# of the smallest spatial size, rounded down (2 positions at 28x28, 7 at 96x96,
# none below 14); DeepInversion shifts 224x224 images by up to 30.
JITTER_SHARE = 0.075
# Gaussian blur of the labeled generator's inputs when blur=None, as a share of
# the smallest spatial size (0.5 positions at 28x28); see `synthesis_losses.Blur`.
BLUR_SHARE = 0.5 / 28
# A "hold" sample counts as reached when it ends within this of its target.
HOLD_TOLERANCE = 0.05


def _smallest_side(model) -> int:
  """The smallest spatial size of the model's input; 0 for vectors or unknown sizes."""
  inputs = getattr(model, "inputs", None)
  if not inputs or len(inputs) != 1:  # several inputs: synthesized flat, no spatial priors
    return 0
  spatial = tuple(inputs[0].shape[1:-1])
  if spatial and all(isinstance(d, int) for d in spatial):
    return min(spatial)
  return 0


# --------------------------------------------------------------------------- registry


class SynthesisMethod(str, enum.Enum):
  """Built-in synthetic-data generators (`register_generator` adds more)."""

  LABELED = "labeled"
  ZEROQ = "zeroq"
  NOISE = "noise"
  DIVERSE = "diverse"


# name -> generator(classifier, options, rng, bar) -> GeneratedData
_GENERATORS: Dict[str, Callable[..., "GeneratedData"]] = {}


def register_generator(name: str):
  """Decorator that registers a synthetic-data generator under ``name``.

  A generator is called as ``fn(classifier, options, rng, bar)`` with a
  `Classifier`, the `SynthesisOptions`, a ``numpy.random.Generator`` (the only
  source of randomness it may use) and a `keras_mpq.base.progress.Bar` counting
  finished samples; it
  returns `GeneratedData`. For a model with several inputs
  ``classifier.input_shape`` is the flat size of all of them side by side:
  make ``u`` of that shape in [-1, 1] and return ``x=classifier.to_arrays(u)``
  (a list, one array per input, each in its own range).

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
  objective: str = "hold"
  bn_weight: Optional[float] = None
  jitter: int = 0
  flip: bool = False
  blur: float = 0.0


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
  x_midway: Optional[np.ndarray] = None  # the inputs halfway through the optimization


def _batch_layout(options):
  """(batch size, number of batches); the last batch is padded to full size."""
  batch = min(options.batch_size, options.num_samples)
  return batch, batching.num_batches(options.num_samples, batch)


def step_postfix(bar: Bar, batch: int, n_batches: int, max_steps: int):
  """A callback for each chunk of steps: ``bar`` shows the step within the batch
  (every "hold" sample finishes only at its batch's last step)."""
  done = [0]

  def on_chunk(_):
    done[0] = min(done[0] + losses_lib.STEPS_PER_CALL, max_steps)
    bar.postfix(f"batch {batch + 1}/{n_batches}, step {done[0]}/{max_steps}")

  return on_chunk


# --------------------------------------------------------------------------- generators


def other_heads(classifier: Classifier):
  """A model of the full model's outputs other than the class head, or None.

  What the labeled generator spreads over the batch besides holding each
  sample at its class: a box or score head next to a class head gets the
  "diverse" generator's spread term, so its calibrated range covers more than
  the values the class objective happens to give it.

  Example:

  >>> inp = keras.Input((4,))
  >>> two = keras.Model(inp, [keras.layers.Dense(3, activation="softmax", name="cls")(inp),
  ...                         keras.layers.Dense(2, name="box")(inp)])
  >>> other_heads(inspect_classifier(two)).output_names
  ['box']
  """
  full = classifier.full_model
  if full is None or len(full.outputs) < 2:
    return None
  head = classifier.model.outputs[0]
  rest = [t for t in full.outputs if t is not head]
  if not rest or len(rest) == len(full.outputs):
    return None
  return keras.Model(full.inputs, rest)


@register_generator(SynthesisMethod.LABELED)
def _labeled(classifier: Classifier, options: SynthesisOptions, rng, bar) -> GeneratedData:
  """The paper's labeled synthesis, run to a fixed point (module docstring)."""
  if not classifier.has_classes:
    heads = classifier.heads
    raise UnsupportedModelError(
        "Expected a model with a class head (softmax or logits over classes) for "
        f"method='labeled'. Received: model {classifier.model.name!r} with outputs "
        f"{[(h.name, str(h.kind)) for h in heads.heads] if heads else '?'}. Use "
        "method='diverse' (BatchNorm statistics, input priors and outputs spread over "
        "the batch), 'zeroq' or 'noise', or pass real data.")
  n, k = options.num_samples, classifier.num_classes
  if n >= k:  # every class, round robin, shuffled
    targets = rng.permutation(np.arange(n) % k).astype(np.int64)
  else:  # fewer samples than classes (a 1000-class model): n distinct classes at random
    targets = rng.choice(k, size=n, replace=False).astype(np.int64)
  lo, hi = options.confidence_range
  tau = rng.uniform(lo, hi, n).astype(np.float32)
  batch, n_batches = _batch_layout(options)
  spatial = classifier.spatial_axes
  tv_weight, l2_weight = float(options.tv_weight), float(options.l2_weight)
  sample_axes = list(range(1, len(classifier.input_shape) + 1))
  hold = options.objective == "hold"
  bn_terms, network = losses_lib.batchnorm_terms(classifier, options.bn_weight)
  bn_weight = float(options.bn_weight if options.bn_weight is not None
                    else DEFAULT_BN_WEIGHT) if bn_terms else 0.0
  tau_var = tf.Variable(tf.zeros((batch,), tf.float32), trainable=False)
  augment = losses_lib.Augment(classifier, options.jitter, options.flip, losses_lib.augment_seed(rng))
  smooth = losses_lib.Blur(spatial, options.blur)
  others = other_heads(classifier)

  def loss_fn(u, y):
    u = smooth(u)  # the sample is the blurred u: its priors, its prediction
    x_in = augment(classifier.to_input(u))
    feats, out = network(x_in)
    log_p = classifier.logits_to_log_probs(out)
    log_p_y = tf.gather(log_p, y, axis=1, batch_dims=1)
    if hold:
      # KL(q || p) up to a constant, q = tau on the target class and the rest
      # spread evenly: its minimum is p = q, a fixed point that keeps going on
      # the priors instead of stopping when tau is first reached.
      t = tau_var
      rest = (tf.reduce_sum(log_p, axis=1) - log_p_y) / float(max(k - 1, 1))
      per_sample = -(t * log_p_y + (1.0 - t) * rest)
    else:
      per_sample = -log_p_y
    if tv_weight and spatial:
      per_sample += tv_weight * losses_lib.smoothness(u, spatial)
    if l2_weight:
      per_sample += l2_weight * tf.reduce_mean(tf.square(u), axis=sample_axes)
    loss = tf.reduce_sum(per_sample)
    if bn_weight:
      loss += bn_weight * float(batch) * losses_lib.batchnorm_loss(feats, bn_terms)
    if others is not None:  # the other heads: spread over the batch, as "diverse" does
      outs = others(x_in, training=False)
      outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
      loss += (DEFAULT_SPREAD_WEIGHT * float(batch) * losses_lib.spread_loss(outs)
               / float(len(outs)))
    return loss, tf.exp(log_p_y)

  # "stop" is the first version, kept for comparison with its own step size:
  # at 0.1 its first step overshoots the target it stops at.
  lr = options.learning_rate or (DEFAULT_LEARNING_RATE["labeled"] if hold
                                 else STOP_LEARNING_RATE)
  opt = losses_lib.BatchOptimizer((batch,) + classifier.input_shape, loss_fn, lr)
  xs, halfway, steps, reached = [], [], [], []
  counter = bar
  for b in range(n_batches):
    start = b * batch
    real = min(batch, n - start)
    y = np.zeros(batch, np.int32)
    t = np.full(batch, 0.5, np.float32)
    y[:real], t[:real] = targets[start:start + real], tau[start:start + real]
    tau_var.assign(t)
    # "hold" runs every step (threshold inf); "stop" masks a sample out once
    # it reaches its target. Padding slots never move.
    stop_at = np.full(batch, np.inf, np.float32) if hold else np.where(
        np.arange(batch) < real, t, np.inf).astype(np.float32)
    active = np.arange(batch) < real
    u0 = losses_lib.initial_u(rng, (batch,) + classifier.input_shape)
    base = counter.finished
    u, s, still = opt.run(u0, y, stop_at, active, options.max_steps,
                          step_postfix(counter, b, n_batches, options.max_steps) if hold else
                          (lambda act: counter.to(base + int(real - act[:real].sum()))))
    counter.to(base + real)
    xs.append(u[:real])
    halfway.append((u if opt.midway is None else opt.midway)[:real])
    steps.append(s[:real])
    reached.append(~still[:real])
  x = classifier.to_arrays(smooth(np.concatenate(xs)))
  x_midway = classifier.to_arrays(smooth(np.concatenate(halfway)))
  reached = None if hold else np.concatenate(reached)
  return GeneratedData(x=x, y=targets, steps=np.concatenate(steps).astype(np.int32),
                       target_confidences=tau, reached=reached, x_midway=x_midway,
                       info={"traces": opt.traces, "learning_rate": lr,
                             "objective": options.objective,
                             "batch_steps": opt.batch_steps, **opt.timing(),
                             "tv_weight": tv_weight, "l2_weight": l2_weight,
                             "tv_axes": list(spatial),
                             "bn_weight": bn_weight,
                             "batchnorm_layers": [l.name for l, *_ in bn_terms],
                             "spread_outputs": ([] if others is None
                                                else list(others.output_names)),
                             "jitter": options.jitter, "flip": options.flip,
                             "blur": smooth.sigma if smooth.radius else 0.0,
                             "loss_first_last": [list(p) for p in opt.losses]})


@register_generator(SynthesisMethod.ZEROQ)
def _zeroq(classifier: Classifier, options: SynthesisOptions, rng, bar) -> GeneratedData:
  """ZeroQ distilled data: batch statistics matched to every BN layer's moving ones."""
  model = classifier.model
  bns = losses_lib.batchnorm_layers(model)
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
  batch, n_batches = _batch_layout(options)
  lr = options.learning_rate or DEFAULT_LEARNING_RATE["zeroq"]
  opt = losses_lib.BatchOptimizer((batch,) + classifier.input_shape, loss_fn, lr)
  xs, steps = [], []
  counter = bar
  never = np.full(batch, np.inf, np.float32)
  for b in range(n_batches):
    real = min(batch, n - b * batch)
    u0 = losses_lib.initial_u(rng, (batch,) + classifier.input_shape)
    u, s, _ = opt.run(u0, np.zeros(batch, np.int32), never, np.ones(batch, bool),
                      options.max_steps)
    counter.to(counter.finished + real)
    xs.append(u[:real])  # padding samples shaped the statistics, then go
    steps.append(s[:real])
  x = classifier.to_arrays(np.concatenate(xs))
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
  u = losses_lib.initial_u(rng, (options.num_samples,) + classifier.input_shape)
  x = classifier.to_arrays(u)
  y = classifier.predict_labels(x)
  bar.update(options.num_samples)
  return GeneratedData(x=x, y=y)


def hidden_spread_outputs(model) -> List[Any]:
  """The outputs of ``model``'s weight layers that are not model outputs.

  What the "diverse" generator also spreads over the batch when the model has
  no usable BatchNorm. Layers called more than once (shared) are left out, as
  is everything inside nested models.

  Example:

  >>> from keras_mpq import model_zoo
  >>> [t.node.layer.name for t in hidden_spread_outputs(model_zoo.plain_cnn())]
  ['conv1', 'conv2', 'conv3', 'fc1']
  """
  outputs = set(model.output_names)
  return [layer.output for layer in layers_lib.quantizable_layers(model)
          if layer.name not in outputs and len(layer.inbound_nodes) == 1]


@register_generator(SynthesisMethod.DIVERSE)
def _diverse(classifier: Classifier, options: SynthesisOptions, rng, bar) -> GeneratedData:
  """Inputs for any model, labels or not: BatchNorm statistics, priors, spread outputs.

  The loss of a batch is the BatchNorm-statistics term of the labeled
  generator (where the model has usable BatchNorm), its smoothness and L2
  priors, and a spread term: minus the mean over every output value of the
  log of its standard deviation over the batch, so the samples do not all
  map to the same output (a set whose reconstructions are all alike teaches
  the activation ranges nothing). Without usable BatchNorm nothing else says
  how the hidden units should vary, so the spread term then also covers the
  output of every weight layer (`hidden_spread_outputs`), each counted like
  one more output: on the BatchNorm-free conv autoencoder of
  ``benchmarks/bench_any.py`` that kept data-free 4-bit ROC AUC within 0.01 of
  float on three quantize seeds where outputs alone lost up to 0.021 (the
  *Any Keras model* section of BENCHMARKS.md). Samples are labeled by the
  class head if there is one, else `keras_mpq.synthesis.classifier.NO_LABEL`.
  """
  model = classifier.full_model if classifier.full_model is not None else classifier.model
  n = options.num_samples
  batch, n_batches = _batch_layout(options)
  spatial = classifier.spatial_axes
  tv_weight, l2_weight = float(options.tv_weight), float(options.l2_weight)
  sample_axes = list(range(1, len(classifier.input_shape) + 1))
  full = dataclasses.replace(classifier, model=model, forward=model)
  bn_terms, _ = losses_lib.batchnorm_terms(full, options.bn_weight)
  bn_weight = float(options.bn_weight if options.bn_weight is not None
                    else DEFAULT_BN_WEIGHT) if bn_terms else 0.0
  hidden = [] if bn_terms else hidden_spread_outputs(model)
  taps = keras.Model(model.inputs,
                     [t[0].input for t in bn_terms] + hidden + list(model.outputs))
  n_bn = len(bn_terms)
  n_out = len(model.outputs)
  smooth = losses_lib.Blur(spatial, options.blur)

  def loss_fn(u, y):
    del y
    u = smooth(u)
    outs = taps(classifier.to_input(u), training=False)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    per_sample = tf.zeros([tf.shape(u)[0]], tf.float32)
    if tv_weight and spatial:
      per_sample += tv_weight * losses_lib.smoothness(u, spatial)
    if l2_weight:
      per_sample += l2_weight * tf.reduce_mean(tf.square(u), axis=sample_axes)
    loss = tf.reduce_sum(per_sample)
    spread = losses_lib.spread_loss(outs[n_bn:])
    loss += DEFAULT_SPREAD_WEIGHT * float(batch) * spread / float(n_out)
    if bn_weight:
      loss += bn_weight * float(batch) * losses_lib.batchnorm_loss(outs[:n_bn], bn_terms)
    return loss, tf.zeros([tf.shape(u)[0]], tf.float32)

  lr = options.learning_rate or DEFAULT_LEARNING_RATE["diverse"]
  opt = losses_lib.BatchOptimizer((batch,) + classifier.input_shape, loss_fn, lr)
  xs, halfway, steps = [], [], []
  never = np.full(batch, np.inf, np.float32)
  for b in range(n_batches):
    real = min(batch, n - b * batch)
    u0 = losses_lib.initial_u(rng, (batch,) + classifier.input_shape)
    u, s, _ = opt.run(u0, np.zeros(batch, np.int32), never, np.ones(batch, bool),
                      options.max_steps, step_postfix(bar, b, n_batches, options.max_steps))
    bar.to(bar.finished + real)
    xs.append(u[:real])
    halfway.append((u if opt.midway is None else opt.midway)[:real])
    steps.append(s[:real])
  x = classifier.to_arrays(smooth(np.concatenate(xs)))
  x_midway = classifier.to_arrays(smooth(np.concatenate(halfway)))
  return GeneratedData(x=x, y=classifier.predict_labels(x), x_midway=x_midway,
                       steps=np.concatenate(steps).astype(np.int32),
                       info={"traces": opt.traces, "learning_rate": lr,
                             "batch_steps": opt.batch_steps, **opt.timing(),
                             "tv_weight": tv_weight, "l2_weight": l2_weight,
                             "bn_weight": bn_weight, "spread_weight": DEFAULT_SPREAD_WEIGHT,
                             "batchnorm_layers": [t[0].name for t in bn_terms],
                             "hidden_spread_layers": [h.node.layer.name for h in hidden],
                             "blur": smooth.sigma if smooth.radius else 0.0,
                             "loss_first_last": [list(p) for p in opt.losses]})


# --------------------------------------------------------------------------- public


def _check_options(num_samples, batch_size, max_steps, confidence_range, tv_weight,
                   l2_weight, learning_rate, objective="hold", bn_weight=None, jitter=0,
                   flip=False, blur=0.0) -> SynthesisOptions:
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
  if objective not in OBJECTIVES:
    raise InvalidInputError(
        f"Expected objective in {OBJECTIVES}. Received: objective={objective!r}")
  if bn_weight is not None:
    bn_weight = non_negative(bn_weight, "bn_weight")
  if isinstance(jitter, bool) or not isinstance(jitter, (int, np.integer)) or jitter < 0:
    raise InvalidInputError(
        f"Expected jitter to be an integer >= 0. Received: jitter={jitter!r}")
  return SynthesisOptions(num_samples, batch_size, max_steps, (lo, hi),
                          non_negative(tv_weight, "tv_weight"),
                          non_negative(l2_weight, "l2_weight"), learning_rate,
                          objective, bn_weight, int(jitter), bool(flip),
                          non_negative(blur, "blur"))


def synthesize_with_info(model, num_samples: int = 256, method: str = "labeled",
                         seed: int = 0, input_range=None, batch_size: int = 64,
                         max_steps: Optional[int] = None,
                         confidence_range: Tuple[float, float] = DEFAULT_CONFIDENCE_RANGE,
                         tv_weight: float = DEFAULT_TV_WEIGHT,
                         l2_weight: float = DEFAULT_L2_WEIGHT,
                         learning_rate: Optional[float] = None,
                         progress: Optional[bool] = None, *, objective: str = "hold",
                         bn_weight: Optional[float] = None, jitter: Optional[int] = None,
                         flip: bool = False, blur: Optional[float] = None) -> SynthesisResult:
  """Synthesizes labeled calibration data from ``model``; returns a `SynthesisResult`.

  Args:
    model: a tf_keras classifier with inputs of fixed shape and one
      ``(batch, classes)`` output: logits, softmax probabilities, or a single
      sigmoid unit (binary: labels 0/1). With several inputs, ``x`` comes
      back as a list, one array per input each in its own range (all
      optimized together; no image priors: `Classifier.to_input`).
    num_samples: how many samples. With fewer samples than classes (a
      1000-class model), the labeled generator targets that many distinct
      classes, drawn at random (seeded).
    method: a registered generator: "labeled" (the paper's, default), "zeroq"
      (needs BatchNorm), "noise", or one added with `register_generator`.
    seed: makes the result repeatable (same seed, same arrays).
    input_range: ``(low, high)`` of valid inputs; default: read off a
      Rescaling/Normalization input layer, else [0, 1] (assumed, reported).
      Several inputs: also a list per input or a dict by input name
      (`keras_mpq.model.input_range.resolve_input_ranges`).
    batch_size: samples optimized together (the last batch is padded).
    max_steps: optimization steps per batch ("labeled" runs them all with
      ``objective="hold"``; "zeroq" too); None takes `DEFAULT_MAX_STEPS`.
    confidence_range: range of the per-sample target confidences ("labeled").
    tv_weight: weight of the total-variation prior ("labeled").
    l2_weight: weight of the L2 prior ("labeled").
    learning_rate: Adam step size in the [-1, 1]-scaled input space; None
      takes the method's default (`DEFAULT_LEARNING_RATE`; `STOP_LEARNING_RATE`
      for ``objective="stop"``).
    progress: show a progress bar; None: only when stderr is a terminal.
    objective: "hold" (default: KL to the soft target, every step run) or
      "stop" (the first version: cross-entropy, each sample stopped when it
      first reaches its target) ("labeled").
    bn_weight: weight of the BatchNorm-statistics term ("labeled"); None:
      `DEFAULT_BN_WEIGHT` where the model has BatchNorm; 0 turns it off.
    jitter: random shift of the inputs per step, in positions per spatial
      axis ("labeled"; 0 turns it off); None: `JITTER_SHARE` of the smallest
      spatial size.
    flip: random horizontal flips of images ("labeled"; off by default:
      digits and text are not mirror-symmetric).
    blur: standard deviation, in positions, of the Gaussian blur through
      which the labeled generator's inputs are made (`synthesis_losses.Blur`;
      0 turns it off); None: `BLUR_SHARE` of the smallest spatial size.

  Returns:
    A `SynthesisResult` with the inputs ``x``, labels ``y`` and per-sample
    confidences, steps and targets, plus the input range used and whether it
    was assumed.

  Raises:
    InvalidInputError: bad arguments (unknown method, too few samples, bad
      ranges).
    UnsupportedModelError: the model has no class head for "labeled", a
      non-float or unfixed input, or "zeroq" on a model without BatchNorm.

  Example:

  >>> from keras_mpq.base.compat import keras
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
  if max_steps is None:
    max_steps = DEFAULT_MAX_STEPS.get(name, DEFAULT_MAX_STEPS["labeled"])
  side = _smallest_side(model)
  if jitter is None:
    jitter = int(JITTER_SHARE * side)
  if blur is None:
    blur = BLUR_SHARE * side
  options = _check_options(num_samples, batch_size, max_steps, confidence_range,
                           tv_weight, l2_weight, learning_rate, objective, bn_weight,
                           jitter, flip, blur)
  classifier = inspect_classifier(model, input_range)
  rng = np.random.default_rng(int(seed))
  with Bar(options.num_samples, f"synthesize ({name})", progress, unit="sample") as bar:
    data = generator(classifier, options, rng, bar)
  y = np.asarray(data.y, np.int64)
  shapes = classifier.input_shapes if classifier.several else (classifier.input_shape,)
  x = (batching.map_inputs(lambda a: np.asarray(a, np.float32), list(data.x))
       if classifier.several and isinstance(data.x, (list, tuple))
       else np.asarray(data.x, np.float32))
  want = [(options.num_samples,) + tuple(s) for s in shapes]
  got = [a.shape for a in batching.as_list(x)]
  if got != want or y.shape != (options.num_samples,):
    raise InvalidInputError(
        f"Expected generator {name!r} to return x of shape "
        f"{want[0] if len(want) == 1 else want} and y of shape "
        f"({options.num_samples},). Received: {got[0] if len(got) == 1 else got} and "
        f"{y.shape}")
  if classifier.has_classes:
    log_p = classifier.predict_log_probs(x, batch_size=max(options.batch_size, 1))
    confidences = np.exp(np.take_along_axis(log_p, y[:, None], axis=1)[:, 0])
  else:  # no class head: no confidence to report
    confidences = np.full(len(y), np.nan, np.float32)
  reached = data.reached
  if reached is None and data.target_confidences is not None:
    # A "hold" sample reached its target when it ends within tolerance of it.
    reached = np.abs(confidences - data.target_confidences) <= HOLD_TOLERANCE
  steps = (np.zeros(len(y), np.int32) if data.steps is None
           else np.asarray(data.steps, np.int32))
  info = {"batch_size": min(options.batch_size, options.num_samples),
          "max_steps": options.max_steps,
          "confidence_range": list(options.confidence_range), **dict(data.info)}
  return SynthesisResult(
      x=x, y=y, confidences=confidences.astype(np.float32), steps=steps,
      target_confidences=data.target_confidences, reached=reached,
      method=name, input_range=classifier.input_range,
      input_range_source=classifier.input_range_source,
      assumed_range=classifier.assumed_range, num_classes=classifier.num_classes,
      output_kind=classifier.output_kind, seed=int(seed),
      seconds=time.perf_counter() - start, info=to_jsonable(info),
      x_midway=None if data.x_midway is None else batching.map_inputs(
          lambda a: np.asarray(a, np.float32), data.x_midway))


def synthesize(model, num_samples: int = 256, method: str = "labeled", seed: int = 0,
               input_range=None, batch_size: int = 64, max_steps: Optional[int] = None,
               confidence_range: Tuple[float, float] = DEFAULT_CONFIDENCE_RANGE,
               tv_weight: float = DEFAULT_TV_WEIGHT, l2_weight: float = DEFAULT_L2_WEIGHT,
               learning_rate: Optional[float] = None,
               progress: Optional[bool] = None, **kwargs) -> Tuple[np.ndarray, np.ndarray]:
  """Synthesizes labeled calibration data ``(x, y)`` from ``model`` alone.

  The same as `synthesize_with_info` (which documents the arguments), keeping
  only the inputs (float32) and labels (int64).

  Example:

  >>> from keras_mpq.base.compat import keras
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
      progress=progress, **kwargs)
  return result.x, result.y
