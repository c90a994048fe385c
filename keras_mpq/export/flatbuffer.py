"""Edits of a TFLite flatbuffer after conversion: int4 repacking, buffer inlining, stripping, LUT compression.

>>> smaller = strip_model(model_bytes, "default")  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np

from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.results import LayerExport
from keras_mpq.export import checks as checks_lib
from keras_mpq.export import reader as reader_lib


def repack_int4(model_bytes: bytes, tensor_names: Sequence[str]) -> bytes:
  """Rewrites INT8 weight tensors whose values fit in 4 bits as packed INT4.

  Uses TFLite Micro's model editor to read and rebuild the flatbuffer and
  ai-edge-quantizer's nibble packing; scales and zero points are unchanged.
  """
  from ai_edge_quantizer.transformations import transformation_utils  # pylint: disable=g-import-not-at-top
  from tflite_micro.tensorflow.lite.micro.compression import model_editor  # pylint: disable=g-import-not-at-top
  from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  wanted = set(tensor_names)
  model = model_editor.read(model_bytes)
  done = set()
  for sg in model.subgraphs:
    for tensor in sg.tensors:
      if tensor.name in wanted and tensor.dtype == schema.TensorType.INT8:
        values = tensor.array
        if values is None or np.abs(values.astype(np.int32)).max() > 7:
          continue
        packed = transformation_utils.pack_data(4, values.reshape(-1).view(np.uint8))
        tensor.buffer.data = np.asarray(packed, np.uint8).tobytes()
        tensor.dtype = schema.TensorType.INT4
        done.add(tensor.name)
  if not done:
    return model_bytes
  return _build(model_editor, model)


def unpack_int8(model_bytes: bytes, tensor_names: Sequence[str]) -> bytes:
  """Rewrites packed INT4 weight tensors as INT8 holding the same values.

  Scales and zero points are unchanged: a 4-bit grid on a target whose
  runtime has no INT4 kernel for the operator keeps its exact integers.
  """
  from tflite_micro.tensorflow.lite.micro.compression import model_editor  # pylint: disable=g-import-not-at-top
  from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  wanted = set(tensor_names)
  model = model_editor.read(model_bytes)
  done = False
  for sg in model.subgraphs:
    for tensor in sg.tensors:
      if tensor.name in wanted and tensor.dtype == schema.TensorType.INT4 and tensor.buffer:
        n = int(np.prod(tensor.shape, dtype=np.int64))
        values = reader_lib.unpack_int4(np.frombuffer(bytes(tensor.buffer.data), np.uint8), n)
        tensor.buffer.data = values.astype(np.int8).tobytes()
        tensor.dtype = schema.TensorType.INT8
        done = True
  return _build(model_editor, model) if done else model_bytes


def _build(model_editor, model) -> bytes:
  """The edited model's bytes, without the buffers of its old metadata.

  The model editor writes each metadata value into a new buffer and keeps
  every buffer it read, so the old metadata buffers stayed in the file with
  nothing referring to them (a 4-bit decoder's mcu file came out 144 bytes
  larger than its 8-bit one); only buffers some tensor refers to are kept.
  """
  model_editor.prune_buffers(model)
  return bytes(model.build())


def inline_buffers(model_bytes: bytes, always: bool = False) -> bytes:
  """The file with every constant buffer inside the flatbuffer (none at an offset after it).

  ai-edge-quantizer writes the buffers of a model with 256 KiB or more of
  constant data after the flatbuffer, addressed by offset. The installed
  TFLite Micro runtime loads such a file but computes wrong outputs (a
  MobileNetV2 at 32x32: 0 of 8 classes agreed with Keras; the same file with
  its buffers inlined: 8 of 8), so 'mcu' and 'ethos-u' files are rebuilt with
  the buffers inline and TFLite Micro's 16-byte buffer alignment (``always``:
  every file, so that each weight buffer's size in the file is its data
  rounded up to 16 bytes, as `keras_mpq.export.storage.storage_bytes` charges it).
  Otherwise a file without offset buffers comes back unchanged.
  """
  reader = reader_lib.parse(model_bytes)
  if not always and not any(reader.model.Buffers(i).Offset() > 1 for i in range(reader.n_buffers)):
    return model_bytes
  from tensorflow.lite.tools import flatbuffer_utils as fu  # pylint: disable=g-import-not-at-top
  model = fu.read_model_from_bytearray(bytearray(model_bytes))  # moves offset data inline
  return reader_lib.align(bytes(fu.convert_object_to_bytearray(model)))


# --------------------------------------------------------------------------- stripping

STRIP_STEPS = ("names", "signatures", "metadata", "zero_points")
"""What `strip_model` can remove, in order. TFLite Micro reads none of it:
tensor and subgraph names and the model description ('names': each weight
operator's filter tensor keeps its Keras layer's name, and only that, so that
`keras-mpq inspect --plan`, `check_against_plan` and the deployment report
still find each layer's weights; every other tensor name is cut); the
signature defs; the converter's metadata (``CONVERSION_METADATA``,
``min_runtime_version``; an ``OfflineMemoryAllocation`` entry is kept); and
per-channel zero points that are all zero (symmetric weights and biases), cut
to one entry. LiteRT runs a file without names or signatures (inputs and
outputs are found by index), but refuses one whose zero points are cut (it
wants one per scale), so 'zero_points' is for TFLite Micro only; keras_mpq's
own LiteRT paths (`validate_tflite`, `benchmark_latency`) restore them in
memory first (`tflite_inspect.restore_zero_points`)."""

DEFAULT_STRIP = {"mobile": (), "mcu": STRIP_STEPS, "ethos-u": ()}
"""mcu strips by default everything `STRIP_STEPS` lists (each stripped file is
checked to give the same outputs in TFLite Micro). mobile files keep their
names and signature defs: LiteRT's signature runners and other tools read them."""
_KEEP_METADATA = (b"OfflineMemoryAllocation",)


