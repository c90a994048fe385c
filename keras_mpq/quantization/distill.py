"""Output distillation after quantization: each layer's scales and bias tuned to the float model.

`keras_mpq.quantization.optimize.optimize_weights` quantizes one layer at a time against its
own output; the errors of all layers still add up at the model's output. This
last step tunes, for every quantized weight layer, one factor per output
channel (its quantization scale) and its bias, so that the quantized model's
outputs on the calibration data match the float model's (KL divergence of the
class probabilities), with weights and activations quantized as planned.

The integers do not change. A channel's kernel becomes ``w0 * f`` (``w0`` the
optimized kernel, ``f`` its factor): the max-abs grid of ``w0 * f`` is ``f``
times that of ``w0``, so the fake quantizer, `keras_mpq.quantization.access.bake` and every
export keep ``w0``'s integers, only with a new scale. The gradient of a factor
is ``sum(dL/dw * w0)`` over the channel (the quantizer's straight-through
gradient); factors stay within `FACTOR_RANGE`.

Measured on the MNIST CNNs (`benchmarks/bench_quantizer.py --steps +adaround
+tune`, figures in ``benchmarks/results/quantizer.md``).

Example:

>>> qmodel = keras_mpq.apply_plan(model, plan, x, tune_steps=200)  # doctest: +SKIP
>>> from keras_mpq.quantization import distill
>>> distill.tune_report(qmodel)["kept"]  # doctest: +SKIP
True
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import numpy as np

from keras_mpq.base import batching, model_data
from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.progress import Bar
from keras_mpq.base.types import FLOAT_BITS

DEFAULT_STEPS = 200
"""Adam steps of `tune` for models up to `TUNE_MACS` (fewer above it)."""
MIN_STEPS = 25
"""Fewest steps the default gives a large model; below it tuning is skipped."""
TUNE_MACS = 2e11
"""Multiply-accumulates (steps x batch x MACs per sample) the default number of
steps may spend: the MNIST CNNs get `DEFAULT_STEPS`, larger models fewer."""
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
FACTOR_RANGE = (0.5, 2.0)
"""Bounds of each channel's scale factor."""
HOLDOUT = 0.25
"""Share of the calibration data held out to check the tuning: the tuned
values are kept only if the KL divergence on it went down (with at least
`MIN_HOLDOUT` held-out samples; fewer samples: checked on all of them)."""
MIN_HOLDOUT = 16
MIN_SAMPLES = 64
"""Fewest calibration samples the default tunes on (a held-out check of
`HOLDOUT` needs them); with fewer, only an explicit ``steps`` tunes."""

DATA_FREE_TEMPERATURE = 4.0
"""The tuning loss's temperature on synthetic data (1 with real data). On the
MNIST CNNs at 2 and 3 bits (two trained copies each, 1024 synthetic samples),
temperature 4 lost at most 0.45 points where tuning did not help, against up to
2 at temperature 1, and gained about as much elsewhere; with real data,
temperature 1 was better (issue 13). Data-free, `keras_mpq.quantize` tunes only
where the budget forces layers below 3 bits: above, tuning on synthetic data
moved accuracy by -0.4 to +0.85 points (+0.15 on average), below by up to +14."""
TUNE_REPORT = "tune report"
"""`keras_mpq.base.model_data` key: what `tune` did to a model."""


def default_steps(macs_per_sample: Optional[float], batch_size: int = BATCH_SIZE) -> int:
  """Steps `tune` takes when not told: `DEFAULT_STEPS` within `TUNE_MACS`, 0 when too few.

  >>> default_steps(5e6)
  200
  >>> default_steps(1e9)
  0
  """
  if not macs_per_sample:
    return DEFAULT_STEPS
  steps = int(TUNE_MACS / (float(macs_per_sample) * batch_size))
  steps = min(DEFAULT_STEPS, steps)
  return steps if steps >= MIN_STEPS else 0


def check_steps(steps) -> Optional[int]:
  """``steps`` as an int >= 0 (or None, the default); anything else is an `InvalidInputError`."""
  if steps is None:
    return None
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
    raise InvalidInputError(
        f"Expected tune_steps as an integer >= 0 (0: no tuning) or None (the default). "
        f"Received: tune_steps={steps!r}")
  return int(steps)


