"""What keras_mpq keeps with a model it made, stored on the model object itself.

A folded model carries the BatchNorm statistics that folding removed (the
analytic bias correction and the realism check read them); a quantized model
carries its weight report, its tuning report, each layer's expected input
and its traced range probes. Each is kept under a key on the model, so it
lives and dies with the model and travels with it between stages: there is
no module-level registry, and a model keras_mpq did not make has none.

>>> from keras_mpq.base.compat import keras
>>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
>>> put(m, "note", {"a": 1}); get(m, "note")
{'a': 1}
>>> get(m, "other", default=[])
[]
"""

from __future__ import annotations

from typing import Any, Dict

_ATTRIBUTE = "_keras_mpq_data"


class _Data:
  """A plain holder, so Keras does not track (or save) what it holds."""

  def __init__(self):
    self.values: Dict[str, Any] = {}


def _holder(model, create: bool):
  data = model.__dict__.get(_ATTRIBUTE)
  if data is None and create:
    data = _Data()
    object.__setattr__(model, _ATTRIBUTE, data)
  return data


def put(model, key: str, value: Any) -> None:
  """Keeps ``value`` under ``key`` with ``model``."""
  _holder(model, create=True).values[key] = value


def get(model, key: str, default: Any = None) -> Any:
  """What `put` kept under ``key`` with ``model`` (``default`` when nothing)."""
  data = _holder(model, create=False)
  return default if data is None else data.values.get(key, default)
