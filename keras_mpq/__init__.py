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
(`keras_mpq.quantization.weights`), applied layer by layer by
`optimize_weights`; `tune` (`keras_mpq.quantization.distill`) then fits each
layer's scales and bias to the float model's outputs, keeping the integers.
Names are imported lazily so ``import keras_mpq`` does not load TensorFlow
until needed. docs/architecture.md maps the sub-packages.
"""

import importlib

__version__ = "0.1.0"

from keras_mpq.base.errors import (BudgetInfeasibleError, FileOverBudgetError,
                                   InputRangeAssumedWarning, InvalidInputError, KerasMpqError,
                                   MissingDependencyError, RamLimitError, UnsupportedModelError)
from keras_mpq.base.results import (ExportResult, LayerExport, ParetoPoint, SearchResult,
                                    SynthesisResult, ValidationResult)
from keras_mpq.base.types import (ACTIVATION_BITS, FLOAT_BITS, Budget, BudgetKind, CostTable,
                                  LayerCost, QuantizationPlan, SensitivityTable)

# public name -> module that defines it
_LAZY = {
    "quantize": "api", "QuantizationResult": "result",
    "synthesize": "synthesis.generators", "synthesize_with_info": "synthesis.generators",
    "register_generator": "synthesis.generators",
    "resolve_input_range": "model.input_range", "check_data_range": "model.input_range",
    "resolve_input_ranges": "model.input_range", "check_inputs": "model.inputs",
    "choose_range": "base.act_ranges",
    "activation_statistics": "synthesis.realism", "compare_statistics": "synthesis.realism",
    "measure_sensitivity": "sensitivity.measure", "search": "plan.search",
    "register_metric": "sensitivity.metrics", "available_metrics": "sensitivity.metrics",
    "plot_sensitivity": "report", "summary_table": "report",
    "allocate": "plan.allocation", "pareto_front": "plan.allocation",
    "cost_table": "plan.costs", "layer_costs": "model.size",
    "apply_plan": "quantization.apply", "fold_batchnorm": "quantization.fold", "bake": "quantization.access",
    "optimize_weights": "quantization.optimize", "quantize_kernel": "quantization.weights",
    "tune": "quantization.distill", "tune_report": "quantization.distill", "shifted_copies": "synthesis.augment",
    "quantize_scope": "quantization.configs",
    "export_tflite": "export.exporter",
    "validate_tflite": "validate", "benchmark_latency": "export.runtime",
    "tflm_arena_bytes": "export.runtime", "deployment_report": "export.runtime",
    "file_cost_table": "plan.costs",
    "inspect_tflite": "export.reader",
    "load_model": "model.load", "heads_of": "model.outputs",
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