def strip_model(model_bytes: bytes, steps: Sequence[str] = STRIP_STEPS,
                layer_names: Sequence[str] = ()) -> Tuple[bytes, Dict[str, int]]:
  """Removes what TFLite Micro does not read; returns the file and the bytes each step saved.

  Steps are applied in `STRIP_STEPS` order; each saving is measured on the
  rebuilt (aligned) file. See `STRIP_STEPS` for what each step removes. With
  'names', the filter tensor of each weight operator of a layer in
  ``layer_names`` is renamed to that layer's name; all other names are cut.
  """
  unknown = sorted(set(steps) - set(STRIP_STEPS))
  if unknown:
    raise InvalidInputError(
        f"Expected strip steps from {STRIP_STEPS}. Received: {unknown}")
  if not steps:
    return model_bytes, {}
  from tensorflow.lite.tools import flatbuffer_utils as fu  # pylint: disable=g-import-not-at-top
  model = fu.read_model_from_bytearray(bytearray(model_bytes))
  saved: Dict[str, int] = {}
  current = reader_lib.align(bytes(fu.convert_object_to_bytearray(model)))
  saved["rebuild"] = len(model_bytes) - len(current)
  for step in STRIP_STEPS:
    if step not in steps:
      continue
    if step == "names":
      keep = {}
      if layer_names:
        for layer, entries in reader_lib.layer_weight_ops(model_bytes, layer_names).items():
          for e in entries:
            keep[e["weight_tensor"]] = layer
      model.description = None
      for i, sg in enumerate(model.subgraphs):
        sg.name = None
        for t_index, t in enumerate(sg.tensors):
          t.name = keep.get(t_index) if i == 0 else None
    elif step == "signatures":
      model.signatureDefs = None
    elif step == "metadata":
      keep = [m for m in (model.metadata or []) if m.name in _KEEP_METADATA]
      for m in model.metadata or []:
        if m not in keep:
          model.buffers[m.buffer].data = None
      model.metadata = keep or None
    elif step == "zero_points":
      for sg in model.subgraphs:
        for t in sg.tensors:
          q = t.quantization
          zp = getattr(q, "zeroPoint", None) if q is not None else None
          if zp is not None and len(zp) > 1 and not np.any(zp):
            q.zeroPoint = np.zeros(1, np.int64)
    rebuilt = reader_lib.align(bytes(fu.convert_object_to_bytearray(model)))
    saved[step] = len(current) - len(rebuilt)
    current = rebuilt
  return current, saved



# --------------------------------------------------------------------------- main


def resolve_strip(strip, target) -> Tuple[str, ...]:
  if strip is None:
    return tuple(DEFAULT_STRIP[target])
  if strip is True:
    return STRIP_STEPS if target == "mcu" else tuple(s for s in STRIP_STEPS if s != "zero_points")
  if strip is False:
    return ()
  steps = (strip,) if isinstance(strip, str) else tuple(strip)
  unknown = sorted(set(steps) - set(STRIP_STEPS))
  if unknown:
    raise InvalidInputError(
        f"Expected strip=True, False, None or steps from {STRIP_STEPS}. Received: {strip!r}")
  if "zero_points" in steps and target != "mcu":
    raise InvalidInputError(
        "Expected strip step 'zero_points' only for target='mcu' (LiteRT and Vela want one "
        f"zero point per scale). Received: target={target!r}")
  return steps


