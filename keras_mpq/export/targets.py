"""The export targets and what each one runs: runtimes, operators, packed int4 support.

>>> TARGETS
('mobile', 'mcu', 'ethos-u')
>>> supported("mcu", "FULLY_CONNECTED", 4)  # doctest: +SKIP
False
"""

from __future__ import annotations

from typing import Dict, Tuple

from keras_mpq.base import choices

TARGETS = choices.values(choices.Target)
RUNTIME_OF_TARGET = {"mobile": "litert", "mcu": "tflm", "ethos-u": "vela"}
DEFAULT_VELA_ACCELERATOR = "ethos-u55-128"

# Per runtime, operator and weight container: the activation bit-widths that
# runtime runs, as measured by export/probe_targets.py on this stack
# (tensorflow 2.21, ai-edge-quantizer 0.10, ai-edge-litert 2.3, tflite-micro
# 0.dev20261023). tests/test_export.py checks this table against
# export/targets_probe.json. INT8 weights are the fallback for every layer.
CAPABILITIES: Dict[str, Dict[str, Dict[str, Tuple[int, ...]]]] = {
    # LiteRT runs packed INT4 conv and fully connected with int8 or int16
    # activations; INT4 depthwise with int16 activations runs but computes
    # wrong outputs (relative error ~1.0), so only int8 there. TRANSPOSE_CONV
    # (Conv2DTranspose) takes only INT8 filters (transpose_conv.cc:372).
    "litert": {
        "CONV_2D": {"int4": (8, 16), "int8": (8, 16)},
        "DEPTHWISE_CONV_2D": {"int4": (8,), "int8": (8, 16)},
        "FULLY_CONNECTED": {"int4": (8, 16), "int8": (8, 16)},
        "TRANSPOSE_CONV": {"int4": (), "int8": (8, 16)},
    },
    # TFLite Micro: INT4 conv and depthwise with int8 activations; INT4
    # fully connected fails to prepare (fully_connected_common.cc:98), INT4
    # transpose conv too ("Hybrid models are not supported on TFLite Micro").
    "tflm": {
        "CONV_2D": {"int4": (8,), "int8": (8, 16)},
        "DEPTHWISE_CONV_2D": {"int4": (8,), "int8": (8, 16)},
        "FULLY_CONNECTED": {"int4": (), "int8": (8, 16)},
        "TRANSPOSE_CONV": {"int4": (), "int8": (8, 16)},
    },
    # Vela 5.2 (ethos-u55-128) crashes (SIGFPE, exit -8) on any INT4 tensor.
    "vela": {
        "CONV_2D": {"int4": (), "int8": (8, 16)},
        "DEPTHWISE_CONV_2D": {"int4": (), "int8": (8, 16)},
        "FULLY_CONNECTED": {"int4": (), "int8": (8, 16)},
        "TRANSPOSE_CONV": {"int4": (), "int8": (8, 16)},
    },
}


def supported(target: str, op: str, container: str, activation_bits: int) -> bool:
  """True if ``target``'s runtime runs ``op`` with ``container`` weights at these activation bits.

  >>> supported("mcu", "FULLY_CONNECTED", "int4", 8)
  False
  """
  table = CAPABILITIES[RUNTIME_OF_TARGET[target]]
  return activation_bits in table.get(op, {}).get(container, ())



# --------------------------------------------------------------------------- runtime operators

# The builtin operators the installed TFLite Micro Python runtime registers
# (tflite-micro 0.dev20261023: the tflite::micro::Register_* kernels linked
# into its _runtime.so, listed with `nm -C`). An mcu or ethos-u file may use
# only these; Vela runs every operator it cannot place on the NPU through
# TFLite Micro too. tests/test_export.py checks entries against the runtime.
TFLM_KERNELS = frozenset("""
ABS ADD ADD_N ARG_MAX ARG_MIN ASSIGN_VARIABLE AVERAGE_POOL_2D BATCH_MATMUL
BATCH_TO_SPACE_ND BROADCAST_ARGS BROADCAST_TO CALL_ONCE CAST CEIL CONCATENATION
CONV_2D COS CUMSUM DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE DETECTION_POSTPROCESS
DIV DYNAMIC_UPDATE_SLICE ELU EMBEDDING_LOOKUP EQUAL EXP EXPAND_DIMS FILL FLOOR
FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GATHER_ND GREATER GREATER_EQUAL
HARD_SWISH IF L2_NORMALIZATION L2_POOL_2D LEAKY_RELU LESS LESS_EQUAL LOG
LOGICAL_AND LOGICAL_NOT LOGICAL_OR LOGISTIC LOG_SOFTMAX MAXIMUM MAX_POOL_2D MEAN
MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL PACK PAD PADV2 PRELU QUANTIZE READ_VARIABLE
REDUCE_MAX REDUCE_MIN RELU RELU6 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR
REVERSE_V2 ROUND RSQRT SELECT_V2 SHAPE SIN SLICE SOFTMAX SPACE_TO_BATCH_ND
SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE SQUEEZE STRIDED_SLICE
SUB SUM SVDF TANH TRANSPOSE TRANSPOSE_CONV UNIDIRECTIONAL_SEQUENCE_LSTM UNPACK
VAR_HANDLE WHILE ZEROS_LIKE
""".split())

# Operators whose TFLite Micro kernel takes a bounded number of inputs: the
# most it prepares (tflite-micro 0.dev20261023: concatenation.cc kMaxInputNum;
# 11 inputs fail to prepare). Keras' UpSampling1D(size) converts to one
# CONCATENATION of size x steps inputs (each step repeated), so UpSampling1D(2)
# of more than 5 steps does not run there. tests/test_decoder_layers.py checks both sides.
TFLM_MAX_INPUTS = {"CONCATENATION": 10}
