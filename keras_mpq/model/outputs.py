"""The one place that knows what a model's output is, and how to read it.

A classifier's output is one of `OUTPUT_KINDS`: logits or softmax
probabilities over classes, or one sigmoid unit (its probability or its
logit). `classifier_head` checks a model's head from its layers;
`output_kind` reads the kind off output values; `log_probs` turns any kind
into ``(batch, classes)`` log-probabilities, which the sensitivity metrics,
the synthesis objective and the tuning loss all use.

>>> import numpy as np
>>> output_kind(np.array([[0.2, 0.8], [0.5, 0.5]]))
'softmax'
>>> output_kind(np.array([[2.0, -1.0]]))
'logits'
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import UnsupportedModelError

OUTPUT_KINDS = ("logits", "softmax", "sigmoid_logit", "sigmoid")
"""What a classifier outputs: logits or softmax over classes; one sigmoid unit's logit or probability."""
PROBABILITY_KINDS = ("softmax", "sigmoid")
LOG_FLOOR = 1e-12
"""Smallest probability `log_probs` takes the log of (softmax and sigmoid outputs)."""
SIGMOID_MARGIN = 1e-7
"""How close to 1 `log_probs` lets a sigmoid probability get (so ``log(1 - p)`` stays finite)."""

# Final activations of a classifier head (logits are 'linear').
_CLASSIFIER_ACTIVATIONS = ("linear", "softmax", "sigmoid")


def classifier_head(model) -> str:
  """What a checked model's output is: 'classes' (logits or softmax) or 'binary'.

  ``keras_mpq.quantize`` measures sensitivity as a classification loss, so it
  takes classifiers only: logits or softmax over two or more classes, or one
  sigmoid unit (a binary classifier, handled as two classes). Called before
  the slow stages; refuses regression-like heads (one linear unit, or a last
  activation such as relu or tanh) with what to do instead.

  >>> from keras_mpq.base.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
  >>> classifier_head(m)
  'binary'
  """
  out = model.outputs[0]
  units = out.shape[-1]
  layer = getattr(getattr(out, "_keras_history", None), "layer", None)
  act = final_activation(layer)
  if units == 1 and act == "sigmoid":
    return "binary"
  if units == 1 or act not in _CLASSIFIER_ACTIVATIONS + (None,):
    what = (f"one output unit with activation {act!r}" if units == 1
            else f"{units} outputs with final activation {act!r}")
    raise UnsupportedModelError(
        "Expected a classifier: logits or softmax over 2 or more classes, or one "
        "sigmoid unit (a binary classifier). Received: model "
        f"{model.name!r} ends in layer {getattr(layer, 'name', '?')!r} with {what}, a "
        "regression (non-classification) head. keras_mpq.quantize measures "
        "sensitivity with a classification loss, with synthetic or real data, so it "
        "does not quantize such a model. If it is a binary classifier that outputs "
        "a logit, end it with keras.layers.Activation('sigmoid'). For a regression "
        "model, use the stages that need no labels, with real inputs x: "
        "table = keras_mpq.measure_sensitivity(model, None, metric='weight_mse'); "
        "plan = keras_mpq.allocate(table, budget, keras_mpq.cost_table(model)); "
        "keras_mpq.export_tflite(model, path, plan, calibration_data=x).")
  if act == "sigmoid":
    raise UnsupportedModelError(
        "Expected a single-label classifier (softmax or logits over classes, or one "
        f"sigmoid unit). Received: {units} sigmoid units in layer {layer.name!r} "
        "(multi-label); keras_mpq needs one class per sample.")
  return "classes"


def final_activation(layer) -> Optional[str]:
  """Name of the activation a layer applies last ('softmax' for Softmax), or None."""
  if layer is None:
    return None
  if isinstance(layer, keras.layers.Softmax):
    return "softmax"
  if isinstance(layer, keras.layers.ReLU):
    return "relu"
  act = getattr(layer, "activation", None)
  if act is None:
    return None
  try:
    name = keras.activations.serialize(act)
  except (ValueError, TypeError):
    name = getattr(act, "__name__", None)
  return name if isinstance(name, str) else None


