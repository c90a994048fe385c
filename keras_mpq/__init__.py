"""keras_mpq: data-free mixed-precision post-training quantization for Keras -> TFLite."""

__version__ = "0.1.0"

from keras_mpq.types import (ACTIVATION_BITS, FLOAT_BITS, Budget, BudgetInfeasibleError,
                             BudgetKind, CostTable, InvalidInputError, KerasMpqError,
                             LayerCost, MissingDependencyError, QuantizationPlan,
                             SensitivityTable, UnsupportedModelError)
