"""`validate_tflite`: accuracy (or the user's metric, or output fidelity) of an exported file in its runtime, on real data.

>>> result = validate_tflite("model.tflite", x_test, y_test)  # doctest: +SKIP
>>> result.accuracy  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Dict, List, Tuple

import numpy as np

from keras_mpq.base import batching
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.results import ValidationResult
from keras_mpq.export import feed as feed_lib
from keras_mpq.export import reader as reader_lib
from keras_mpq.export.runtime import dequantize_output, run_tflite
from keras_mpq.model import inputs as inputs_lib
from keras_mpq.model import outputs as outputs_lib

# --------------------------------------------------------------------------- validate


def validate_tflite(path_or_bytes, x, y=None, reference=None, runtime: str = "auto",
                    per_layer: bool = False, float_model=None,
                    metric=None) -> ValidationResult:
  """Accuracy, the user's metric and agreement with Keras of a .tflite file on ``x``.

  Args:
    path_or_bytes: the .tflite file or its bytes.
    x: inputs, shape (n, *input_shape), float; for a model with several
      inputs a list in the model's input order or a dict by input name
      (matched by name; by the reference's names in a file stripped of them).
    y: optional labels: integer classes (n,) for a classifier's accuracy, or
      the targets ``metric`` takes (a list, one per output, for several).
    reference: optional Keras model; agreement is the share of samples where
      the argmax of the file's output equals the reference's. For a model that
      is not a single-label classifier (`keras_mpq.model.outputs.Heads`), each
      output's fidelity instead: its correlation with the reference's and its
      normalized error, outputs matched by name (by position in a file
      stripped of names).
    runtime: 'auto' (LiteRT, then tflite_runtime, then tf.lite), 'litert',
      'tflite_runtime', 'tf' or 'tflm' (TFLite Micro; batch-1 integer files).
    per_layer: with ``float_model``, also the max abs error of each weight
      layer's output against the float model (LiteRT,
      ``experimental_preserve_all_tensors``; float-output layers only).
    metric: the user's measure of the outputs against ``y``: a Keras metric
      (a name such as ``"mae"``, a ``keras.metrics.Metric``) or a callable
      ``fn(y, outputs) -> number`` (``outputs``: an array, or a list in the
      model's order for several outputs).

  Example:

  >>> validate_tflite("m.tflite", x, y, reference=model).accuracy  # doctest: +SKIP
  0.97
  >>> validate_tflite("ae.tflite", x, reference=autoencoder).fidelity  # doctest: +SKIP
  {'reconstruction': {'correlation': 0.999, 'normalized_error': 0.002}}
  """
  start = time.perf_counter()
  data = reader_lib.read_bytes(path_or_bytes)
  x = _file_inputs(data, x, reference if reference is not None else float_model)
  n_x = batching.num_samples(x)
  heads = None if reference is None else outputs_lib.heads_of(reference)
  file_names = _output_names(reader_lib.parse(data))
  classifier = len(file_names) <= 1 and (heads is None or heads.classifier)
  if y is not None and classifier and metric is None:
    y = _check_labels(y, n_x)  # integer classes (a per-pixel file without metric: too)
  used = runtime
  layer_errors = None
  if runtime == "tflm":
    out = run_tflite(data, x, runtime="tflm")
  elif per_layer and float_model is not None:
    head = batching.take(x, slice(0, 32))
    out, interp, used = run_tflite(data, head, runtime=runtime,
                                   preserve_all_tensors=True, return_interpreter=True)
    layer_errors = _layer_errors(interp, data, float_model, _float32(head))
    out = run_tflite(data, x, runtime=runtime)
  else:
    out, _, used = run_tflite(data, x, runtime=runtime, return_interpreter=True)
  outs = out if isinstance(out, list) else [out]
  for o in outs:
    if len(o) != n_x or o.size == 0:
      raise InvalidInputError(
          f"Expected one output row per input. Received: {len(o)} output rows (shape "
          f"{o.shape}) for {n_x} inputs; the file's output shape is damaged. "
          "Re-export the model.")
  value, metric_name = (None, None) if metric is None else _user_metric(metric, y, out)
  classifier = classifier and (heads is not None or outs[0].ndim == 2)  # else per pixel
  if not classifier:
    return _fidelity_result(file_names, outs, x, reference, heads, used, start, layer_errors,
                            value, metric_name)
  pred = _classes(out)
  acc = float(np.mean(pred == y)) if y is not None and metric is None else None
  agreement = max_err = mean_err = None
  if reference is not None:
    ref = np.asarray(reference.predict(_float32(x), verbose=0, batch_size=256))
    ref = ref.reshape(out.shape)
    agreement = float(np.mean(pred == _classes(ref)))
    diff = np.abs(out - ref)
    max_err, mean_err = float(diff.max()), float(diff.mean())
  return ValidationResult(runtime=used, n=len(out), seconds=time.perf_counter() - start,
                          accuracy=acc, agreement=agreement, max_abs_error=max_err,
                          mean_abs_error=mean_err, layer_errors=layer_errors,
                          metric=value, metric_name=metric_name)


def _check_labels(y, n: int) -> np.ndarray:
  y = np.asarray(y).reshape(-1)
  if not (np.issubdtype(y.dtype, np.integer)
          or (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
    raise InvalidInputError(
        f"Expected integer class labels y. Received: labels of dtype {y.dtype}; for "
        "other targets pass metric= (a Keras metric or a callable fn(y, outputs)).")
  if len(y) != n:
    raise InvalidInputError(
        f"Expected one label per input. Received: {n} inputs and {len(y)} labels")
  return y


def _user_metric(metric, y, out) -> Tuple[float, str]:
  """``(value, name)`` of the user's ``metric`` on targets ``y`` and the file's outputs."""
  if y is None:
    raise InvalidInputError(
        "Expected y (the targets) with metric=. Received: y=None. Pass the labels or "
        "targets the metric compares the outputs with.")
  from keras_mpq.base.compat import keras  # pylint: disable=g-import-not-at-top
  name = getattr(metric, "name", None) or getattr(metric, "__name__", None) or str(metric)
  fn = metric
  if isinstance(metric, str):
    try:
      fn = keras.metrics.get(metric)
    except ValueError:
      raise InvalidInputError(
          f"Expected metric as a Keras metric name (such as 'mae' or 'accuracy'), a "
          f"keras.metrics.Metric or a callable fn(y, outputs). Received: "
          f"metric={metric!r}") from None
  if not isinstance(out, list) and not isinstance(y, (list, tuple, dict)):
    y = np.asarray(y)
    if y.size == out.size and y.shape != out.shape:  # (n,) targets of an (n, 1) output
      y = y.reshape(out.shape)
  try:
    if isinstance(fn, keras.metrics.Metric):
      fn.reset_state()
      fn.update_state(y, out)
      value = fn.result()
    elif callable(fn):
      value = fn(y, out)
    else:
      raise TypeError(f"not callable: {type(fn).__name__}")
    value = float(np.mean(np.asarray(value, np.float64)))
  except InvalidInputError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # the user's function
    raise InvalidInputError(
        f"Expected metric {name!r} to take (y, outputs) and return a number. Received "
        f"{type(e).__name__}: {str(e)[:200]}") from None
  if not np.isfinite(value):
    raise InvalidInputError(
        f"Expected a finite value from metric {name!r}. Received: {value}. Check that y "
        "matches the outputs (shape, scale).")
  return value, str(name)


def _fidelity_result(file_names, outs, x, reference, heads, used, start, layer_errors, value,
                     metric_name) -> ValidationResult:
  """A file that is not a classifier: each output's fidelity to the reference."""
  if reference is None:
    note = ("not a single-label classifier: no accuracy; pass reference= (the float "
            "model) for each output's fidelity" + ("" if metric_name else
                                                    ", or metric= and y for your measure"))
    return ValidationResult(runtime=used, n=batching.num_samples(x),
                            seconds=time.perf_counter() - start, layer_errors=layer_errors, metric=value,
                            metric_name=metric_name, note=note)
  refs = reference.predict(_float32(x), verbose=0, batch_size=256)
  refs = refs if isinstance(refs, list) else [refs]
  names = heads.names
  if set(file_names) == set(names):  # matched by name
    outs = [outs[file_names.index(n)] for n in names]
  elif len(outs) != len(names):
    raise InvalidInputError(
        f"Expected the file to have the reference's {len(names)} outputs {names}. "
        f"Received: {len(outs)} outputs {file_names}. Validate against the model the "
        "file was exported from.")
  fidelity: Dict[str, Dict[str, float]] = {}
  diffs = []
  for name, got, ref in zip(names, outs, refs):
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64).reshape(ref.shape)
    diff = got - ref
    diffs.append(np.abs(diff).ravel())
    var = float(np.var(ref))
    corr = (float(np.corrcoef(got.ravel(), ref.ravel())[0, 1])
            if np.std(got) > 0 and np.std(ref) > 0 else float(np.array_equal(got, ref)))
    fidelity[name] = {"correlation": corr,
                      "normalized_error": float(np.mean(diff * diff)) / max(var, 1e-12)}
  every = np.concatenate(diffs)
  note = ("not a single-label classifier: reported each output's fidelity to the "
          "reference (correlation, mean squared error over the reference's variance)"
          + ("" if metric_name else "; pass metric= and y for your own measure"))
  return ValidationResult(runtime=used, n=batching.num_samples(x),
                          seconds=time.perf_counter() - start, max_abs_error=float(every.max()),
                          mean_abs_error=float(every.mean()), layer_errors=layer_errors,
                          metric=value, metric_name=metric_name, fidelity=fidelity,
                          note=note)


def _file_inputs(data: bytes, x, model):
  """``x`` in the file's input order: one array, or a list for several inputs.

  A dict is matched by the file's input names, or by ``model``'s (the
  reference's) where the file's were stripped (its inputs keep the model's
  order); a list is taken in the model's input order.
  """
  names = None if model is None else inputs_lib.input_names(model)
  xs = feed_lib.match_inputs(x, feed_lib.file_input_names(data), names)
  return np.asarray(xs[0]) if len(xs) == 1 else [np.asarray(v) for v in xs]


def _float32(x):
  return batching.map_inputs(lambda a: np.asarray(a, np.float32), x)


def _output_names(reader) -> List[str]:
  """The file's output tensor names, in order ('' where stripped)."""
  return [reader.name(int(reader.sg.Outputs(i))) for i in range(reader.sg.OutputsLength())]


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
  reader = reader_lib.parse(data)
  for name, ref in zip(names, refs):
    if not ops[name]:
      continue
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
