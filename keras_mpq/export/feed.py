"""Which array goes to which input of a .tflite file: by name, or by position.

A file with several inputs is written with its inputs in the Keras model's
order, each named as the Keras input (`keras_mpq.export.convert.order_inputs`).
Inputs ``x`` for it are a list in that order, or a dict by input name; a dict
is matched by name, also for a file whose names were stripped (a TFLite Micro
file) when the model's input names are given, since the file keeps the
model's order. A file with one input takes one array, as before.

>>> match_inputs({"b": 2, "a": 1}, ["a", "b"])
[1, 2]
>>> match_inputs([1, 2], ["", ""])
[1, 2]
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

from keras_mpq.base.errors import InvalidInputError
from keras_mpq.export import reader as reader_lib
from keras_mpq.model import inputs as inputs_lib


def file_input_names(data: bytes) -> List[str]:
  """The names of a file's inputs, in its order ('' for a stripped name)."""
  reader = reader_lib.parse(data)
  sg = reader.sg
  return [_stem(reader.name(sg.Inputs(i))) for i in range(sg.InputsLength())]


def _stem(name: str) -> str:
  """``serving_default_image:0`` (an unordered converter name) -> ``image``."""
  name = name.rsplit(":", 1)[0] if ":" in name and name.rsplit(":", 1)[1].isdigit() else name
  return name[len("serving_default_"):] if name.startswith("serving_default_") else name


def match_inputs(x, file_names: Sequence[str],
                 model_names: Optional[Sequence[str]] = None) -> List[Any]:
  """``x`` as a list with one entry per file input, in the file's order.

  One input: ``x`` itself (an array), or the one value of a dict. Several: a
  list or tuple in the file's order (the Keras model's order), or a dict by
  input name, matched with ``file_names`` or, where the file has no names
  (stripped for TFLite Micro), with ``model_names`` (the Keras model's input
  names in its order). Anything else raises `InvalidInputError`.
  """
  n = len(file_names)
  if n == 1:
    if isinstance(x, Mapping):
      if len(x) != 1:
        raise InvalidInputError(
            f"Expected one input for this file (input {file_names[0]!r}). Received: a dict "
            f"with keys {list(x)}.")
      return [next(iter(x.values()))]
    return [x]
  if isinstance(x, Mapping):
    names = list(file_names)
    if not all(names) or len(set(names)) != n:
      if model_names is None or len(model_names) != n:
        raise InvalidInputError(
            f"Expected x as a list of {n} arrays in the model's input order for this file: "
            "its input names were stripped (a TFLite Micro file), so a dict cannot be "
            "matched by name. Pass a list, or the model (reference=) whose input names "
            "it keeps the order of.")
      names = list(model_names)
    return inputs_lib.by_name(x, names, "x", "the file's")
  if not isinstance(x, (list, tuple)) or len(x) != n:
    got = (f"{len(x)} arrays" if isinstance(x, (list, tuple))
           else f"one {type(x).__name__}")
    raise InvalidInputError(
        f"Expected x as {n} arrays, one per input of this file in order "
        f"{[k or f'#{i}' for i, k in enumerate(file_names)]}, or a dict by input name. "
        f"Received: {got}.")
  return list(x)
