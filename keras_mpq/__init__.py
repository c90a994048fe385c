"""keras_mpq: data-free mixed-precision post-training quantization for Keras -> TFLite.

One call runs the whole line (synthesize labeled data from the model,
measure per-layer sensitivity on the task loss with the other layers
quantized, allocate bits exactly within a budget, apply through tfmot,
export TFLite for phones and microcontrollers):

>>> import keras_mpq
>>> result = keras_mpq.quantize(model, "4bit")          # doctest: +SKIP
>>> result.plan.weight_bits                             # doctest: +SKIP
>>> result.export("model.tflite", target="mcu")         # doctest: +SKIP
>>> keras_mpq.validate_tflite("model.tflite", x, y)     # doctest: +SKIP

Each stage is a public function too: `synthesize`, `measure_sensitivity`,
`search`, `allocate`, `pareto_front`, `cost_table`, `apply_plan`,
`export_tflite`, `validate_tflite`, `inspect_tflite`; the weight quantizer
they share (clipping search, GPTQ, bias correction) is `quantize_kernel`
(`keras_mpq.weight_quant`), applied layer by layer by `optimize_weights`; `tune`
(`keras_mpq.distill`) then fits each layer's scales and bias to the float
model's outputs, keeping the integers. Names are imported
lazily so ``import keras_mpq`` does not load TensorFlow until needed.
"""

import importlib

__version__ = "0.1.0"

from keras_mpq.types import (ACTIVATION_BITS, FLOAT_BITS, Budget, BudgetInfeasibleError,
                             InputRangeAssumedWarning,
                             BudgetKind, CostTable, ExportResult, FileOverBudgetError,
                             InvalidInputError, RamLimitError,
                             KerasMpqError, LayerCost, LayerExport, MissingDependencyError,
                             ParetoPoint, QuantizationPlan, SearchResult,
                             SensitivityTable, SynthesisResult, UnsupportedModelError, ValidationResult)

# public name -> module that defines it
_LAZY = {
    "quantize": "api", "QuantizationResult": "api",
    "synthesize": "synthesis", "synthesize_with_info": "synthesis",
    "register_generator": "synthesis",
    "resolve_input_range": "input_range", "check_data_range": "input_range",
    "choose_range": "act_ranges",
    "activation_statistics": "realism", "compare_statistics": "realism",
    "measure_sensitivity": "sensitivity", "search": "sensitivity",
    "register_metric": "sensitivity", "available_metrics": "sensitivity",
    "plot_sensitivity": "report", "summary_table": "report",
    "allocate": "allocation", "pareto_front": "allocation",
    "cost_table": "costs", "layer_costs": "costs",
    "apply_plan": "apply", "fold_batchnorm": "apply", "bake": "apply",
    "optimize_weights": "apply", "quantize_kernel": "weight_quant",
    "tune": "distill", "tune_report": "distill", "shifted_copies": "augment",
    "quantize_scope": "quantizers",
    "export_tflite": "export",
    "validate_tflite": "validate", "benchmark_latency": "validate",
    "tflm_arena_bytes": "validate", "deployment_report": "validate",
    "file_cost_table": "costs",
    "inspect_tflite": "tflite_inspect",
    "load_model": "model_io",
    "FreezeRanges": "callbacks", "FreezeBatchNorm": "callbacks",
    "ExportAndValidate": "callbacks", "SensitivityMonitor": "callbacks",
}

__all__ = sorted(list(_LAZY) + [
    "ACTIVATION_BITS", "FLOAT_BITS", "InputRangeAssumedWarning", "Budget", "BudgetInfeasibleError", "BudgetKind",
    "CostTable", "ExportResult", "FileOverBudgetError", "InvalidInputError", "RamLimitError", "KerasMpqError", "LayerCost",
    "LayerExport", "MissingDependencyError", "ParetoPoint", "QuantizationPlan", "SearchResult",
    "SensitivityTable", "SynthesisResult", "UnsupportedModelError", "ValidationResult"])


def __getattr__(name):
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module 'keras_mpq' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"keras_mpq.{module}"), name)
  globals()[name] = value
  return value


def __dir__():
  return __all__
