"""`Classifier`: a tf_keras model as the synthetic-data generators see it.

`inspect_classifier` checks the model, finds its classes, its input range
and what its output is (`keras_mpq.model.outputs.OUTPUT_KINDS`), looking
through a final softmax or sigmoid to the logits underneath where it can.
A model with several outputs is seen through its one class head, if it has
one (`keras_mpq.model.outputs.Heads.class_head`); a model with none (an
autoencoder, a regression) has no classes (``num_classes`` 0, output kind
``none``): the generators that need labels refuse it, the others label
every sample -1.

>>> c = inspect_classifier(model)  # doctest: +SKIP
>>> c.num_classes, c.output_kind  # doctest: +SKIP
(10, 'logits')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import numpy as np

from keras_mpq.base import batching
from keras_mpq.base.compat import is_keras3_model, keras, tf
from keras_mpq.base.errors import InvalidInputError, UnsupportedModelError
from keras_mpq.model import input_range as input_range_lib
from keras_mpq.model import inputs as inputs_lib
from keras_mpq.model import outputs as outputs_lib

LOG_EPS = 1e-30
"""Smallest probability the generators take the log of."""
OUTPUT_KINDS = outputs_lib.OUTPUT_KINDS
NO_CLASSES = "none"
"""`Classifier.output_kind` of a model with no class head."""
NO_LABEL = -1
"""The label of every sample of a model with no class head."""


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
  full_model: Any = None  # the whole model (``model`` is its class head's sub-model)
  heads: Any = None  # `keras_mpq.model.outputs.Heads` of the whole model
  input_shapes: Tuple[Tuple[int, ...], ...] = ()  # several inputs: each one's shape
  input_ranges: Tuple[Tuple[float, float], ...] = ()  # several inputs: each one's range
  input_names: Tuple[str, ...] = ()

  @property
  def several(self) -> bool:
    """True for a model with several inputs: ``u`` packs them all, flat (`to_input`)."""
    return len(self.input_shapes) > 1

  @property
  def has_classes(self) -> bool:
    """False for a model with no class head (labels are `NO_LABEL`)."""
    return self.num_classes > 0

  @property
  def spatial_axes(self) -> Tuple[int, ...]:
    """Axes of a batch that TV runs along: all but batch and channels."""
    rank = len(self.input_shape) + 1
    return tuple(range(1, rank - 1)) if rank >= 3 else ()

  def to_input(self, u):
    """Maps ``u`` in [-1, 1] to the model's input range.

    With several inputs ``u`` is ``(batch, sum of the inputs' sizes)``, each
    input's values side by side (``input_shape`` is that flat size): each
    part is reshaped to its input's shape and mapped to its own range, and a
    list of tensors, one per input, comes back. The generators optimise all
    of them together as one ``u``.
    """
    if not self.several:
      low, high = self.input_range
      return (high + low) / 2.0 + (high - low) / 2.0 * u
    parts, start = [], 0
    for shape, (low, high) in zip(self.input_shapes, self.input_ranges):
      size = int(np.prod(shape))
      part = tf.reshape(u[:, start:start + size], (-1,) + tuple(shape))
      parts.append((high + low) / 2.0 + (high - low) / 2.0 * part)
      start += size
    return parts

  def to_arrays(self, u):
    """`to_input` of ``u`` as float32 numpy: one array, or a list per input."""
    return batching.map_inputs(lambda t: np.asarray(t, np.float32), self.to_input(u))

  def log_probs(self, x):
    """``(batch, num_classes)`` log-probabilities of a batch (tensor in, tensor out)."""
    return self.logits_to_log_probs(self.forward(x, training=False))

  def logits_to_log_probs(self, out):
    """What ``forward`` returned, as ``(batch, num_classes)`` log-probabilities."""
    out = tf.reshape(tf.cast(out, tf.float32),
                     [-1, 1 if self.output_kind.startswith("sigmoid") else self.num_classes])
    return outputs_lib.log_probs(out, self.output_kind, floor=LOG_EPS, margin=0.0)

  def predict_log_probs(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Eager-friendly `log_probs` over an array, in batches."""
    fn = _compiled(self, "_predict_fn", lambda: tf.function(self.log_probs))
    n = batching.num_samples(x)
    batch_size = max(1, min(batch_size, n))
    parts = []
    for i in range(0, n, batch_size):
      chunk = batching.map_inputs(lambda a: np.asarray(a, np.float32),
                                  batching.take(x, slice(i, i + batch_size)))
      real = batching.num_samples(chunk)
      if real < batch_size:  # pad: one batch shape, one trace
        chunk = batching.map_inputs(
            lambda a: np.concatenate([a, np.repeat(a[-1:], batch_size - real, 0)]), chunk)
      parts.append(fn(tf.nest.map_structure(tf.constant, chunk)).numpy()[:real])
    return np.concatenate(parts, axis=0)

  def predict_labels(self, x: np.ndarray) -> np.ndarray:
    """The model's argmax labels for ``x`` (int64; `NO_LABEL` without a class head)."""
    if not self.has_classes:
      return np.full(batching.num_samples(x), NO_LABEL, np.int64)
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

  >>> from keras_mpq.base.compat import keras
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
  shapes = [tuple(t.shape)[1:] for t in inputs]
  for t, in_shape in zip(inputs, shapes):
    if any(d is None for d in in_shape):
      raise UnsupportedModelError(
          "Expected a fixed input shape apart from the batch. Received: input "
          f"shape {(None,) + in_shape}; rebuild the model with a fixed shape, e.g. "
          "keras.Input((224, 224, 3)).")
    if not tf.as_dtype(t.dtype).is_floating:
      raise UnsupportedModelError(
          f"Expected a float input (synthesis differentiates through it). Received: "
          f"input dtype {t.dtype}; cast inside the model instead.")
  heads = outputs_lib.heads_of(model)
  ranges = input_range_lib.resolve_input_ranges(model, input_range)
  head = heads.class_head()
  shapes = tuple(tuple(int(d) for d in in_shape) for in_shape in shapes)
  if len(inputs) == 1:
    (low, high, source, assumed), = ranges
    common = dict(input_shape=shapes[0], input_range=(low, high),
                  input_range_source=source, assumed_range=assumed, full_model=model,
                  heads=heads)
    probe_ranges = (low, high)
  else:  # several inputs: ``u`` packs them flat, side by side (`Classifier.to_input`)
    names = tuple(inputs_lib.input_names(model))
    probe_ranges = [(r[0], r[1]) for r in ranges]
    common = dict(input_shape=(int(sum(np.prod(s) for s in shapes)),),
                  input_range=tuple(probe_ranges),
                  input_range_source="; ".join(f"{n}: {r[2]}" for n, r in zip(names, ranges)),
                  assumed_range=any(r[3] for r in ranges), full_model=model, heads=heads,
                  input_shapes=shapes, input_ranges=tuple(probe_ranges), input_names=names)
  if head is None:
    _probe_outputs(model, probe_ranges)
    return Classifier(model=model, forward=model, output_kind=NO_CLASSES, num_classes=0,
                      **common)
  sub = model
  if len(model.outputs) > 1:
    tensor = model.outputs[heads.names.index(head.name)]
    sub = keras.Model(model.inputs, tensor, name=f"{model.name}_{head.name}")
  units = int(sub.outputs[0].shape[-1])
  forward, kind = _output_head(sub, units, probe_ranges)
  return Classifier(model=sub, forward=forward, output_kind=kind,
                    num_classes=2 if units == 1 else units, **common)


def _probe_outputs(model, input_range) -> None:
  """Runs ``model`` on `_probe_batch`; refuses errors and non-finite outputs."""
  try:
    outs = model(_probe_batch(model, input_range), training=False)
  except Exception as e:  # pylint: disable=broad-except
    raise UnsupportedModelError(
        f"Expected the model to run on a batch of its input shape. Received an "
        f"error from model {model.name!r}: {type(e).__name__}: {str(e)[:300]}") from None
  for out in tf.nest.flatten(outs):
    if not np.all(np.isfinite(np.asarray(out, np.float64))):
      raise UnsupportedModelError(
          f"Expected finite outputs from model {model.name!r} on inputs in "
          f"{input_range}; got NaN/Inf. Check the input_range and the weights.")


def _output_head(model, units, input_range):
  """(forward, output_kind): logits under a final softmax/sigmoid when reachable."""
  out = model.outputs[0]
  layer = getattr(getattr(out, "_keras_history", None), "layer", None)
  act = outputs_lib.final_activation(layer)
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
  return model, outputs_lib.output_kind(reference)


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


def _probe_batch(model, input_ranges):
  """Eight inputs spread over each input's range: constant low/mid/high, and noise.

  ``input_ranges``: ``(low, high)`` for a model with one input, else a list per input.
  """
  rng = np.random.default_rng(1234)
  if len(model.inputs) == 1:
    input_ranges = [input_ranges]
  batch = []
  for t, (low, high) in zip(model.inputs, input_ranges):
    shape = tuple(int(d) for d in t.shape[1:])
    u = np.concatenate([np.full((1,) + shape, v, np.float32) for v in (-1.0, 0.0, 1.0)]
                       + [rng.uniform(-1, 1, (5,) + shape).astype(np.float32)])
    batch.append(tf.constant((high + low) / 2 + (high - low) / 2 * u, tf.float32))
  return batch[0] if len(batch) == 1 else batch
