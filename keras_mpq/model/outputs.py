"""The one place that knows what a model's outputs are, and how to read them.

Every output of a model is a `Head` of a `HeadKind`: softmax probabilities
or logits over its last axis, independent sigmoid probabilities (one
binary unit, or one per pixel), or linear values (regression,
reconstruction, embeddings, boxes). `heads_of` reads them off a model's
layers; `Heads.classifier` says whether the model is a single-label
classifier, which keeps the classification path (labeled synthesis, KL or
cross-entropy on ``(batch, classes)`` log-probabilities from `log_probs`).
Any other model is measured by its outputs' distortion (`Heads.distortion`):
per head, KL for softmax and logits, per-unit binary KL for sigmoid, and the
squared error over the float output's variance for linear heads, summed
with the heads' weights.

>>> import numpy as np
>>> output_kind(np.array([[0.2, 0.8], [0.5, 0.5]]))
'softmax'
>>> output_kind(np.array([[2.0, -1.0]]))
'logits'
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from keras_mpq.base import batching, model_data
from keras_mpq.base.choices import HeadKind
from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import InvalidInputError, UnsupportedModelError
OUTPUT_KINDS = ("logits", "softmax", "sigmoid_logit", "sigmoid")
"""What a classifier outputs: logits or softmax over classes; one sigmoid unit's logit or probability."""
PROBABILITY_KINDS = ("softmax", "sigmoid")
LOG_FLOOR = 1e-12
"""Smallest probability `log_probs` takes the log of (softmax and sigmoid outputs)."""
SIGMOID_MARGIN = 1e-7
"""How close to 1 `log_probs` lets a sigmoid probability get (so ``log(1 - p)`` stays finite);
`Heads.features` keeps a sigmoid head's probabilities this far from 0 and 1 too."""


HEADS = "heads"
"""`keras_mpq.base.model_data` key: the `Heads` resolved for a model (overrides included)."""
VARIANCE_FLOOR = 1e-12
"""Smallest variance a linear head is normalized by (relative to its mean square)."""


@dataclasses.dataclass(frozen=True)
class Head:
  """One output of a model: its name, `HeadKind`, per-sample shape and weight.

  >>> Head("box", "linear", (4,)).size
  4
  """

  name: str
  kind: str
  shape: Tuple[Optional[int], ...]
  weight: float = 1.0

  @property
  def size(self) -> Optional[int]:
    """Values per sample (None when a dimension is unknown)."""
    if any(d is None for d in self.shape):
      return None
    return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

  @property
  def is_class_head(self) -> bool:
    """A ``(batch, classes)`` softmax or logits head over two or more classes."""
    return (self.kind in (HeadKind.SOFTMAX, HeadKind.LOGITS) and len(self.shape) == 1
            and (self.shape[0] or 0) >= 2)

  def to_dict(self) -> Dict[str, Any]:
    return {"name": self.name, "kind": str(self.kind), "shape": list(self.shape),
            "weight": float(self.weight)}


