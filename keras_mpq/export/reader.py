"""Reads a .tflite flatbuffer and says what precision each tensor really has.

Parsed with the ``tflite`` flatbuffer package (the generated schema reader),
not by hand. For each tensor: its type, shape, bytes in the file, whether it
is a constant, and for constant integer tensors the number of distinct stored
levels and the bits that needs (``ceil(log2(levels))``). Packed ``INT4``
weights are unpacked (low nibble first, as TFLite stores them) before
counting. ``check_against_plan`` then verifies that every layer of a
`QuantizationPlan` carries no more levels than its planned bit-width allows.

Example:

>>> rows = inspect_tflite("model.tflite")                    # doctest: +SKIP
>>> print(format_rows(rows))                                 # doctest: +SKIP
>>> check_against_plan("model.tflite", plan)                 # doctest: +SKIP
[]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from keras_mpq.base.errors import InvalidInputError, KerasMpqError
from keras_mpq.base.types import FLOAT_BITS, QuantizationPlan

try:  # the flatbuffer schema reader; a declared dependency of keras_mpq
  import flatbuffers
  import tflite as _tfl
except ImportError:  # pragma: no cover - exercised only without the package
  _tfl = None

# TensorType value -> (name, numpy dtype, bits per element)
TYPE_INFO = {
    0: ("FLOAT32", np.float32, 32), 1: ("FLOAT16", np.float16, 16),
    2: ("INT32", np.int32, 32), 3: ("UINT8", np.uint8, 8), 4: ("INT64", np.int64, 64),
    5: ("STRING", None, 8), 6: ("BOOL", np.bool_, 8), 7: ("INT16", np.int16, 16),
    8: ("COMPLEX64", np.complex64, 64), 9: ("INT8", np.int8, 8),
    10: ("FLOAT64", np.float64, 64), 11: ("COMPLEX128", np.complex128, 128),
    12: ("UINT64", np.uint64, 64), 13: ("RESOURCE", None, 0), 14: ("VARIANT", None, 0),
    15: ("UINT32", np.uint32, 32), 16: ("UINT16", np.uint16, 16), 17: ("INT4", None, 4),
    18: ("BFLOAT16", None, 16), 19: ("INT2", None, 2),
}

# Builtin operator code -> name, from the schema package.
_OP_NAMES = ({v: k for k, v in vars(_tfl.BuiltinOperator).items()
              if not k.startswith("_")} if _tfl is not None else {})

WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV",
              "BATCH_MATMUL")


@dataclasses.dataclass(frozen=True)
class TensorRow:
  """One tensor of a .tflite file as stored.

  ``levels`` and ``bits_used`` are set for constant integer tensors of at most
  16 bits (the distinct stored values and ``ceil(log2(levels))``), else None:
  INT32 biases have no bit-width to report.
  """

  index: int
  name: str
  dtype: str
  shape: Tuple[int, ...]
  bytes: int
  is_constant: bool
  levels: Optional[int] = None
  bits_used: Optional[int] = None
  quantized: bool = False
  n_scales: int = 0

  def to_dict(self):
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class OpInfo:
  """One operator: its name, its input/output tensor indices (-1 = none)."""

  index: int
  op: str
  inputs: Tuple[int, ...]
  outputs: Tuple[int, ...]


def _require_tflite():
  if _tfl is None:
    from keras_mpq.base.errors import MissingDependencyError  # pylint: disable=g-import-not-at-top
    raise MissingDependencyError(
        "Expected the 'tflite' flatbuffer package to read .tflite files. "
        "Install it with: pip install 'tflite==2.18.*'")


def read_bytes(path_or_bytes: Union[str, os.PathLike, bytes, bytearray]) -> bytes:
  """The file's bytes, with a clear error for a missing or non-TFLite file."""
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    data = bytes(path_or_bytes)
    where = "the given bytes"
  else:
    path = os.fspath(path_or_bytes)
    if not os.path.isfile(path):
      raise InvalidInputError(
          f"Expected a path to an existing .tflite file. Received: path={path!r}")
    with open(path, "rb") as f:
      data = f.read()
    where = repr(path)
  if len(data) < 16 or data[4:8] != b"TFL3":
    raise InvalidInputError(
        f"Expected a TFLite flatbuffer (file identifier 'TFL3' at byte 4). "
        f"Received: {where} ({len(data)} bytes, identifier {data[4:8]!r}). "
        "Pass a .tflite file written by keras_mpq.export_tflite or TFLiteConverter.")
  return data


