"""Applies a `QuantizationPlan` to a tf_keras model through tfmot, calibrated and ready to use.

The line is: fold BatchNorm into the layer before it (exact, as TFLite does),
annotate every layer with its keras_mpq `QuantizeConfig`, `quantize_apply` with
`MixedPrecisionScheme`, then calibrate activation ranges on data. The result's
accuracy right after `apply_plan` is the post-training accuracy: no model is
ever returned with the default [-6, 6] ranges.

Example:

>>> import keras_mpq
>>> plan = keras_mpq.QuantizationPlan({"conv1": 8, "conv2": 4, "conv3": 4,
...                                     "fc1": 4, "logits": 8})
>>> qmodel = keras_mpq.apply_plan(model, plan, calibration_data=x)  # doctest: +SKIP
>>> qmodel.evaluate(x_test, y_test)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional

from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import QuantizationPlan
from keras_mpq.quantization.access import quantize_model
from keras_mpq.quantization.calibrate import calibrate, check_data
from keras_mpq.quantization.fold import fold_batchnorm
from keras_mpq.quantization.optimize import optimize_weights


def apply_plan(model, plan: QuantizationPlan, calibration_data, fold_bn: bool = True,
               batch_size: int = 64, weight_method: Optional[str] = None,
               bias_correction: Optional[bool] = None, range_policy: Optional[str] = None,
               progress: bool = False, tune_steps: Optional[int] = None,
               tune_temperature: float = 1.0, seed: int = 0):
  """Quantizes ``model`` per ``plan`` with tfmot and calibrates its activation ranges.

  Args:
    model: a tf_keras Sequential or functional model.
    plan: bits per quantizable layer (names of ``model``'s layers).
    calibration_data: inputs ``x`` (N, ...) used to set activation ranges and,
      layer by layer, to optimize the weights (`optimize_weights`).
    fold_bn: fold BatchNorm into the preceding layers first (as TFLite does).
    batch_size: calibration batch size.
    weight_method: 'rtn' (round to nearest on the max-abs grid), 'mse'
      (per-channel clipping search), 'gptq' (clipping, then GPTQ rounding) or
      'adaround' (GPTQ's integers refined by AdaRound at 2-3 bits);
      default `DEFAULT_WEIGHT_METHOD`.
    bias_correction: correct each layer's mean output shift: True (or
      'empirical') on the calibration data, with each layer's inputs from the
      layers before it already quantized; 'analytic': from the BatchNorm
      statistics where the layer's input follows a BatchNorm (DFQ,
      `keras_mpq.quantization.analytic_bias`), empirically elsewhere; False: none
      (default `DEFAULT_BIAS_CORRECTION`).
    range_policy: activation ranges: 'minmax', 'percentile' or 'mse'
      (`keras_mpq.base.act_ranges`; default its `DEFAULT_RANGE_POLICY`).
    progress: a progress bar over the layers' weight optimization.
    tune_steps: steps of `keras_mpq.quantization.distill.tune` after calibration (each
      layer's per-channel scales and bias tuned so the model's outputs match
      the float model's; the integers stay): None for its default for the
      model's size, 0 for none. `keras_mpq.quantization.distill.tune_report` says what it did.
    tune_temperature: the tuning loss's temperature (`keras_mpq.quantization.distill.tune`).
    seed: the tuning's held-out split and batch order.

  Returns:
    A tf_keras model of tfmot ``QuantizeWrapperV2`` layers, compiled-ready:
    usable with ``evaluate``, ``fit`` (quantization-aware fine-tuning) and
    `keras_mpq.export_tflite`.

  Example:

  >>> plan = QuantizationPlan.uniform(plan_layers(model), 4)  # doctest: +SKIP
  >>> qmodel = apply_plan(model, plan, x[:256])  # doctest: +SKIP
  """
  if not isinstance(plan, QuantizationPlan):
    raise InvalidInputError(
        f"Expected a keras_mpq.QuantizationPlan. Received: {type(plan).__name__}")
  base = fold_batchnorm(model) if fold_bn else model
  qmodel = quantize_model(base, plan)
  x = check_data(qmodel, calibration_data, "calibration data")
  optimize_weights(qmodel, x, weight_method, bias_correction, batch_size=batch_size,
                   progress=progress)
  calibrate(qmodel, x, batch_size=batch_size, range_policy=range_policy)
  if tune_steps != 0:
    from keras_mpq.quantization import distill as distill_lib  # pylint: disable=g-import-not-at-top
    tuned = distill_lib.tune(qmodel, base, x, steps=tune_steps, seed=seed,
                         temperature=tune_temperature, progress=progress)
    if tuned["kept"]:  # the ranges the file's calibration will find for the tuned weights
      calibrate(qmodel, x, batch_size=batch_size, range_policy=range_policy)
  return qmodel