@dataclasses.dataclass(frozen=True)
class Heads:
  """A model's outputs in order, and the distortion measure over them.

  >>> heads = Heads((Head("class", "softmax", (3,)), Head("box", "linear", (4,))))
  >>> heads.classifier, heads.class_head().name
  (False, 'class')
  """

  heads: Tuple[Head, ...]

  def __len__(self) -> int:
    return len(self.heads)

  @property
  def names(self) -> List[str]:
    return [h.name for h in self.heads]

  @property
  def classifier(self) -> bool:
    """One output that is a single-label classifier: the classification path.

    Logits or softmax over two or more classes, or one sigmoid unit (a binary
    classifier), of shape ``(batch, units)``.
    """
    if len(self.heads) != 1:
      return False
    head = self.heads[0]
    return head.is_class_head or (head.kind == HeadKind.SIGMOID and tuple(head.shape) == (1,))

  def class_head(self) -> Optional[Head]:
    """The head labeled synthesis aims at: the model itself when a classifier,
    else the only ``(batch, classes)`` softmax or logits head; None otherwise."""
    if self.classifier:
      return self.heads[0]
    found = [h for h in self.heads if h.is_class_head]
    return found[0] if len(found) == 1 else None

  def to_dict(self) -> Dict[str, Any]:
    return {"classifier": self.classifier, "heads": [h.to_dict() for h in self.heads]}

  # --- features and distortion

  def features(self, outs):
    """``(batch, D)`` float32 features of the outputs (a tensor or a list of them).

    Softmax and logits heads give log-probabilities over their last axis,
    sigmoid heads their probabilities, linear heads their values; each
    flattened, in head order. `distortion` compares two such rows.
    """
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    parts = []
    for head, out in zip(self.heads, outs):
      out = tf.cast(out, tf.float32)
      if head.kind == HeadKind.LOGITS:
        out = tf.nn.log_softmax(out, axis=-1)
      elif head.kind == HeadKind.SOFTMAX:
        out = tf.math.log(tf.maximum(out, LOG_FLOOR))
      elif head.kind == HeadKind.SIGMOID:
        out = tf.clip_by_value(out, SIGMOID_MARGIN, 1.0 - SIGMOID_MARGIN)
      parts.append(tf.reshape(out, [tf.shape(out)[0], -1]))
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)

  def raw(self, outs):
    """``(batch, D)`` float32: every output flattened as it is, in head order (see `split`)."""
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    parts = [tf.reshape(tf.cast(o, tf.float32), [tf.shape(o)[0], -1]) for o in outs]
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)

  def split(self, features: np.ndarray):
    """The outputs back from `raw` features: an array, or a list of them for several heads."""
    f = np.asarray(features)
    outs = [f[:, s].reshape((len(f),) + tuple(-1 if d is None else d for d in h.shape))
            for h, s in zip(self.heads, self._slices(f.shape[1]))]
    return outs[0] if len(outs) == 1 else outs

  def _slices(self, width: int) -> List[slice]:
    sizes = [h.size for h in self.heads]
    if None in sizes:  # unknown dimensions: one head takes what the others leave
      known = sum(s for s in sizes if s is not None)
      sizes = [width - known if s is None else s for s in sizes]
    bounds = np.cumsum([0] + sizes)
    if bounds[-1] != width:
      raise InvalidInputError(
          f"Expected output features of width {bounds[-1]} for heads {self.names}. "
          f"Received: width {width}.")
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

  def scales(self, reference: np.ndarray) -> np.ndarray:
    """Each head's normalizer from the float model's features over the data.

    Linear heads: the mean over units of the output's variance over samples
    (floored at `VARIANCE_FLOOR` of its mean square); other heads: 1.
    """
    ref = np.asarray(reference, np.float64)
    out = np.ones(len(self.heads))
    for i, (head, s) in enumerate(zip(self.heads, self._slices(ref.shape[1]))):
      if head.kind == HeadKind.LINEAR:
        part = ref[:, s]
        var = float(np.mean(np.var(part, axis=0))) if len(part) > 1 else 0.0
        floor = VARIANCE_FLOOR * max(float(np.mean(part * part)), 1.0)
        out[i] = max(var, floor)
    return out

  def head_distortion(self, features: np.ndarray, reference: np.ndarray,
                      scales: Sequence[float]) -> np.ndarray:
    """``(batch, heads)`` distortion of each head from the float ``reference`` features."""
    q = np.asarray(features, np.float64)
    f = np.asarray(reference, np.float64)
    cols = []
    for head, s, scale in zip(self.heads, self._slices(f.shape[1]), scales):
      fq, ff = q[:, s], f[:, s]
      if head.kind in (HeadKind.LOGITS, HeadKind.SOFTMAX):
        classes = int(head.shape[-1] or 1)
        fq = fq.reshape(len(fq), -1, classes)
        ff = ff.reshape(len(ff), -1, classes)
        term = np.mean(np.sum(np.exp(ff) * (ff - fq), axis=-1), axis=1)
      elif head.kind == HeadKind.SIGMOID:
        term = np.mean(ff * (np.log(ff) - np.log(fq))
                       + (1 - ff) * (np.log1p(-ff) - np.log1p(-fq)), axis=1)
      else:
        term = np.mean(np.square(fq - ff), axis=1) / float(scale)
      cols.append(head.weight * term)
    return np.stack(cols, axis=1)

  def distortion(self, features: np.ndarray, reference: np.ndarray,
                 scales: Sequence[float]) -> np.ndarray:
    """Per-sample distortion from the float model: the weighted sum of `head_distortion`.

    >>> heads = Heads((Head("y", "linear", (2,)),))
    >>> heads.distortion(np.array([[1.0, 2.0]]), np.array([[1.0, 0.0]]), [2.0])
    array([1.])
    """
    return np.sum(self.head_distortion(features, reference, scales), axis=1)