def _damaged(e: Exception) -> InvalidInputError:
  return InvalidInputError(
      "Expected a readable TFLite flatbuffer; this one is truncated or corrupted "
      f"({type(e).__name__}: {e}). Re-export the model.")


# What reading a damaged flatbuffer's fields raises (struct.error is an Exception
# subclass of its own; a missing name reads as None, then fails to decode).
_PARSE_ERRORS = (struct.error, ValueError, IndexError, AttributeError, TypeError,
                 UnicodeDecodeError, OverflowError)


def _guarded(fn):
  """Fields are read lazily; damage found then is the same clear error as at parse."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except KerasMpqError:
      raise
    except _PARSE_ERRORS as e:
      raise _damaged(e) from None
  return wrapper


def builtin_code(code) -> int:
  """An operator code's builtin operator, as LiteRT and TFLite Micro read it.

  The larger of the ``builtin_code`` field and the 8-bit
  ``deprecated_builtin_code``. The ``tflite`` package's ``BuiltinCode()``
  returns the deprecated field for every code below 127, but ai-edge-quantizer
  writes the QUANTIZE and DEQUANTIZE it adds with only ``builtin_code`` set
  (the deprecated field 0, which is ADD): read through the package, a U-Net's
  mobile file listed them as ADD operators with one input.
  """
  tab = code._tab  # pylint: disable=protected-access
  o = tab.Offset(10)  # builtin_code: field 3 of OperatorCode
  raw = int(tab.Get(flatbuffers.number_types.Int32Flags, o + tab.Pos)) if o else 0
  return max(raw, int(code.DeprecatedBuiltinCode()))


class _Reader:
  """Parses a model once; raises InvalidInputError if the flatbuffer is damaged."""

  def __init__(self, data: bytes):
    _require_tflite()
    self.data = data
    try:
      self.model = _tfl.Model.GetRootAsModel(data, 0)
      if self.model.SubgraphsLength() < 1:
        raise ValueError("no subgraph")
      self.sg = self.model.Subgraphs(0)
      self.n_tensors = self.sg.TensorsLength()
      self.n_buffers = self.model.BuffersLength()
      self.tensors = [self.sg.Tensors(i) for i in range(self.n_tensors)]
      self.ops = [self._op(i) for i in range(self.sg.OperatorsLength())]
    except InvalidInputError:
      raise
    except Exception as e:  # damaged offsets raise anything from struct/index errors
      raise _damaged(e) from None

  def _op(self, i) -> OpInfo:
    op = self.sg.Operators(i)
    code = self.model.OperatorCodes(op.OpcodeIndex())
    builtin = builtin_code(code)
    name = _OP_NAMES.get(builtin, f"OP_{builtin}")
    if code.CustomCode() and (name == "CUSTOM" or builtin == 0):  # TFLM_DECODE has code 0
      name = code.CustomCode().decode()
    ins = tuple(int(op.Inputs(j)) for j in range(op.InputsLength()))
    outs = tuple(int(op.Outputs(j)) for j in range(op.OutputsLength()))
    return OpInfo(i, name, ins, outs)

  def softmax_beta(self, op_index: int) -> float:
    """The beta of SOFTMAX op ``op_index`` (1.0 when its options are absent)."""
    table = self.sg.Operators(op_index).BuiltinOptions()
    if table is None:
      return 1.0
    options = _tfl.SoftmaxOptions()
    options.Init(table.Bytes, table.Pos)
    return float(options.Beta())

  def name(self, t: int) -> str:
    """The tensor's name; '' when it has none (a file stripped for TFLite Micro)."""
    raw = self.tensors[t].Name()
    return raw.decode("utf-8", "replace") if raw is not None else ""

  def buffer(self, t: int) -> Optional[bytes]:
    """Raw bytes of a constant tensor (inline or at an offset), else None."""
    tensor = self.tensors[t]
    b = tensor.Buffer()
    if b <= 0 or b >= self.n_buffers:
      return None
    buf = self.model.Buffers(b)
    if buf.Offset() > 1:
      start, size = int(buf.Offset()), int(buf.Size())
      if start + size > len(self.data):
        raise InvalidInputError(
            f"The flatbuffer is truncated: tensor {self.name(t)!r} points past the end "
            "of the file. Re-export the model.")
      return self.data[start:start + size] or None
    if buf.DataLength() == 0:
      return None
    return buf.DataAsNumpy().tobytes()

  def int_values(self, t: int) -> Optional[np.ndarray]:
    """Stored integer values of a constant integer tensor (INT4 unpacked)."""
    raw = self.buffer(t)
    if raw is None:
      return None
    type_name, dtype, _ = TYPE_INFO.get(self.tensors[t].Type(), ("?", None, 0))
    if type_name == "INT4":
      return unpack_int4(np.frombuffer(raw, np.uint8), self.size(t))
    if type_name in ("INT8", "UINT8", "INT16", "INT32") and dtype is not None:
      return np.frombuffer(raw, dtype)
    return None

  def float_values(self, t: int) -> Optional[np.ndarray]:
    """Stored values of a constant FLOAT32 tensor, else None."""
    raw = self.buffer(t)
    if raw is None or self.tensors[t].Type() != 0:
      return None
    return np.frombuffer(raw, np.float32)

  def type_name(self, t: int) -> str:
    """The tensor's TFLite type: 'INT8', 'FLOAT32', ..."""
    return TYPE_INFO.get(self.tensors[t].Type(), ("UNKNOWN", None, 0))[0]

  def shape(self, t: int) -> Tuple[int, ...]:
    tensor = self.tensors[t]
    return tuple(int(tensor.Shape(i)) for i in range(tensor.ShapeLength()))

  def size(self, t: int) -> int:
    return int(np.prod(self.shape(t), dtype=np.int64))

  def n_scales(self, t: int) -> int:
    q = self.tensors[t].Quantization()
    return int(q.ScaleLength()) if q is not None else 0


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
  """Signed 4-bit values from TFLite's packing (two per byte, low nibble first).

  >>> unpack_int4(np.array([0x7F, 0x09], np.uint8), 3).tolist()
  [-1, 7, -7]
  """
  packed = np.asarray(packed, np.uint8)
  low = (packed & 0x0F).astype(np.int8)
  high = (packed >> 4).astype(np.int8)
  both = np.stack([low, high], axis=1).reshape(-1)[:n]
  return np.where(both > 7, both - 16, both).astype(np.int8)