def _tunable(qmodel):
  """[(wrapper, [(kernel var, reduce axes)], bias var or None)] of the integer-bit layers."""
  from keras_mpq.quantization import access as access_lib  # pylint: disable=g-import-not-at-top
  found = []
  for w in access_lib.weight_wrappers(qmodel):  # pylint: disable=protected-access
    if access_lib.get_weight_bits_of(w) == FLOAT_BITS:
      continue
    kernels = access_lib.kernels_of(w)  # pylint: disable=protected-access
    if kernels:
      found.append((w, kernels, access_lib.bias_of(w)))  # pylint: disable=protected-access
  return found


def _kl(teacher_logp, logp):
  """Mean over the batch of KL(teacher || student) from log-probabilities."""
  return tf.reduce_mean(tf.reduce_sum(tf.exp(teacher_logp) * (teacher_logp - logp), axis=-1))


def tune(qmodel, float_model, x, steps: Optional[int] = None, batch_size: int = BATCH_SIZE,
         learning_rate: float = LEARNING_RATE, seed: int = 0,
         holdout: float = HOLDOUT, temperature: float = 1.0,
         progress: bool = False) -> Dict[str, Any]:
  """Tunes ``qmodel``'s per-channel scales and biases in place to match ``float_model``.

  Args:
    qmodel: a quantized model from `keras_mpq.quantization.apply.apply_plan` (calibrated).
    float_model: the float model it was made from (BatchNorm folded or not).
    x: calibration inputs (synthetic or real).
    steps: Adam steps (None: `default_steps` for the model's size; 0: none).
    batch_size: samples per step.
    learning_rate: Adam's learning rate.
    seed: the batches' order.
    holdout: share of ``x`` kept out of the tuning to check it (`HOLDOUT`).
    temperature: softens both models' class probabilities in the tuning loss
      (the held-out check is at temperature 1); `DATA_FREE_TEMPERATURE` is
      what `keras_mpq.quantize` uses on synthetic data.
    progress: a progress bar over the steps.

  Returns:
    A report: steps taken, the held-out KL before and after, whether the tuned
    values were kept (they are restored when the held-out KL did not drop or
    went non-finite), seconds, and a reason when nothing was tuned. Also kept
    for `tune_report`.

  >>> info = tune(qmodel, folded, x[:256], steps=200)  # doctest: +SKIP
  >>> info["kl_after"] < info["kl_before"]  # doctest: +SKIP
  True
  """
  from keras_mpq.model import outputs as outputs_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.model import size as size_lib  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  x = batching.map_inputs(lambda a: np.asarray(a, dtype=np.float32), x)
  for a in batching.as_list(x):
    finite = bool(np.all(np.isfinite(a)))
    if a.ndim < 2 or len(a) == 0 or not finite:
      raise InvalidInputError(
          f"Expected calibration inputs x as a finite array (N, ...) with N >= 1. Received: "
          f"shape {a.shape}" + ("" if finite else ", with NaN/Inf"))
  n_x = batching.num_samples(x)
  steps = check_steps(steps)
  if not 0 <= holdout < 1:
    raise InvalidInputError(f"Expected holdout in [0, 1). Received: {holdout!r}")
  if not np.isfinite(temperature) or temperature <= 0:
    raise InvalidInputError(f"Expected temperature > 0. Received: {temperature!r}")
  info: Dict[str, Any] = {"steps": 0, "kept": False, "kl_before": None, "kl_after": None,
                          "reason": None}
  layers = _tunable(qmodel)
  out_shape = tuple(float_model.outputs[0].shape)
  if steps is None:
    macs = sum(float(c.macs or 0) for c in size_lib.layer_costs(float_model))
    steps = default_steps(macs, batch_size)
    if steps == 0:
      info["reason"] = (f"model too large for the default ({macs:.3g} MACs per sample); "
                        "pass tune_steps to tune anyway")
    elif n_x < MIN_SAMPLES:
      info["reason"], steps = (f"{n_x} calibration samples, fewer than the default needs "
                               f"({MIN_SAMPLES}); pass tune_steps to tune anyway"), 0
  if steps and not layers:
    info["reason"], steps = "no quantized weight layer", 0
  if steps and not outputs_lib.heads_of(float_model).classifier:
    info["reason"], steps = ("not a single-label classifier: tuning matches class "
                             "probabilities, so it runs on classifiers only"), 0
  elif steps and len(out_shape) != 2:
    info["reason"], steps = f"output of shape {out_shape} is not (batch, classes)", 0
  if not steps:
    info["seconds"] = round(time.perf_counter() - start, 3)
    model_data.put(qmodel, TUNE_REPORT, info)
    return info

  rng = np.random.default_rng(seed)
  order = rng.permutation(n_x)
  n_check = int(round(n_x * holdout))
  if n_check >= MIN_HOLDOUT and n_x - n_check >= 1:
    check, train = batching.take(x, order[:n_check]), batching.take(x, order[n_check:])
  else:
    check, train = x, x
  from_logits = not outputs_lib.outputs_are_probabilities(float_model, x)  # pylint: disable=protected-access

  def log_probs(model, data):
    return tf.concat([outputs_lib.to_log_probs(
        model(tf.nest.map_structure(tf.constant, batching.take(data, s)), training=False),
        from_logits) for s in batching.batch_slices(batching.num_samples(data), 256)], axis=0)

  t = float(temperature)

  teacher_train = tf.nn.log_softmax(log_probs(float_model, train) / t, axis=-1)
  teacher_check = log_probs(float_model, check)

  kernels, origins, factors, axes_of, biases = [], [], [], [], []
  for _, kv, bias in layers:
    for var, axes in kv:
      w0 = var.numpy()
      shape = [1 if a in axes else d for a, d in enumerate(w0.shape)]
      kernels.append(var)
      origins.append(tf.constant(w0))
      axes_of.append(list(axes))
      factors.append(tf.Variable(tf.ones(shape, var.dtype), trainable=True))
    if bias is not None:
      biases.append(bias)
  saved_biases = [b.numpy() for b in biases]
  lo, hi = FACTOR_RANGE
  optimizer = keras.optimizers.Adam(learning_rate)
  params = factors + biases
  optimizer.build(params)

  @tf.function
  def step(batch, target):
    with tf.GradientTape() as tape:
      tape.watch(kernels)
      logp = outputs_lib.to_log_probs(qmodel(batch, training=False), from_logits)
      loss = _kl(target, tf.nn.log_softmax(logp / t, axis=-1))
    grads = tape.gradient(loss, kernels + biases)
    grad_f = [tf.reduce_sum(g * w0, axis=a, keepdims=True)
              for g, w0, a in zip(grads[:len(kernels)], origins, axes_of)]
    grad_b = [tf.zeros_like(b) if g is None else g for g, b in zip(grads[len(kernels):], biases)]
    optimizer.apply_gradients(zip(grad_f + grad_b, params))
    for f, k, w0 in zip(factors, kernels, origins):
      f.assign(tf.clip_by_value(f, lo, hi))
      k.assign(w0 * f)
    return loss

  def check_kl():
    return float(_kl(teacher_check, log_probs(qmodel, check)).numpy())

  info["kl_before"] = check_kl()
  bar = Bar(steps, "tune scales+biases", bool(progress), unit="step")
  def restore():
    for k, w0 in zip(kernels, origins):
      k.assign(w0)
    for b, v in zip(biases, saved_biases):
      b.assign(v)

  n_train = batching.num_samples(train)
  size = min(batch_size, n_train)
  try:
    for _ in range(steps):
      idx = rng.choice(n_train, size=size, replace=False)
      step(tf.nest.map_structure(tf.constant, batching.take(train, idx)),
           tf.gather(teacher_train, idx))
      bar.update(1)
  except BaseException:  # interrupted: the model goes back to its untuned values
    restore()
    raise
  finally:
    bar.close()
  info["steps"] = int(steps)
  info["kl_after"] = check_kl()
  info["kept"] = bool(np.isfinite(info["kl_after"]) and info["kl_after"] < info["kl_before"])
  info["factor_range"] = [float(min(float(tf.reduce_min(f)) for f in factors)),
                          float(max(float(tf.reduce_max(f)) for f in factors))]
  if not info["kept"]:
    restore()
    info["reason"] = "held-out KL did not drop: restored the untuned values"
  info["holdout_samples"] = int(batching.num_samples(check)) if check is not train else 0
  info["temperature"] = t
  info["seconds"] = round(time.perf_counter() - start, 3)
  model_data.put(qmodel, TUNE_REPORT, info)
  return info


def tune_report(qmodel) -> Dict[str, Any]:
  """What `tune` did to ``qmodel`` (empty when it never ran).

  >>> tune_report(qmodel)["steps"]  # doctest: +SKIP
  200
  """
  return dict(model_data.get(qmodel, TUNE_REPORT, {}))