def output_names(model) -> List[str]:
  """The names of ``model``'s outputs, in order (the output layers' names)."""
  names = getattr(model, "output_names", None)
  if names and len(names) == len(model.outputs):
    return [str(n) for n in names]
  return [getattr(getattr(t, "_keras_history", None), "layer", None).name for t in model.outputs]


def heads_of(model, kinds: Optional[Mapping[str, str]] = None,
             weights: Optional[Mapping[str, float]] = None) -> Heads:
  """The model's outputs as `Heads`, read off its layers (``kinds``/``weights`` override).

  A softmax output is ``softmax``, a sigmoid output ``sigmoid`` (any shape);
  a model with one ``(batch, units)`` output of two or more units and no
  final activation is a classifier's ``logits`` unless the output has the
  input's shape (an autoencoder); every other output is ``linear``. Pass
  ``kinds={"name": "linear"}`` where a head is not what its layers suggest,
  ``weights`` to weigh the heads' distortion terms (default 1 each). What
  `keep_heads` kept with a model is returned as it is.

  >>> from keras_mpq.base.compat import keras
  >>> inp = keras.Input((8,))
  >>> h = keras.layers.Dense(16, activation="relu")(inp)
  >>> m = keras.Model(inp, [keras.layers.Dense(3, activation="softmax", name="cls")(h),
  ...                       keras.layers.Dense(4, name="box")(h)])
  >>> [(x.name, x.kind) for x in heads_of(m).heads]
  [('cls', 'softmax'), ('box', 'linear')]
  """
  if kinds is None and weights is None:
    kept = model_data.get(model, HEADS)
    if kept is not None:
      return kept
  names = output_names(model)
  kinds = _check_named(kinds, names, "output_kinds", lambda v: str(HeadKind(v)),
                       f"one of {[k.value for k in HeadKind]}")
  weights = _check_named(weights, names, "output_weights", _positive,
                         "a finite weight > 0")
  in_shape = tuple(model.inputs[0].shape[1:]) if len(model.inputs) == 1 else None
  heads = []
  for name, tensor in zip(names, model.outputs):
    shape = tuple(tensor.shape[1:])
    if not tf.as_dtype(tensor.dtype).is_floating:
      raise UnsupportedModelError(
          f"Expected float outputs that keras_mpq can measure. Received: output {name!r} "
          f"of dtype {tf.as_dtype(tensor.dtype).name} in model {model.name!r}. Cast it "
          "to float inside the model, or end the model before it.")
    if not shape:
      raise UnsupportedModelError(
          f"Expected each output to have shape (batch, units) or more. Received: output "
          f"{name!r} of shape {tuple(tensor.shape)} (rank 0 per sample) in model "
          f"{model.name!r}. Add keras.layers.Reshape((1,)) at the end.")
    layer = getattr(getattr(tensor, "_keras_history", None), "layer", None)
    kind = kinds.get(name) or _detected_kind(final_activation(layer), shape,
                                             len(model.outputs), in_shape)
    heads.append(Head(name, kind, shape, weights.get(name, 1.0)))
  return Heads(tuple(heads))