def parse(path_or_bytes) -> _Reader:
  """A parsed model (for the exporter and validator in this package)."""
  return _Reader(read_bytes(path_or_bytes))


@_guarded
def inspect_tflite(path_or_bytes) -> List[TensorRow]:
  """One row per tensor: name, dtype, shape, bytes, constant or not, levels and bits used.

  Example:

  >>> rows = inspect_tflite("model.tflite")                  # doctest: +SKIP
  >>> [(r.name, r.dtype, r.bits_used) for r in rows if r.is_constant][:1]  # doctest: +SKIP
  [('model/conv1/Conv2D', 'INT4', 4)]
  """
  reader = parse(path_or_bytes)
  rows = []
  for t in range(reader.n_tensors):
    type_name, _, bits = TYPE_INFO.get(reader.tensors[t].Type(), ("UNKNOWN", None, 0))
    raw = reader.buffer(t)
    values = reader.int_values(t)
    levels = bits_used = None
    # Levels and bits describe quantized weights (INT2/4/8/16, UINT8). INT32
    # biases and INT64 shapes are stored at full width: no "bits" to report.
    if values is not None and values.size and bits <= 16:
      levels = int(np.unique(values).size)
      bits_used = max(1, math.ceil(math.log2(levels))) if levels > 1 else 1
    rows.append(TensorRow(
        index=t, name=reader.name(t), dtype=type_name, shape=reader.shape(t),
        bytes=len(raw) if raw is not None else 0, is_constant=raw is not None,
        levels=levels, bits_used=bits_used, quantized=reader.n_scales(t) > 0,
        n_scales=reader.n_scales(t)))
  return rows