def lut_compress(model_bytes: bytes, layers: Sequence[LayerExport], ops,
                 ) -> Tuple[bytes, List[str]]:
  """TFLite Micro lookup-table compression of 2- to 4-bit layers stored as int8.

  Each weight tensor becomes ``bits``-wide indices into a per-channel table
  of its int8 values, decoded at run time by a DECODE operator (into the
  arena: flash shrinks, RAM grows by the decoded tensor). Returns the file
  and the layers compressed.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  spec = importlib.import_module("tflite_micro.tensorflow.lite.micro.compression.spec")
  compress = importlib.import_module("tflite_micro.tensorflow.lite.micro.compression.compress")
  axis = {"FULLY_CONNECTED": 0, "CONV_2D": 0, "DEPTHWISE_CONV_2D": 3}
  specs, done = [], []
  for l in layers:
    if l.planned_bits not in (2, 3, 4) or l.stored_type != "INT8" or l.op not in axis:
      continue
    for entry in ops.get(l.layer, []):
      specs.append(spec.Tensor(0, entry["weight_tensor"], [
          spec.LookUpTableCompression(l.planned_bits, spec.PerChannel(axis[l.op]))]))
    done.append(l.layer)
  if not specs:
    return model_bytes, []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return bytes(compress.compress(model_bytes, specs)), done


def rescale_zero_channels(qbytes: bytes, float_bytes: bytes) -> Tuple[bytes, List[str]]:
  """Gives each weight channel whose integers are all 0 a usable scale, and its bias its value.

  ai-edge-quantizer gives such a channel (a dead filter: zero, or below
  `keras_mpq.base.layers.MIN_WEIGHT_BOUND` and quantized to 0 by keras_mpq) the scale
  ``1e-9 / q``, so the channel's bias scale, ``input scale * 1e-9 / q``, is too
  small for any real bias: the int32 bias overflows (a bias of 0.5 was stored
  as -2^31, its sign flipped) and the channel outputs about 0 instead of its
  bias (issue 30). With all its integers 0 the channel's weight scale is free:
  it gets the largest scale of the tensor's other channels (1 when none), or
  more where the bias needs it to fit, and the bias is quantized again with it
  from the float file's bias. Returns the file (unchanged when nothing was
  needed) and one note per tensor changed.
  """
  reader = reader_lib.parse(qbytes)
  float_reader = reader_lib.parse(float_bytes)
  edits = []
  for op, _, w_t, b_t, per_channel, wscale, in_scale, bints, bscale, bias in \
      checks_lib.quantized_biases(reader, float_reader):
    zero = ~np.any(per_channel, axis=1)
    if not np.any(zero) or bias is None or not (np.isfinite(in_scale) and in_scale > 0):
      continue
    dtype = checks_lib.BIAS_INT_TYPES[reader.tensors[b_t].Type()]
    limit = float(np.iinfo(dtype).max) / 2
    live = wscale[~zero]
    base = float(np.max(live)) if live.size else 1.0
    new_w = wscale.astype(np.float32).copy()
    need = np.abs(bias[zero].astype(np.float64)) / (in_scale * limit)
    new_w[zero] = np.maximum(base, need).astype(np.float32)
    new_b_scale = bscale.astype(np.float32).copy()
    new_b_scale[zero] = np.float32(in_scale) * new_w[zero]
    new_bints = bints.astype(dtype).copy()
    new_bints[zero] = np.clip(np.rint(bias[zero].astype(np.float64) / new_b_scale[zero]),
                              -limit, limit).astype(dtype)
    edits.append((w_t, b_t, new_w, new_b_scale, new_bints, int(np.sum(zero))))
  if not edits:
    return qbytes, []
  from tensorflow.lite.tools import flatbuffer_utils as fu  # pylint: disable=g-import-not-at-top
  model = fu.read_model_from_bytearray(bytearray(qbytes))
  tensors = model.subgraphs[0].tensors
  notes = []
  for w_t, b_t, new_w, new_b_scale, new_bints, n_zero in edits:
    tensors[w_t].quantization.scale = new_w
    tensors[b_t].quantization.scale = new_b_scale
    model.buffers[tensors[b_t].buffer].data = np.frombuffer(new_bints.tobytes(), np.uint8)
    notes.append(f"{reader.name(w_t)}: {n_zero} all-zero channel(s) given a usable scale "
                 "so that their bias fits")
  return reader_lib.align(bytes(fu.convert_object_to_bytearray(model))), notes