def output_kind(values) -> str:
  """Which of `OUTPUT_KINDS` a classifier's ``(batch, units)`` output values are.

  Rows in [0, 1] summing to 1 are softmax probabilities, other rows logits;
  one unit (a binary classifier) is a sigmoid probability when it lies in
  [0, 1], else its logit.
  """
  out = np.asarray(values, dtype=np.float64)
  in_unit = bool(np.all(out >= 0) and np.all(out <= 1 + 1e-6))
  if out.ndim == 2 and out.shape[1] == 1:
    return "sigmoid" if in_unit else "sigmoid_logit"
  sums_to_one = bool(np.allclose(out.sum(axis=-1), 1.0, atol=1e-3))
  return "softmax" if in_unit and sums_to_one else "logits"


def outputs_are_probabilities(model, x) -> bool:
  """True when ``model``'s outputs on ``x[:64]`` are probabilities (`output_kind`), else logits."""
  return output_kind(model(x[:64], training=False)) in PROBABILITY_KINDS


def num_classes_of(model) -> int:
  """Classes of a classifier's output: its units, or 2 for one sigmoid/logit unit."""
  return max(2, int(model.outputs[0].shape[-1]))


def log_probs(out, kind: str, floor: float = LOG_FLOOR, margin: float = SIGMOID_MARGIN):
  """``(batch, classes)`` log-probabilities of a classifier output of `OUTPUT_KINDS` ``kind``.

  One unit is a binary classifier's sigmoid probability (or logit) of class
  1, so it becomes two columns, ``log(1 - p)`` and ``log(p)``, with ``p`` at
  most ``1 - margin``. Probabilities below ``floor`` count as ``floor``.
  """
  out = tf.cast(out, tf.float32)
  if kind == "logits":
    return tf.nn.log_softmax(out, axis=-1)
  if kind == "sigmoid_logit":
    return tf.concat([tf.math.log_sigmoid(-out), tf.math.log_sigmoid(out)], axis=-1)
  if kind == "sigmoid":
    p = tf.minimum(out, 1.0 - margin)
    out = tf.concat([1.0 - p, p], axis=-1)
  return tf.math.log(tf.maximum(out, floor))


def to_log_probs(out, from_logits: bool):
  """`log_probs` of a classifier output (a tensor): logits when ``from_logits``, else probabilities."""
  binary = out.shape[-1] == 1
  kind = ({True: "sigmoid_logit", False: "sigmoid"} if binary else
          {True: "logits", False: "softmax"})[bool(from_logits)]
  return log_probs(out, kind)


def predicted_labels(model, x: np.ndarray, from_logits: bool,
                     batch_size: int = 128) -> np.ndarray:
  """The float model's class for each input (argmax; for one unit: p > 0.5)."""
  out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
  if out.ndim == 2 and out.shape[1] == 1:
    return (out[:, 0] > (0.0 if from_logits else 0.5)).astype(np.int64)
  return np.argmax(out, axis=-1).astype(np.int64)


def compile_for_evaluation(qmodel, folded, x) -> None:
  """Compiles ``qmodel`` so ``evaluate(x, y)`` with integer labels works as returned.

  Loss: sparse categorical cross-entropy (binary for one output unit), from
  logits unless the float model's outputs are probabilities; metric:
  accuracy; optimizer: Adam, for quantization-aware fine-tuning with ``fit``.
  Compile again for another loss. Models whose output is not (batch, units)
  are left uncompiled.
  """
  out = np.asarray(folded(x[:64], training=False), dtype=np.float64)
  if out.ndim != 2:
    return
  probabilities = output_kind(out) in PROBABILITY_KINDS
  if out.shape[1] == 1:
    loss = keras.losses.BinaryCrossentropy(from_logits=not probabilities)
  else:
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
  qmodel.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss, metrics=["accuracy"])