@_guarded
def list_ops(path_or_bytes) -> List[OpInfo]:
  """The operators of the main subgraph, in execution order."""
  return list(parse(path_or_bytes).ops)


def name_has_layer(tensor_name: str, layer: str) -> bool:
  """True if a TFLite tensor name carries Keras layer ``layer``.

  The converter names tensors after the TF ops inside the layer's name scope,
  ``<model>/<layer>/<op>``, and joins fused ops with ``;``. A layer matches a
  whole path segment, so ``conv1`` does not match ``conv1_bn``.

  >>> name_has_layer("model/conv1/Relu;model/conv1/Conv2D", "conv1")
  True
  >>> name_has_layer("model/conv1_bn/FusedBatchNorm", "conv1")
  False
  """
  return any(layer in part.split("/")[1:] or part.split("/")[0] == layer
             for part in tensor_name.split(";"))


@_guarded
def layer_weight_ops(path_or_bytes, layers: Sequence[str]) -> Dict[str, List[dict]]:
  """For each Keras layer, the weight ops (conv, depthwise, fully connected) it became.

  Each entry: ``{"op_index", "op", "weight_tensor", "weight_name", "output_name"}``.
  The weight tensor (input 1) keeps the layer's name scope even when the
  output tensor is renamed (the model's last op outputs
  ``StatefulPartitionedCall:0``).
  """
  reader = parse(path_or_bytes) if not isinstance(path_or_bytes, _Reader) else path_or_bytes
  found: Dict[str, List[dict]] = {layer: [] for layer in layers}
  for op in reader.ops:
    if op.op not in WEIGHT_OPS or len(op.inputs) < 2:
      continue
    w = op.inputs[1]  # the filter, for every op in WEIGHT_OPS
    if w < 0:
      continue
    names = [reader.name(w)] + [reader.name(o) for o in op.outputs if o >= 0]
    for layer in layers:
      if any(name_has_layer(n, layer) for n in names):
        found[layer].append({"op_index": op.index, "op": op.op, "weight_tensor": w,
                             "weight_name": reader.name(w),
                             "output_name": reader.name(op.outputs[0])})
        break
  return found


@_guarded
def check_against_plan(path_or_bytes, plan: QuantizationPlan) -> List[str]:
  """Problems found: layers whose stored weights carry more levels than planned.

  A layer planned at ``b`` bits (narrow range) may hold at most ``2**b - 1``
  distinct values; a layer planned float must have float weights. Returns an
  empty list when every layer carries its planned bits.

  Example:

  >>> check_against_plan("model.tflite", plan)               # doctest: +SKIP
  []
  """
  if not isinstance(plan, QuantizationPlan):
    raise InvalidInputError(
        f"Expected a QuantizationPlan. Received: plan of type {type(plan).__name__}")
  reader = parse(path_or_bytes)
  ops = layer_weight_ops(reader, plan.layers)
  problems = []
  for layer, bits in plan.weight_bits.items():
    if not ops[layer]:
      problems.append(f"{layer}: no weight op of this layer was found in the file")
      continue
    for entry in ops[layer]:
      t = entry["weight_tensor"]
      type_name = TYPE_INFO.get(reader.tensors[t].Type(), ("?",))[0]
      if bits == FLOAT_BITS:
        if type_name not in ("FLOAT32", "FLOAT16"):
          problems.append(f"{layer}: planned float, stored {type_name}")
        continue
      values = reader.int_values(t)
      if values is None:
        problems.append(f"{layer}: planned {bits} bits, stored {type_name} (not integer)")
        continue
      levels = int(np.unique(values).size)
      if levels > 2**bits - 1:
        problems.append(f"{layer}: planned {bits} bits (<= {2**bits - 1} levels), "
                        f"stored {levels} distinct {type_name} values")
  return problems


