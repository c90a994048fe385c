"""Keras callbacks for quantization-aware fine-tuning of a keras_mpq model with ``fit``.

The model `keras_mpq.quantization.apply.apply_plan` returns trains like any tf_keras model
(straight-through gradients through the weight quantizers, activation ranges
followed by an exponential moving average). These callbacks do the usual
chores of such a fine-tune:

* `FreezeRanges`: stop moving the activation ranges after N steps.
* `FreezeBatchNorm`: put the BatchNorm layers that were not folded into
  inference mode after N epochs (their moving statistics stop changing).
* `ExportAndValidate`: export the current model to TFLite and measure its
  accuracy in the TFLite runtime, into the Keras history.
* `SensitivityMonitor`: re-measure each layer's sensitivity on the model being
  trained, in its current mixed-precision context, into the Keras history.

Example:

>>> from keras_mpq import callbacks
>>> qmodel = keras_mpq.apply_plan(model, plan, x_train[:256])  # doctest: +SKIP
>>> qmodel.compile(keras.optimizers.Adam(1e-4), loss, metrics=["accuracy"])  # doctest: +SKIP
>>> qmodel.fit(x_train, y_train, epochs=2, callbacks=[
...     callbacks.FreezeRanges(after_steps=100),
...     callbacks.FreezeBatchNorm(after_epochs=1)])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from keras_mpq.base import batching
from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras, tf, tfmot
from keras_mpq.base.errors import InvalidInputError, MissingDependencyError
from keras_mpq.base.types import SensitivityTable, check_weight_bits
from keras_mpq.model import inputs as inputs_lib
from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import calibrate as calibrate_lib
from keras_mpq.quantization import configs as configs_lib

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise InvalidInputError(
        f"Expected {name} to be an integer >= {minimum}. Received: {name}={value!r}")
  return int(value)


def _lazy_import(module: str, what: str):
  try:
    return importlib.import_module(f"keras_mpq.{module}")
  except ImportError as e:
    raise MissingDependencyError(
        f"{what} needs keras_mpq.{module}, which could not be imported: {e}. "
        "Install keras_mpq with its dependencies (pip install keras-mpq).") from None


# --------------------------------------------------------------------------- ranges


class FreezeRanges(keras.callbacks.Callback):
  """Freezes the activation ranges after ``after_steps`` training steps.

  Until then, every activation quantizer follows its output's min/max with an
  exponential moving average; afterwards the ranges stay where they are
  (a variable write: the compiled train step is not rebuilt). Steps are
  counted from the first ``fit`` this callback sees, across later ``fit``
  calls.

  Args:
    after_steps: training steps (batches) before freezing; 0 freezes at once.

  Example:

  >>> qmodel.fit(x, y, epochs=2, callbacks=[FreezeRanges(after_steps=200)])  # doctest: +SKIP
  """

  def __init__(self, after_steps: int):
    super().__init__()
    self.after_steps = _check_positive_int(after_steps, "after_steps", minimum=0)
    self.steps = 0
    self.frozen = False
    self.frozen_at_step: Optional[int] = None
    self._base_iterations: Optional[int] = None

  def _iterations(self) -> Optional[int]:
    optimizer = getattr(self.model, "optimizer", None)
    iterations = getattr(optimizer, "iterations", None)
    return None if iterations is None else int(iterations.numpy())

  def on_train_begin(self, logs=None):
    if not access_lib.act_quant_vars(self.model):  # pylint: disable=protected-access
      raise InvalidInputError(
          "Expected a model quantized by keras_mpq.apply_plan (with activation "
          f"quantizers). Received: model {self.model.name!r} has none.")
    iterations = self._iterations()
    if self._base_iterations is None and iterations is not None:
      self._base_iterations = iterations - self.steps
    self._set(self.steps >= self.after_steps)

  def on_train_batch_end(self, batch, logs=None):
    iterations = self._iterations()
    if iterations is not None and self._base_iterations is not None:
      self.steps = iterations - self._base_iterations  # right with steps_per_execution > 1
    else:
      self.steps += 1
    if not self.frozen and self.steps >= self.after_steps:
      self._set(True)

  def _set(self, frozen: bool) -> None:
    if frozen and not self.frozen:
      self.frozen_at_step = self.steps
    self.frozen = frozen
    access_lib.set_range_tracking(self.model, not frozen)


# --------------------------------------------------------------------------- BatchNorm


def batchnorm_layers(model) -> List:
  """The BatchNormalization layers of ``model`` (inside tfmot wrappers too)."""
  found = []
  for layer in model.layers:
    inner = layer.layer if isinstance(layer, _QuantizeWrapper) else layer
    if isinstance(inner, keras.layers.BatchNormalization):
      found.append(inner)
  return found


class FreezeBatchNorm(keras.callbacks.Callback):
  """Puts the model's remaining BatchNorm layers in inference mode after N epochs.

  `keras_mpq.quantization.apply.apply_plan` folds every BatchNorm it can; the ones left
  (after an Add, on the input, ...) keep updating their moving statistics
  while fine-tuning until this callback sets them ``trainable = False``, which
  in tf_keras makes them normalize with their moving statistics and stop
  updating them. The train function is rebuilt so the change takes effect
  within the running ``fit``. Their gamma and beta keep learning when the
  layer sits in a tfmot wrapper (the wrapper lists its inner layer's weights
  as trainable whatever the flag), as in the usual "freeze BN statistics"
  step of quantization-aware training.

  Args:
    after_epochs: epochs to train before freezing; 0 freezes before the first.

  Example:

  >>> qmodel.fit(x, y, epochs=3, callbacks=[FreezeBatchNorm(after_epochs=1)])  # doctest: +SKIP
  """

  def __init__(self, after_epochs: int):
    super().__init__()
    self.after_epochs = _check_positive_int(after_epochs, "after_epochs", minimum=0)
    self.epochs_seen = 0
    self.frozen = False
    self.frozen_layers: List[str] = []

  def on_train_begin(self, logs=None):
    if self.epochs_seen >= self.after_epochs:
      self._freeze()

  def on_epoch_end(self, epoch, logs=None):
    self.epochs_seen += 1
    if not self.frozen and self.epochs_seen >= self.after_epochs:
      self._freeze()

  def _freeze(self) -> None:
    layers = batchnorm_layers(self.model)
    for bn in layers:
      bn.trainable = False
    self.frozen = True
    self.frozen_layers = [bn.name for bn in layers]
    if layers and getattr(self.model, "optimizer", None) is not None:
      # The compiled train step captured training=True for these layers.
      self.model.make_train_function(force=True)


# --------------------------------------------------------------------------- export


def _as_arrays(x):
  """Inputs as numpy arrays: one array, a list per input, or a dict by input name."""
  if isinstance(x, Mapping):
    return {str(k): np.asarray(v) for k, v in x.items()}
  return batching.map_inputs(np.asarray, x)


def _count(x) -> int:
  """How many samples `_as_arrays` inputs hold (a dict: its first input's; all are checked at fit)."""
  if isinstance(x, dict):
    return len(next(iter(x.values()))) if x else 0
  return batching.num_samples(x)


def _first(x, n: int):
  """The first ``n`` samples of `_as_arrays` inputs (a dict stays a dict)."""
  if isinstance(x, dict):
    return {k: v[:n] for k, v in x.items()}
  return batching.take(x, slice(0, n))


class ExportAndValidate(keras.callbacks.Callback):
  """Exports the model being fine-tuned to TFLite and measures it, every N epochs.

  Each time: `keras_mpq.quantization.access.bake` the current weights, export with
  `keras_mpq.export.exporter.export_tflite` for the current plan
  (`keras_mpq.quantization.access.current_plan`, which follows `set_weight_bits`), run the
  file with `keras_mpq.validate.validate_tflite` on ``(x_val, y_val)``, and
  write ``logs["tflite_accuracy"]`` and ``logs["tflite_bytes"]`` (so they land
  in ``fit``'s History). ``self.results`` keeps ``(epoch, accuracy, bytes,
  path)`` per export.

  Args:
    path: the ``.tflite`` file to write; may contain ``{epoch}`` (1-based).
    x_val, y_val: validation inputs and integer labels. For a model with
      several inputs, ``x_val`` is a list in the model's input order or a
      dict keyed by its Keras input names (matched when ``fit`` starts,
      `keras_mpq.model.inputs.check_inputs`).
    target: export target, as `keras_mpq.export.exporter.export_tflite` takes it.
    calibration_data: inputs for the exporter's activation calibration, in
      the same forms (defaults to the first 256 of ``x_val``).
    every_n_epochs: export after every N-th epoch.

  Example:

  >>> qmodel.fit(x, y, epochs=2, callbacks=[
  ...     ExportAndValidate("m_{epoch}.tflite", x_val, y_val, target="mobile")])  # doctest: +SKIP
  >>> ExportAndValidate("two_{epoch}.tflite", {"image": images, "table": rows},
  ...                   y_val, target="mcu")  # doctest: +SKIP
  """

  def __init__(self, path, x_val, y_val, target: str = "mobile", calibration_data=None,
               every_n_epochs: int = 1):
    super().__init__()
    self.path = os.fspath(path)
    # A list per input for several; a dict by input name until fit gives the model.
    self.x_val = _as_arrays(x_val)
    self.y_val = np.asarray(y_val)
    n = _count(self.x_val)
    if n != len(self.y_val) or n == 0:
      raise InvalidInputError(
          "Expected x_val and y_val with the same, non-zero number of samples. "
          f"Received: {n} inputs, {len(self.y_val)} labels.")
    self.target = target
    self.calibration_data = (_as_arrays(calibration_data) if calibration_data is not None
                             else _first(self.x_val, 256))
    self.every_n_epochs = _check_positive_int(every_n_epochs, "every_n_epochs")
    self.results: List[Tuple[int, float, int, str]] = []

  def on_train_begin(self, logs=None):
    # Fail at the start of fit, not after the first epoch, if a module is missing
    # or a dict of inputs does not match the model's input names.
    _lazy_import("export.exporter", "ExportAndValidate")
    _lazy_import("validate", "ExportAndValidate")
    if isinstance(self.x_val, dict):
      self.x_val = inputs_lib.check_inputs(self.model, self.x_val, "x_val")
    if isinstance(self.calibration_data, dict):
      self.calibration_data = inputs_lib.check_inputs(self.model, self.calibration_data,
                                                      "calibration_data")

  def on_epoch_end(self, epoch, logs=None):
    if (epoch + 1) % self.every_n_epochs:
      return
    export = _lazy_import("export.exporter", "ExportAndValidate")
    validate = _lazy_import("validate", "ExportAndValidate")
    path = self.path.format(epoch=epoch + 1)
    baked = access_lib.bake(self.model)
    plan = access_lib.current_plan(self.model, epoch=epoch + 1)
    result = export.export_tflite(baked, path, plan, target=self.target,
                                  calibration_data=self.calibration_data)
    written = os.fspath(getattr(result, "path", None) or path)
    checked = validate.validate_tflite(written, self.x_val, self.y_val,
                                       runtime="tflm" if self.target == "mcu" else "auto")
    accuracy = float(checked.accuracy)
    size = int(os.path.getsize(written))
    self.results.append((epoch + 1, accuracy, size, written))
    if logs is not None:
      logs["tflite_accuracy"] = accuracy
      logs["tflite_bytes"] = size


# --------------------------------------------------------------------------- sensitivity

SENSITIVITY_METRICS = ("task_interaction", "weight_mse")


def _loss_fn(model, loss):
  if loss is not None:
    return keras.losses.get(loss) if isinstance(loss, str) else loss
  compiled = getattr(model, "loss", None)
  if compiled is None or isinstance(compiled, (dict, list, tuple)):
    raise InvalidInputError(
        "Expected a model compiled with a single loss, or loss=... given to "
        f"SensitivityMonitor. Received: model.loss={compiled!r}")
  return keras.losses.get(compiled) if isinstance(compiled, str) else compiled


def weight_mse_table(qmodel, bits: Sequence[int]) -> SensitivityTable:
  """``||Q_b(W) - W||^2 / ||W||^2`` for each quantized layer and bit-width (no data).

  Kernels of one layer (a SeparableConv's two) are pooled.

  >>> weight_mse_table(qmodel, (2, 4, 8)).score("conv1", 2)  # doctest: +SKIP
  0.21
  """
  names, rows = [], []
  for layer in qmodel.layers:
    if not isinstance(layer, _QuantizeWrapper):
      continue
    kernels = [(v.numpy(), q.reduce_axes) for v, q, _ in layer._weight_vars  # pylint: disable=protected-access
               if isinstance(q, configs_lib.WeightQuantizer)]
    if not kernels:
      continue
    row = []
    for b in bits:
      err, norm, _ = layers_lib.quantization_error(kernels, b)
      row.append(err / norm if norm > 0 else 0.0)
    names.append(layer.layer.name)
    rows.append(row)
  return SensitivityTable(tuple(names), tuple(bits), np.array(rows).reshape(len(names), len(bits)),
                          metric="weight_mse")


def task_interaction_table(qmodel, x, y, bits: Sequence[int], loss,
                           batch_size: int = 256) -> SensitivityTable:
  """``L(c[i<-b]) - L(c)`` for each layer and bit-width, ``c`` the model's current plan.

  Measured on the quantized model itself: each (layer, bits) is a variable
  write inside `keras_mpq.quantization.access.weight_bits_override` and one pass of the
  same compiled function, never a rebuild.

  >>> table = task_interaction_table(qmodel, x, y, (2, 4, 8), loss)  # doctest: +SKIP
  """
  x = calibrate_lib.check_data(qmodel, x, "sensitivity data")
  y = np.asarray(y)
  batches = [(tf.nest.map_structure(tf.constant, batching.take(x, s)), tf.constant(y[s]))
             for s in batching.batch_slices(batching.num_samples(x), batch_size)]

  @tf.function(reduce_retracing=True)
  def batch_loss(xb, yb):
    return tf.reduce_mean(loss(yb, qmodel(xb, training=False)))

  def mean_loss():
    total = sum(float(batch_loss(xb, yb)) * int(yb.shape[0]) for xb, yb in batches)
    return total / batching.num_samples(x)

  base = mean_loss()
  names = list(access_lib.get_weight_bits(qmodel))  # model order
  scores = np.zeros((len(names), len(bits)))
  for i, name in enumerate(names):
    for j, b in enumerate(bits):
      with access_lib.weight_bits_override(qmodel, {name: b}):
        scores[i, j] = mean_loss() - base
  return SensitivityTable(tuple(names), tuple(bits), scores, metric="task_interaction",
                          info={"context": access_lib.get_weight_bits(qmodel), "base_loss": base})


class SensitivityMonitor(keras.callbacks.Callback):
  """Re-measures per-layer sensitivity on the model being fine-tuned, every N epochs.

  ``metric="task_interaction"`` (the paper's metric, default): for each
  quantized layer ``i`` and candidate bits ``b``, the task-loss increase
  ``L(c[i<-b]) - L(c)`` on ``data`` with every other layer at its current
  bits ``c``, measured on the quantized model by swapping bit variables (no
  rebuild). ``metric="weight_mse"``: relative weight quantization error (no
  data needed). Each measurement is a `keras_mpq.SensitivityTable` kept in
  ``self.history`` as ``(epoch, table)``. Logs: ``sensitivity_max_layer`` (the
  index, in the table's layer order, of the layer most hurt at the lowest
  candidate bits) and ``sensitivity_max`` (its score).

  Args:
    data: ``(x, y)`` for "task_interaction" (labels as the loss expects);
      may be None for "weight_mse".
    every_n_epochs: measure after every N-th epoch.
    metric: "task_interaction" or "weight_mse".
    bits: candidate weight bit-widths.
    loss: loss for "task_interaction"; defaults to the model's compiled loss.
    batch_size: evaluation batch size.

  Example:

  >>> monitor = SensitivityMonitor((x[:256], y[:256]))  # doctest: +SKIP
  >>> qmodel.fit(x, y, epochs=2, callbacks=[monitor])  # doctest: +SKIP
  >>> monitor.history[-1][1].layers  # doctest: +SKIP
  """

  def __init__(self, data=None, every_n_epochs: int = 1, metric: str = "task_interaction",
               bits: Sequence[int] = (2, 4, 8), loss=None, batch_size: int = 256):
    super().__init__()
    if metric not in SENSITIVITY_METRICS:
      raise InvalidInputError(
          f"Expected metric in {SENSITIVITY_METRICS}. Received: metric={metric!r}")
    if metric == "task_interaction":
      if data is None or len(data) != 2:
        raise InvalidInputError(
            "Expected data=(x, y) for metric 'task_interaction'. "
            f"Received: data={type(data).__name__}")
      n = batching.num_samples(data[0])
      if n != len(data[1]) or n == 0:
        raise InvalidInputError(
            "Expected x and y with the same, non-zero number of samples. "
            f"Received: {n} inputs, {len(data[1])} labels.")
    self.data = data
    self.metric = metric
    self.bits = tuple(sorted({check_weight_bits(b, "bits") for b in bits}))
    if not self.bits:
      raise InvalidInputError("Expected at least one candidate bit-width. Received: bits=()")
    self.every_n_epochs = _check_positive_int(every_n_epochs, "every_n_epochs")
    self.loss = loss
    self.batch_size = _check_positive_int(batch_size, "batch_size")
    self.history: List[Tuple[int, SensitivityTable]] = []

  def measure(self) -> SensitivityTable:
    """One measurement on the current model (also usable outside ``fit``)."""
    if self.metric == "weight_mse":
      return weight_mse_table(self.model, self.bits)
    x, y = self.data
    return task_interaction_table(self.model, x, y, self.bits,
                                  _loss_fn(self.model, self.loss), self.batch_size)

  def on_epoch_end(self, epoch, logs=None):
    if (epoch + 1) % self.every_n_epochs:
      return
    table = self.measure()
    self.history.append((epoch + 1, table))
    if logs is not None and table.layers:
      lowest = table.scores[:, 0]
      index = int(np.argmax(lowest))
      logs["sensitivity_max_layer"] = index
      logs["sensitivity_max"] = float(lowest[index])
