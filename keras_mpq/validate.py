"""`validate_tflite`: accuracy of an exported file in its runtime, on real data.

>>> result = validate_tflite("model.tflite", x_test, y_test)  # doctest: +SKIP
>>> result.accuracy  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Dict

import numpy as np

from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.results import ValidationResult
from keras_mpq.export import reader as reader_lib
from keras_mpq.export.runtime import dequantize_output, run_tflite

# --------------------------------------------------------------------------- validate


def validate_tflite(path_or_bytes, x, y=None, reference=None, runtime: str = "auto",
                    per_layer: bool = False, float_model=None) -> ValidationResult:
  """Accuracy and agreement with Keras of a .tflite file on ``x`` (and labels ``y``).

  Args:
    path_or_bytes: the .tflite file or its bytes.
    x: inputs, shape (n, *input_shape), float.
    y: optional integer labels (n,) for accuracy.
    reference: optional Keras model; agreement is the share of samples where
      the argmax of the file's output equals the reference's.
    runtime: 'auto' (LiteRT, then tflite_runtime, then tf.lite), 'litert',
      'tflite_runtime', 'tf' or 'tflm' (TFLite Micro; batch-1 integer files).
    per_layer: with ``float_model``, also the max abs error of each weight
      layer's output against the float model (LiteRT,
      ``experimental_preserve_all_tensors``; float-output layers only).

  Example:

  >>> validate_tflite("m.tflite", x, y, reference=model).accuracy  # doctest: +SKIP
  0.97
  """
  start = time.perf_counter()
  data = reader_lib.read_bytes(path_or_bytes)
  if y is not None:
    y = np.asarray(y).reshape(-1)
    if not (np.issubdtype(y.dtype, np.integer)
            or (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
      raise InvalidInputError(
          f"Expected integer class labels y. Received: labels of dtype {y.dtype}")
    if len(y) != len(np.asarray(x)):
      raise InvalidInputError(
          f"Expected one label per input. Received: {len(np.asarray(x))} inputs and "
          f"{len(y)} labels")
  used = runtime
  layer_errors = None
  if runtime == "tflm":
    out = run_tflite(data, x, runtime="tflm")
  elif per_layer and float_model is not None:
    out, interp, used = run_tflite(data, np.asarray(x)[:32], runtime=runtime,
                                   preserve_all_tensors=True, return_interpreter=True)
    layer_errors = _layer_errors(interp, data, float_model, np.asarray(x, np.float32)[:32])
    out = run_tflite(data, x, runtime=runtime)
  else:
    out, _, used = run_tflite(data, x, runtime=runtime, return_interpreter=True)
  if len(out) != len(np.asarray(x)) or out.size == 0:
    raise InvalidInputError(
        f"Expected one output row per input. Received: {len(out)} output rows (shape "
        f"{out.shape}) for {len(np.asarray(x))} inputs; the file's output shape is damaged "
        "or not a classifier's. Re-export the model.")
  pred = _classes(out)
  acc = float(np.mean(pred == y)) if y is not None else None
  agreement = max_err = mean_err = None
  if reference is not None:
    ref = np.asarray(reference.predict(np.asarray(x, np.float32), verbose=0, batch_size=256))
    ref = ref.reshape(out.shape)
    agreement = float(np.mean(pred == _classes(ref)))
    diff = np.abs(out - ref)
    max_err, mean_err = float(diff.max()), float(diff.mean())
  return ValidationResult(runtime=used, n=len(out), seconds=time.perf_counter() - start,
                          accuracy=acc, agreement=agreement, max_abs_error=max_err,
                          mean_abs_error=mean_err, layer_errors=layer_errors)


def _classes(out: np.ndarray) -> np.ndarray:
  """Class per row: argmax; one column is a binary classifier's sigmoid (p > 0.5)
  or, when outside [0, 1], its logit (> 0)."""
  out = out.reshape(len(out), -1)
  if out.shape[1] == 1:
    col = out[:, 0]
    in_unit = bool(np.all((col >= 0) & (col <= 1)))
    return (col > (0.5 if in_unit else 0.0)).astype(np.int64)
  return out.argmax(axis=1)


def _layer_errors(interp, data, float_model, x) -> Dict[str, float]:
  """Max abs error of each weight layer's output tensor vs the float Keras layer."""
  from keras_mpq.base import layers as layers_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.compat import keras  # pylint: disable=g-import-not-at-top
  names = [l.name for l in layers_lib.quantizable_layers(float_model)]
  ops = reader_lib.layer_weight_ops(data, names)
  details = {d["index"]: d for d in interp.get_tensor_details()}
  probe = keras.Model(float_model.inputs, [float_model.get_layer(n).output for n in names])
  # The TFLite tensor includes fused activations; compare after the layer's own activation.
  refs = probe.predict(x, verbose=0)
  refs = refs if isinstance(refs, list) else [refs]
  errors = {}
  for name, ref in zip(names, refs):
    if not ops[name]:
      continue
    reader = reader_lib.parse(data)
    out_t = reader.ops[ops[name][-1]["op_index"]].outputs[0]
    d = details.get(out_t)
    if d is None:
      continue
    try:
      got = dequantize_output(interp.get_tensor(out_t), d)
    except ValueError:
      continue
    if got.shape != ref.shape:
      continue
    errors[name] = float(np.max(np.abs(got - ref)))
  return errors