def format_rows(rows: Sequence[TensorRow], constants_only: bool = True,
                file_size: Optional[int] = None) -> str:
  """A fixed-width text table of `inspect_tflite` rows.

  The last lines give the bytes of the constant tensors and, with
  ``file_size``, the file's real size (the rest is the graph, the
  quantization parameters and metadata).
  """
  rows = [r for r in rows if r.is_constant or not constants_only]
  header = f"{'tensor':<48} {'dtype':<8} {'shape':<18} {'bytes':>8} {'levels':>7} {'bits':>5}"
  lines = [header, "-" * len(header)]
  for r in rows:
    name = r.name if len(r.name) <= 48 else r.name[:45] + "..."
    lines.append(f"{name:<48} {r.dtype:<8} {str(list(r.shape)):<18} {r.bytes:>8} "
                 f"{'' if r.levels is None else r.levels:>7} "
                 f"{'' if r.bits_used is None else r.bits_used:>5}")
  total = sum(r.bytes for r in rows if r.is_constant)
  lines.append(f"{'constant tensor data':<48} {'':<8} {'':<18} {total:>8}")
  if file_size is not None:
    lines.append(f"{'file size (data + graph, scales, metadata)':<48} {'':<8} {'':<18} "
                 f"{int(file_size):>8}")
  return "\n".join(lines)


# --------------------------------------------------------------------------- rebuilding


def align(model_bytes: bytes) -> bytes:
  """Rebuilds a flatbuffer with the schema's 16-byte buffer alignment (TFLite Micro's tool)."""
  try:
    from tflite_micro.tensorflow.lite.micro.tools import (
      tflite_flatbuffer_align_wrapper as aw,  # pylint: disable=g-import-not-at-top
    )
  except ImportError:
    return model_bytes
  with tempfile.TemporaryDirectory(prefix="keras_mpq_align_") as tmp:
    src, dst = os.path.join(tmp, "in.tflite"), os.path.join(tmp, "out.tflite")
    with open(src, "wb") as f:
      f.write(model_bytes)
    aw.align_tflite_model(src, dst)
    with open(dst, "rb") as f:
      return f.read()


def has_cut_zero_points(path_or_bytes) -> bool:
  """True if some tensor has one zero point for several scales (an mcu file's 'zero_points' strip)."""
  try:
    reader = path_or_bytes if isinstance(path_or_bytes, _Reader) else parse(path_or_bytes)
    for tensor in reader.tensors:
      q = tensor.Quantization()
      if q is not None and q.ScaleLength() > 1 and q.ZeroPointLength() == 1:
        return True
  except Exception:  # pylint: disable=broad-except  # a damaged file: the runtime's checks say so
    return False
  return False


def restore_zero_points(model_bytes: bytes) -> bytes:
  """Undoes the 'zero_points' strip step (one zero per scale again), for LiteRT's checks."""
  from tensorflow.lite.tools import flatbuffer_utils as fu  # pylint: disable=g-import-not-at-top
  model = fu.read_model_from_bytearray(bytearray(model_bytes))
  changed = False
  for sg in model.subgraphs:
    for t in sg.tensors:
      q = t.quantization
      if q is None or q.scale is None or q.zeroPoint is None:
        continue
      if len(q.zeroPoint) == 1 and len(q.scale) > 1:
        q.zeroPoint = np.full(len(q.scale), q.zeroPoint[0], np.int64)
        changed = True
  if not changed:
    return model_bytes
  return align(bytes(fu.convert_object_to_bytearray(model)))
