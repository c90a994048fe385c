"""Integrity checks of an exported file: its weight integers, scales and operators.

`check_weight_integers` refuses a file whose weight integers differ from the
Keras model's planned integers (the file must be the model that was
measured); `check_scales` and `check_runtime_ops` refuse scales and operators
the target runtime cannot run.

>>> check_weight_integers(model, plan, qbytes)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from keras_mpq.base import layers as layers_lib
from keras_mpq.base.errors import UnsupportedModelError
from keras_mpq.base.types import FLOAT_BITS
from keras_mpq.export import reader as reader_lib
from keras_mpq.export.recipe import Decision
from keras_mpq.export.targets import TFLM_KERNELS, TFLM_MAX_INPUTS


def _kernel_for_op(layer, op: str):
  """(kernel, reduce_axes) of ``layer`` that TFLite op ``op`` carries, or None."""
  spec = layers_lib.weight_spec(layer)
  if len(spec) > 1:  # separable: the depthwise and the 1x1 op
    spec = [s for s in spec if (s[0] == "depthwise_kernel") == (op == "DEPTHWISE_CONV_2D")]
  if len(spec) != 1:
    return None
  attr, axes = spec[0]
  return getattr(layer, attr).numpy(), axes


def _layout_mismatch(expected: np.ndarray, got: np.ndarray) -> Tuple[int, int]:
  """(differing values, max |difference|) under the best axis order of ``expected``.

  TFLite stores kernels transposed (conv OHWI, fully connected (out, in),
  depthwise (1, H, W, C*M)): every permutation of the Keras axes that
  reshapes to the stored shape is tried.
  """
  import itertools  # pylint: disable=g-import-not-at-top
  best = (got.size, int(np.max(np.abs(got))) if got.size else 0)
  if expected.size != got.size:
    return best
  for perm in itertools.permutations(range(expected.ndim)):
    cand = expected.transpose(perm).reshape(got.shape)
    diff = np.abs(cand.astype(np.int64) - got.astype(np.int64))
    n = int(np.count_nonzero(diff))
    if n < best[0]:
      best = (n, int(diff.max()))
      if n == 0:
        break
  return best


def converter_factor(values: Optional[np.ndarray], kernel: np.ndarray) -> float:
  """The scalar the converter multiplied a Keras kernel by, 1.0 when it did not.

  The TFLite converter folds a constant scalar multiply next to a weight op
  into the op's kernel: EfficientNet's ``Rescaling(1/255)``, with the untrained
  ``Normalization`` after it an identity, ends up inside ``stem_conv``'s
  kernel, and the Mul is gone from the graph. The max-abs grid is scale-free,
  so the integers stay the Keras model's and only the scales carry the
  factor. ``values`` is the float file's tensor for that kernel (None when
  it has none). Returns ``c`` when it holds exactly ``c * kernel`` (every
  value, to 1e-5 relative), else 1.0 (and the scale comparison then reports
  any difference).
  """
  peak = float(np.max(np.abs(kernel))) if kernel.size else 0.0
  if values is None or values.size != kernel.size or peak == 0.0:
    return 1.0
  factor = float(np.max(np.abs(values))) / peak
  if not (np.isfinite(factor) and factor > 0) or abs(factor - 1.0) <= 1e-6:
    return 1.0
  got = np.sort(np.abs(values.astype(np.float64)))
  want = np.sort(np.abs(kernel.astype(np.float64).reshape(-1))) * factor
  return factor if np.allclose(got, want, rtol=1e-5, atol=1e-7 * factor * peak) else 1.0


# Per weight operator: the indices of its (input, filter, bias) among the op's inputs.
BIAS_SLOTS = {"CONV_2D": (0, 1, 2), "DEPTHWISE_CONV_2D": (0, 1, 2),
               "FULLY_CONNECTED": (0, 1, 2), "TRANSPOSE_CONV": (2, 1, 3)}
BIAS_INT_TYPES = {2: np.int32, 4: np.int64}  # TensorType INT32, INT64


def quantized_biases(reader, float_reader):
  """Each weight op with per-channel integer weights and an integer bias.

  Yields ``(op, input t, filter t, bias t, filter integers per channel (n, -1),
  filter scales, input scale, bias integers, bias scales, float bias)``; the
  float bias is the float file's tensor of the same name (None when absent).
  """
  float_index = {float_reader.name(t): t for t in range(float_reader.n_tensors)}
  for op in reader.ops:
    slots = BIAS_SLOTS.get(op.op)
    if slots is None or len(op.inputs) <= max(slots):
      continue
    x_t, w_t, b_t = (op.inputs[i] for i in slots)
    if min(x_t, w_t, b_t) < 0:
      continue
    xq, wq, bq = (reader.tensors[t].Quantization() for t in (x_t, w_t, b_t))
    if any(q is None or q.ScaleLength() == 0 for q in (xq, wq, bq)):
      continue
    ints, bints = reader.int_values(w_t), reader.int_values(b_t)
    if ints is None or bints is None or reader.tensors[b_t].Type() not in BIAS_INT_TYPES:
      continue
    wscale = wq.ScaleAsNumpy()
    n = wscale.size
    if n < 2 or bints.size != n:
      continue
    per_channel = np.moveaxis(ints.reshape(reader.shape(w_t)), wq.QuantizedDimension(),
                              0).reshape(n, -1)
    f_t = float_index.get(reader.name(b_t))
    bias = float_reader.float_values(f_t) if f_t is not None and reader.name(b_t) else None
    if bias is not None and bias.size != n:
      bias = None
    yield (op, x_t, w_t, b_t, per_channel, wscale, float(xq.ScaleAsNumpy()[0]), bints,
           bq.ScaleAsNumpy(), bias)


def check_biases(qbytes: bytes, float_bytes: bytes) -> List[str]:
  """Problems: integer biases in the file that do not hold the float model's biases.

  Each weight op's int32 (int64) bias must dequantize to the float file's bias
  within half its step (plus float rounding); a bias whose scale is too small
  overflows instead (issue 30). Returns one line per bad tensor, naming it.
  """
  problems = []
  reader = reader_lib.parse(qbytes)
  for op, _, w_t, _, _, _, _, bints, bscale, bias in quantized_biases(
      reader, reader_lib.parse(float_bytes)):
    if bias is None:
      continue
    want = bias.astype(np.float64)
    scale = np.broadcast_to(bscale.astype(np.float64), want.shape)
    got = bints.astype(np.float64) * scale
    bad = np.abs(got - want) > 0.5 * scale * (1 + 1e-3) + 1e-6 * np.abs(want)
    if np.any(bad):
      c = int(np.argmax(np.where(bad, np.abs(got - want), -1)))
      problems.append(
          f"bias of {reader.name(w_t)!r} ({op.op}): {int(bad.sum())} of {bad.size} values "
          f"differ from the float model's (channel {c}: {got[c]:.6g} stored, {want[c]:.6g} "
          f"expected, bias scale {scale[c]:.3e})")
  return problems


def check_weight_integers(qbytes: bytes, model, decisions: Sequence[Decision],
                          float_ops, float_bytes: Optional[bytes] = None) -> List[str]:
  """Problems: exported weight tensors whose integers or scales differ from the model's.

  For each quantized layer, the integers the Keras side holds (max-abs per
  channel at the planned bits, `keras_mpq.base.layers.quantize_array`, which
  reproduces `keras_mpq.quantization.apply`'s optimized integers exactly) are compared
  value for value with the file's, after the container's exact multiple
  (2-bit levels stored as +-7 in INT4 or +-3 in INT8), and the scales of the
  channels with nonzero integers to 1e-5 relative (a channel whose integers
  are all 0 may hold any positive scale:
  `keras_mpq.export.flatbuffer.rescale_zero_channels`). Given the float
  flatbuffer the file was quantized from (``float_bytes``), a kernel the
  converter scaled by a constant (a scalar multiply it folded in,
  `converter_factor`) is expected with its scales scaled by that constant.
  Returns one line per mismatching tensor, naming it.
  """
  reader = reader_lib.parse(qbytes)
  float_reader = reader_lib.parse(float_bytes) if float_bytes is not None else None
  float_index = ({float_reader.name(t): t for t in range(float_reader.n_tensors)}
                 if float_reader is not None else {})
  index = {reader.name(t): t for t in range(reader.n_tensors)}
  problems = []
  for d in decisions:
    if d.container == "float":
      continue
    bits = 8 if d.planned_bits == FLOAT_BITS else d.planned_bits
    names = [e["weight_name"] for e in float_ops[d.layer] if e["output_name"] == d.output_name]
    found = _kernel_for_op(model.get_layer(d.layer), d.op)
    if not names or found is None:
      continue
    t = index.get(names[0])
    got = reader.int_values(t) if t is not None else None
    if got is None:
      problems.append(f"{names[0]!r} (layer {d.layer!r}): no integer tensor in the file")
      continue
    kernel, axes = found
    _, ints, scales = layers_lib.quantize_array(kernel, bits, axes)
    ratio = (2 ** (d.request_bits - 1) - 1) / (2 ** (bits - 1) - 1)
    if ratio != int(ratio):
      problems.append(f"{names[0]!r} (layer {d.layer!r}): {bits}-bit grid stored at "
                      f"{d.request_bits} bits is not an exact multiple")
      continue
    got = got.reshape(reader.shape(t))
    n_bad, worst = _layout_mismatch(ints * int(ratio), got)
    if n_bad:
      problems.append(f"{names[0]!r} (layer {d.layer!r}, {bits} bits): {n_bad} of {got.size} "
                      f"integers differ from the Keras model's (max difference {worst})")
      continue
    q = reader.tensors[t].Quantization()
    stored = np.sort(q.ScaleAsNumpy()) if q is not None and q.ScaleLength() else None
    float_t = float_index.get(names[0])
    factor = (converter_factor(float_reader.float_values(float_t), kernel)
              if float_t is not None else 1.0)
    want = np.asarray(scales, np.float64).reshape(-1) / ratio * factor
    if stored is None or stored.size != want.size:
      problems.append(f"{names[0]!r} (layer {d.layer!r}): {0 if stored is None else stored.size} "
                      f"scales stored, expected {want.size}")
      continue
    # Channels whose integers are all 0 (dead) may hold any scale (see
    # `rescale_zero_channels`); every other channel's scale must be the model's.
    live_model = np.any(np.moveaxis(ints, [a % ints.ndim for a in axes],
                                    list(range(len(axes)))).reshape(-1, want.size) != 0, axis=0)
    live_file = np.any(np.moveaxis(got, q.QuantizedDimension(), 0).reshape(want.size, -1) != 0,
                       axis=1)
    stored_all = q.ScaleAsNumpy()
    stored, want = np.sort(stored_all[live_file]), np.sort(want[live_model])
    if stored.size != want.size:
      problems.append(f"{names[0]!r} (layer {d.layer!r}): {stored.size} channels with nonzero "
                      f"integers stored, expected {want.size}")
    elif not np.allclose(stored, want, rtol=1e-5, atol=0):
      problems.append(f"{names[0]!r} (layer {d.layer!r}): scales differ from the Keras model's "
                      f"(max relative {np.max(np.abs(stored / want - 1)):.2e})")
  return problems


def layer_of_tensor(name: str, layer_names: Sequence[str]) -> Optional[str]:
  for layer in layer_names:
    if reader_lib.name_has_layer(name, layer):
      return layer
  return None


def _layer_of_op(reader, op, layer_names: Sequence[str]) -> str:
  """The Keras layer an operator came from, as its tensors' names tell.

  The model's last operator writes a tensor the converter renames
  (``StatefulPartitionedCall:0``): it is then named as the output layer
  after the layer of its first named input.
  """
  for t in op.outputs:
    layer = layer_of_tensor(reader.name(t), layer_names) if t >= 0 else None
    if layer is not None:
      return layer
  for t in op.inputs:
    layer = layer_of_tensor(reader.name(t), layer_names) if t >= 0 else None
    if layer is not None:
      outputs = {reader.sg.Outputs(i) for i in range(reader.sg.OutputsLength())}
      return (f"the output layer after {layer}" if any(o in outputs for o in op.outputs)
              else layer)
  return "?"


def _where(labels: Sequence[str]) -> str:
  """'layer a', 'layers a, b' or 'the output layer after a', from `_layer_of_op` labels."""
  labels = sorted(set(labels))
  named = [l for l in labels if not l.startswith("the ")]
  parts = ([f"layer{'s' if len(named) > 1 else ''} {', '.join(named)}"] if named else [])
  return ", ".join(parts + [l for l in labels if l.startswith("the ")])


def check_runtime_ops(float_bytes: bytes, target: str, layer_names: Sequence[str]) -> None:
  """Raises `UnsupportedModelError` naming the layer of each operator ``target``'s runtime lacks.

  'mcu' and 'ethos-u' files run in TFLite Micro: every operator needs a
  kernel there (`TFLM_KERNELS`) and at most the inputs that kernel prepares
  (`TFLM_MAX_INPUTS`); 'mobile' (LiteRT) runs every builtin operator.

  >>> check_runtime_ops(b"", "mobile", [])
  """
  if target == "mobile":
    return
  reader = reader_lib.parse(float_bytes)
  missing: Dict[str, List[str]] = {}
  too_many: Dict[Tuple[str, int], List[str]] = {}
  for op in reader.ops:
    if op.op not in TFLM_KERNELS:
      missing.setdefault(op.op, []).append(_layer_of_op(reader, op, layer_names))
    elif len(op.inputs) > TFLM_MAX_INPUTS.get(op.op, len(op.inputs)):
      too_many.setdefault((op.op, len(op.inputs)), []).append(
          _layer_of_op(reader, op, layer_names))
  problems = []
  if missing:
    parts = [f"{op} ({_where(ls)})" for op, ls in sorted(missing.items())]
    problems.append(
        f"Expected only operators TFLite Micro has kernels for (target={target!r}). "
        f"Received: {'; '.join(parts)}. Replace those layers with supported ones "
        "(see keras_mpq.export.targets.TFLM_KERNELS)")
  if too_many:
    parts = [f"{op} of {n} inputs ({_where(ls)})" for (op, n), ls in sorted(too_many.items())]
    limits = ", ".join(f"{op} at most {TFLM_MAX_INPUTS[op]}"
                       for op in sorted({op for op, _ in too_many}))
    problems.append(
        f"Expected operators TFLite Micro can prepare (target={target!r}): its kernels take "
        f"{limits} inputs. Received: {'; '.join(parts)}. Concatenate at most "
        f"{TFLM_MAX_INPUTS['CONCATENATION']} tensors per Concatenate layer (nest them); an "
        "UpSampling1D(size) becomes one CONCATENATION of size x steps inputs (each step "
        "repeated), so write it as Reshape((steps, 1, channels)), UpSampling2D((size, 1)), "
        "Reshape((steps * size, channels)) (RESIZE_NEAREST_NEIGHBOR)")
  if problems:
    raise UnsupportedModelError(". ".join(problems) + ". Or export with target='mobile'.")


# --------------------------------------------------------------------------- scale checks


def check_scales(model_bytes: bytes) -> List[str]:
  """Problems with the quantization parameters of a file: NaN/Inf or non-positive scales.

  A zero, negative, NaN or infinite scale makes a tensor's integers
  meaningless (a zero-width range). Returns one line per bad tensor, naming
  it; an empty list when every scale is finite and > 0.
  """
  reader = reader_lib.parse(model_bytes)
  problems = []
  for t, tensor in enumerate(reader.tensors):
    q = tensor.Quantization()
    if q is None or q.ScaleLength() == 0:
      continue
    scales = q.ScaleAsNumpy()
    bad = ~np.isfinite(scales) | (scales <= 0)
    if np.any(bad):
      kinds = []
      if np.any(np.isnan(scales)):
        kinds.append("NaN")
      if np.any(np.isinf(scales)):
        kinds.append("infinite")
      if np.any(np.isfinite(scales) & (scales <= 0)):
        kinds.append("zero-width (scale <= 0)")
      problems.append(f"tensor {t} {reader.name(t)!r}: {int(bad.sum())} of {scales.size} "
                      f"scales {' / '.join(kinds)}")
  return problems
