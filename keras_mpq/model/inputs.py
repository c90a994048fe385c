"""A model's inputs as data: one array, or one array per input for a model with several.

Every public function that takes inputs ``x`` checks them here, once, and
hands the later stages one form: a float32 array for a model with one input
(unchanged from before models could have several), else a list of float32
arrays in ``model.inputs`` order (`keras_mpq.base.batching` slices either).

For a model with several inputs, ``x`` is a list (or tuple) in
``model.inputs`` order, or a dict keyed by the inputs' names (the Keras
``Input`` names, `input_names`), of arrays with the same first dimension.

>>> from keras_mpq.base.compat import keras
>>> a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
>>> m = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
>>> x = check_inputs(m, {"b": np.zeros((4, 2)), "a": np.ones((4, 3))})
>>> [v.shape for v in x]
[(4, 3), (4, 2)]
"""

from __future__ import annotations

from typing import Any, List, Mapping, Sequence, Tuple

import numpy as np

from keras_mpq.base.errors import InvalidInputError


def input_names(model) -> List[str]:
  """The names of ``model``'s inputs (its Keras ``Input`` names), in ``model.inputs`` order."""
  names = getattr(model, "input_names", None)
  if names and len(names) == len(model.inputs):
    return [str(n) for n in names]
  return [t.name.split(":")[0].split("/")[0] for t in model.inputs]


def input_shapes(model) -> List[Tuple[Any, ...]]:
  """Each input's shape without the batch axis, in ``model.inputs`` order."""
  return [tuple(t.shape[1:]) for t in model.inputs]


def describe(model) -> str:
  """The inputs ``x`` must give, in words: ``'a' (N, 8, 8, 1), 'b' (N, 5)``."""
  return ", ".join(f"{n!r} (N, {', '.join(str(d) for d in s)})"
                   for n, s in zip(input_names(model), input_shapes(model)))


def split_data(model, data) -> Tuple[Any, Any]:
  """``(x, y)`` of ``data`` given as ``x`` or ``(x, y)``, for a model with several inputs.

  With several inputs, ``data`` is ``x`` (a list of arrays or a dict by name)
  or ``(x, y)`` where ``x`` is such a list or dict; a list of arrays is ``x``
  itself. (A model with one input keeps its callers' rules.)
  """
  if data is None:
    return None, None
  if isinstance(data, Mapping):
    return data, None
  if isinstance(data, (list, tuple)) and len(data) == 2 and (
      isinstance(data[0], Mapping) or isinstance(data[0], (list, tuple))):
    return data[0], data[1]
  return data, None


def _check_one(x, shape, what: str, model, name: str, several: bool) -> np.ndarray:
  label = f"{what}[{name!r}]" if several else what
  try:
    x = np.asarray(x, dtype=np.float32)
  except (TypeError, ValueError) as e:
    raise InvalidInputError(f"Expected {label} as a numeric array. Received: {e}") from None
  if x.ndim != len(shape) + 1 or any(e is not None and e != s for e, s in zip(shape, x.shape[1:])):
    raise InvalidInputError(
        f"Expected {label} of shape (N, {', '.join(str(e) for e in shape)}) for "
        f"model {model.name!r}. Received: shape {x.shape}")
  if len(x) == 0:
    raise InvalidInputError(f"Expected at least one sample in {label}. Received: 0")
  if not np.all(np.isfinite(x)):
    raise InvalidInputError(f"{label} contains NaN or Inf values.")
  return x


def by_name(x: Mapping, names: Sequence[str], what: str = "x", whose: str = "the model's",
            hint: str = "") -> List[Any]:
  """The values of the dict ``x`` in the order of ``names``; refuses unknown or missing keys.

  The one rule for inputs given as a dict by input name, for a Keras model
  (`order_inputs`) and for a .tflite file (`keras_mpq.export.feed.match_inputs`).
  The error names the keys given, the unknown and the missing ones, then
  ``hint``.

  >>> by_name({"table": 2, "image": 1}, ["image", "table"])
  [1, 2]
  >>> by_name({"img": 1, "table": 2}, ["image", "table"])
  Traceback (most recent call last):
  ...
  keras_mpq.base.errors.InvalidInputError: Expected x as a dict keyed by the model's input names ['image', 'table']. Received: keys ['img', 'table']; unknown ['img']; missing ['image'].
  """
  given = [str(k) for k in x]
  unknown = sorted(set(given) - set(names))
  missing = [n for n in names if n not in given]
  if unknown or missing:
    raise InvalidInputError(
        f"Expected {what} as a dict keyed by {whose} input names {list(names)}. Received: "
        f"keys {given}" + (f"; unknown {unknown}" if unknown else "")
        + (f"; missing {missing}" if missing else "") + "." + (f" {hint}" if hint else ""))
  return [x[n] for n in names]


def order_inputs(model, x, what: str = "data") -> List[Any]:
  """``x`` (a list in model order, or a dict by input name) as a list in ``model.inputs`` order.

  Refuses a wrong count or unknown or missing names (`by_name`), saying what
  the model takes. The arrays are not checked (`check_inputs` does).
  """
  names = input_names(model)
  if isinstance(x, Mapping):
    return by_name(x, names, what, "the model's",
                   f"Model {model.name!r} takes {describe(model)}.")
  if isinstance(x, (list, tuple)) and len(x) != len(names):
    raise InvalidInputError(
        f"Expected {what} as {len(names)} arrays, one per model input in order {names}, "
        f"or a dict by input name. Received: {len(x)} arrays. Model {model.name!r} takes "
        f"{describe(model)}.")
  if not isinstance(x, (list, tuple)):
    raise InvalidInputError(
        f"Expected {what} as a list of {len(names)} arrays (one per model input, in order "
        f"{names}) or a dict by input name. Received: one {type(x).__name__}. Model "
        f"{model.name!r} takes {describe(model)}.")
  return list(x)


def check_inputs(model, x, what: str = "data"):
  """``x`` checked against ``model``'s inputs: one float32 array, or a list per input.

  One input: ``x`` is an array (or a dict with its one name) of shape
  ``(N, *input_shape)``, finite, N >= 1; it comes back as a float32 array.
  Several inputs: a list in ``model.inputs`` order or a dict by input name
  (`input_names`), each array checked the same way and all with the same N;
  it comes back as a list of float32 arrays in ``model.inputs`` order.
  Anything else raises `InvalidInputError` saying what the model takes.
  """
  shapes = input_shapes(model)
  names = input_names(model)
  if len(shapes) == 1:
    if isinstance(x, Mapping):
      x = order_inputs(model, x, what)[0]
    return _check_one(x, shapes[0], what, model, names[0], False)
  arrays = [_check_one(a, s, what, model, n, True)
            for a, s, n in zip(order_inputs(model, x, what), shapes, names)]
  sizes = {n: len(a) for n, a in zip(names, arrays)}
  if len(set(sizes.values())) > 1:
    raise InvalidInputError(
        f"Expected the same number of samples in every input of {what}. Received: "
        f"{sizes}. Give each input one row per sample.")
  return arrays
