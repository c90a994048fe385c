"""The resume cache of `keras_mpq.quantize`: keys and readers for synthetic data and search results.

A damaged or foreign cache file is ignored (recomputed), never trusted.

>>> key = cache_key(model, {"seed": 0})  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from keras_mpq.base import batching
from keras_mpq.base.types import QuantizationPlan, SensitivityTable, to_jsonable
from keras_mpq.quantization import calibrate as calibrate_lib


def cache_key(model, settings: Mapping[str, Any], data_x=None) -> str:
  from keras_mpq.model import checks as model_checks_lib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  h.update(model_checks_lib.fingerprint(model).encode())
  h.update(json.dumps(to_jsonable(settings), sort_keys=True).encode())
  if data_x is not None:
    for values in batching.as_list(data_x):  # one array, or one per input
      h.update(np.ascontiguousarray(values).tobytes())
  return h.hexdigest()[:16]


def read_cached_data(path: pathlib.Path, model) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """Cached synthetic ``(x, y)``, or None if the file is unreadable or does not fit ``model``."""
  try:
    with np.load(path, allow_pickle=False) as z:
      y = np.asarray(z["y"]).reshape(-1)
      x = (np.asarray(z["x"]) if "x" in z.files else  # several inputs: x_0, x_1, ...
           [np.asarray(z[f"x_{i}"]) for i in range(len(model.inputs))])
    x = calibrate_lib.check_data(model, x, "cached data")
    if len(y) != batching.num_samples(x) or not np.issubdtype(y.dtype, np.integer):
      return None
    return x, y.astype(np.int64)
  except Exception:  # pylint: disable=broad-except  # a damaged cache is recomputed
    return None


def read_cached_search(path: pathlib.Path):
  """Cached ``(plan, table, rounds)``, or None if the file is unreadable."""
  try:
    saved = json.loads(path.read_text())
    return (QuantizationPlan.from_dict(saved["plan"]),
            SensitivityTable.from_dict(saved["sensitivity"]), list(saved["rounds"]))
  except Exception:  # pylint: disable=broad-except  # a damaged cache is recomputed
    return None