def keep_heads(model, heads: Heads) -> None:
  """Keeps ``heads`` with ``model`` so every later stage reads the same (`heads_of`)."""
  model_data.put(model, HEADS, heads)


def _detected_kind(act: Optional[str], shape, n_outputs: int, in_shape) -> str:
  if act == "softmax":
    return HeadKind.SOFTMAX.value
  if act == "sigmoid":
    return HeadKind.SIGMOID.value
  if (act in ("linear", None) and n_outputs == 1 and len(shape) == 1
      and (shape[0] or 0) >= 2 and tuple(shape) != tuple(in_shape or ())):
    return HeadKind.LOGITS.value
  return HeadKind.LINEAR.value


def _positive(value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
      np.isfinite(value) and value > 0):
    raise ValueError(value)
  return float(value)


def _check_named(given, names, what, convert, expected) -> Dict[str, Any]:
  if given is None:
    return {}
  if not isinstance(given, Mapping):
    raise InvalidInputError(
        f"Expected {what} as a dict from output name to value. Received: {what}={given!r}; "
        f"the outputs are {names}.")
  unknown = sorted(set(map(str, given)) - set(names))
  if unknown:
    raise InvalidInputError(
        f"Expected {what} to name the model's outputs {names}. Received unknown "
        f"outputs {unknown}.")
  out = {}
  for key, value in given.items():
    try:
      out[str(key)] = convert(value)
    except (ValueError, TypeError):
      raise InvalidInputError(
          f"Expected {what}[{key!r}] to be {expected}. Received: {value!r}") from None
  return out


def final_activation(layer) -> Optional[str]:
  """Name of the activation a layer applies last ('softmax' for Softmax), or None."""
  if layer is None:
    return None
  inner = getattr(layer, "layer", None)  # a wrapper (tfmot's QuantizeWrapper): its layer's
  if isinstance(layer, keras.layers.Wrapper) and inner is not None:
    layer = inner
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
  return output_kind(model(batching.take(x, slice(0, 64)), training=False)) in PROBABILITY_KINDS


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
  """Compiles ``qmodel`` so ``evaluate`` and ``fit`` work as returned.

  A classifier (`Heads.classifier`): sparse categorical cross-entropy
  (binary for one output unit), from logits unless the float model's
  outputs are probabilities, and accuracy, so ``evaluate(x, y)`` takes
  integer labels. Any other model: per output, mean squared error for
  linear heads, binary cross-entropy for sigmoid heads, categorical
  cross-entropy (one-hot targets) for softmax and logits heads. Optimizer:
  Adam, for quantization-aware fine-tuning with ``fit``. Compile again for
  another loss.
  """
  heads = heads_of(folded)
  optimizer = keras.optimizers.Adam(1e-4)
  if not heads.classifier:
    losses = {
        HeadKind.LINEAR: lambda: keras.losses.MeanSquaredError(),
        HeadKind.SIGMOID: lambda: keras.losses.BinaryCrossentropy(),
        HeadKind.SOFTMAX: lambda: keras.losses.CategoricalCrossentropy(),
        HeadKind.LOGITS: lambda: keras.losses.CategoricalCrossentropy(from_logits=True),
    }
    loss = [losses[HeadKind(h.kind)]() for h in heads.heads]
    qmodel.compile(optimizer=optimizer, loss=loss if len(loss) > 1 else loss[0])
    return
  out = np.asarray(folded(batching.take(x, slice(0, 64)), training=False), dtype=np.float64)
  probabilities = output_kind(out) in PROBABILITY_KINDS
  if out.shape[1] == 1:
    loss = keras.losses.BinaryCrossentropy(from_logits=not probabilities)
  else:
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
  qmodel.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
