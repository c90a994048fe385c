"""What each quantizable layer costs at each bit-width: bytes, average bits, BOPs, latency.

`layer_costs` reads the numbers off a built tf_keras model (kernel sizes,
biases, per-channel scales, multiply-accumulates per sample); `cost_table`
turns them into the per-(layer, bits) `CostTable` the allocator sums.

The counts, per layer (``k`` = kernel elements, ``S`` = product of the
spatial dimensions of the layer's output, one sample):

=================  ===============================  =========================
layer              n_scales (per output channel)    macs
=================  ===============================  =========================
Dense              units                            k * S (S = 1 for 2-D)
Conv1D / Conv2D    filters                          k * S
DepthwiseConv2D    in_channels * depth_multiplier   k * S
SeparableConv2D    in*depth_multiplier + filters    (k_dw + k_pw) * S
Conv2DTranspose    filters                          k * S_in (input spatial)
=================  ===============================  =========================

A transposed convolution multiplies every input pixel by the whole kernel, so
its MACs come from the input's spatial size, not the output's. Bias additions
are not counted. A layer called more than once in the model counts once per
call. When a spatial dimension is unknown (``None``), ``macs`` is ``None``
and `cost_table` leaves BOPs out.

Example:

>>> from keras_mpq.compat import keras
>>> model = keras.Sequential([keras.Input((8, 8, 3)),
...                           keras.layers.Conv2D(4, 3, padding="same", name="c")])
>>> c = layer_costs(model)[0]
>>> (c.n_params, c.n_bias, c.n_scales, c.macs)
(108, 4, 4, 6912)
>>> cost_table(model, bits=(4, 8)).matrix("bytes").tolist()
[[118.0, 172.0]]
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from keras_mpq import quantizers
from keras_mpq.compat import keras
from keras_mpq.types import (FLOAT_BITS, BudgetKind, CostTable, InvalidInputError,
                             LayerCost, UnsupportedModelError, check_activation_bits,
                             check_weight_bits)

_TRANSPOSED = ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")


# --------------------------------------------------------------------------- per layer


def layer_costs(model, layers: Optional[Sequence[Any]] = None) -> List[LayerCost]:
  """The `LayerCost` of each quantizable layer of a built tf_keras model, in model order.

  Args:
    model: a built ``keras.Model`` (tf_keras) whose layers have weights.
    layers: optional subset, as layer names or layer objects; each must be a
      quantizable layer of ``model`` (see `keras_mpq.quantizers.quantizable_layers`).

  Returns:
    One `LayerCost` per layer: quantized kernel weights, biases, per-channel
    scales and MACs per sample (``None`` when a spatial size is unknown).

  Example:

  >>> from keras_mpq.compat import keras
  >>> model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3, name="fc")])
  >>> layer_costs(model)
  [LayerCost(name='fc', layer_type='Dense', n_params=30, n_bias=3, n_scales=3, macs=30)]
  """
  if not isinstance(model, keras.Model):
    raise InvalidInputError(
        "Expected a tf_keras Model (load Keras 3 models with keras_mpq.load_model). "
        f"Received: model of type {type(model).__name__}")
  candidates = quantizers.quantizable_layers(model)
  if not candidates:
    raise UnsupportedModelError(
        "Expected a model with at least one quantizable layer (Dense, Conv1D, Conv2D, "
        "DepthwiseConv2D, SeparableConv2D, Conv2DTranspose). Received: model "
        f"{model.name!r} with layers {[type(l).__name__ for l in model.layers]}")
  if layers is not None:
    by_name = {l.name: l for l in candidates}
    chosen = []
    for item in layers:
      name = item if isinstance(item, str) else getattr(item, "name", None)
      if name not in by_name or (not isinstance(item, str) and by_name[name] is not item):
        raise InvalidInputError(
            f"Expected quantizable layers of model {model.name!r}. Received: "
            f"layers containing {name if name is not None else item!r}; quantizable "
            f"layers are {sorted(by_name)}")
      chosen.append(by_name[name])
    candidates = chosen
  return [_layer_cost(model, layer) for layer in candidates]


def _layer_cost(model, layer) -> LayerCost:
  spec = quantizers.weight_spec(layer)
  n_params = 0
  n_scales = 0
  kernel_sizes = []
  for attr, reduce_axes in spec:
    kernel = getattr(layer, attr, None)
    if kernel is None:
      raise UnsupportedModelError(
          f"Expected a built model. Received: layer {layer.name!r} has no {attr!r} yet; "
          "call the model on data or start it with keras.Input(shape) first.")
    shape = tuple(int(d) for d in kernel.shape)
    size = int(np.prod(shape))
    kernel_sizes.append(size)
    n_params += size
    n_scales += int(np.prod([d for i, d in enumerate(shape) if i not in reduce_axes]))
  bias = getattr(layer, "bias", None) if getattr(layer, "use_bias", True) else None
  n_bias = int(np.prod(bias.shape)) if bias is not None else 0
  return LayerCost(name=layer.name, layer_type=type(layer).__name__,
                   n_params=n_params, n_bias=n_bias, n_scales=n_scales,
                   macs=_macs(model, layer, n_params))


def _macs(model, layer, n_params: int) -> Optional[int]:
  """Multiply-accumulates per sample, summed over the layer's calls inside ``model``."""
  nodes = list(getattr(layer, "_inbound_nodes", []))
  network_nodes = getattr(model, "_network_nodes", None)
  if network_nodes:
    nodes = [n for i, n in enumerate(nodes) if f"{layer.name}_ib-{i}" in network_nodes]
  if not nodes:
    return None
  transposed = type(layer).__name__ in _TRANSPOSED
  channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
  total = 0
  for node in nodes:
    shape = node.input_shapes if transposed else node.output_shapes
    if isinstance(shape, list):  # a layer of ours has one input and one output
      shape = shape[0]
    dims = list(shape)[1:]  # drop the batch dimension
    if isinstance(layer, keras.layers.Dense):
      spatial = dims[:-1]
    else:
      spatial = dims[1:] if channels_first else dims[:-1]
    if any(d is None for d in spatial):
      return None
    total += n_params * int(np.prod([int(d) for d in spatial]))
  return int(total)


# --------------------------------------------------------------------------- table


def cost_table(model_or_layer_costs, bits: Sequence[int] = (2, 4, 8),
               activation_bits: Union[int, Mapping[str, int]] = 8,
               latency_table: Optional[Mapping[str, Mapping[Any, float]]] = None
               ) -> CostTable:
  """Per-(layer, bits) costs of every kind the allocator can budget.

  Kinds: ``bytes`` (`LayerCost.weight_bytes`: packed weights, int32 biases,
  per-channel scales), ``avg_bits`` (``n_params * bits / total_params``, so a
  plan's sum is its parameter-weighted average bit-width), ``bops``
  (``macs * weight_bits * activation_bits``; a layer kept float,
  ``FLOAT_BITS``, counts 32 x 32) and ``latency`` (only with ``latency_table``).

  Args:
    model_or_layer_costs: a built tf_keras model, or a sequence of `LayerCost`.
    bits: candidate weight bit-widths (2..8, and ``FLOAT_BITS`` for float).
    activation_bits: 8 or 16 for every layer, or a mapping layer name -> bits
      (layers not named get 8).
    latency_table: ``{layer name or layer type: {bits: milliseconds}}``; a
      layer's own name is looked up first, then its type (``"Conv2D"``). Bit
      keys may be ints or strings; ``"float"`` stands for ``FLOAT_BITS``.

  Returns:
    A `CostTable` with rows in layer order and columns in ascending ``bits``.

  Example:

  >>> from keras_mpq.types import LayerCost
  >>> c = LayerCost("fc", "Dense", n_params=1000, n_bias=10, n_scales=10, macs=1000)
  >>> t = cost_table([c], bits=(4, 8), latency_table={"Dense": {4: 0.2, 8: 0.3}})
  >>> t.matrix("avg_bits").tolist(), t.matrix("bops").tolist()
  ([[4.0, 8.0]], [[32000.0, 64000.0]])
  >>> t.matrix("latency").tolist()
  [[0.2, 0.3]]
  """
  if isinstance(model_or_layer_costs, keras.Model):
    costs = layer_costs(model_or_layer_costs)
  else:
    try:
      costs = list(model_or_layer_costs)
    except TypeError:
      raise InvalidInputError(
          "Expected a built tf_keras model or a list of LayerCost. Received: "
          f"{type(model_or_layer_costs).__name__}") from None
    bad = [c for c in costs if not isinstance(c, LayerCost)]
    if bad or not costs:
      received = f"an item {bad[0]!r}" if bad else "an empty list"
      raise InvalidInputError(
          "Expected a built tf_keras model or a non-empty list of LayerCost. "
          f"Received: {received}")
  names = [c.name for c in costs]
  if len(set(names)) != len(names):
    raise InvalidInputError(f"Expected distinct layer names. Received: {names}")

  bits = _check_bits(bits)
  act = _activation_bits(activation_bits, names)
  total_params = sum(c.n_params for c in costs)
  if total_params <= 0:
    raise InvalidInputError(
        f"Expected layers with weights. Received: total n_params={total_params}")

  n, k = len(costs), len(bits)
  table: Dict[str, np.ndarray] = {
      BudgetKind.BYTES.value: np.array([[c.weight_bytes(b) for b in bits] for c in costs]),
      BudgetKind.AVG_BITS.value: np.array(
          [[c.n_params * b / total_params for b in bits] for c in costs]),
  }
  if all(c.macs is not None for c in costs):
    table[BudgetKind.BOPS.value] = np.array(
        [[float(c.macs) * b * (FLOAT_BITS if b == FLOAT_BITS else a) for b in bits]
         for c, a in zip(costs, act)])
  if latency_table is not None:
    table[BudgetKind.LATENCY.value] = _latency(latency_table, costs, bits)
  for kind, arr in table.items():
    assert arr.shape == (n, k), (kind, arr.shape)
  return CostTable(tuple(names), bits, table, tuple(costs))


# --------------------------------------------------------------------------- file bytes per target


REPACK_ALLOWANCE = 256
"""Bytes charged per layer whose weights the exporter rewrites with TFLite
Micro's model editor (3-bit layers repacked into int4, 4-bit layers unpacked
into int8 where the operator has no int4 kernel): the rebuild moved a digits
MLP's file by 152 bytes and a small Conv+Dense model's by 144 (once per file;
charged per layer, so the prediction errs on the large side)."""


BUFFER_ALIGNMENT = 16
"""mcu files are rebuilt with TFLite Micro's 16-byte buffer alignment
(`keras_mpq.export.inline_buffers`): a weight buffer takes its data rounded up
to a multiple of 16 bytes (measured exact on a digits separable CNN across
mixed 2/4/8-bit plans). mobile files are written by ai-edge-quantizer in one
of two layouts: below 256 KiB of constant data every buffer is inline
(4-byte aligned), above it every buffer of 1 KiB or more sits after the
flatbuffer, 16-byte aligned. Which one a plan gets depends on the whole
plan, so a mobile layer stored other than int8 (the 8-bit reference the fixed
part was measured at) is charged its data rounded up to 16 bytes plus 16: at
least what it takes in either layout (a MobileNetV2's 8-bit and mixed files
differ in layout; without this a file came out 8 bytes over its budget)."""


def _round_up(n: int) -> int:
  return -(-int(n) // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT


def container_bytes(container: str, n: int) -> int:
  """Bytes of ``n`` weights in a TFLite ``container`` ('int4' packs two per byte).

  >>> container_bytes("int4", 9), container_bytes("int8", 9), container_bytes("float", 9)
  (5, 9, 36)
  """
  if container == "int4":
    return (int(n) + 1) // 2
  if container == "int8":
    return int(n)
  if container == "float":
    return 4 * int(n)
  raise InvalidInputError(f"Expected a container int4, int8 or float. Received: {container!r}")


def storage_bytes(cost: LayerCost, ops: Sequence[Tuple[str, int]], bits: int,
                  activation_bits: int, target: str, zero_points_stripped: bool = False
                  ) -> float:
  """One layer's bytes in ``target``'s file at ``bits``, by the exporter's own storage rules.

  ``ops`` are the layer's weight operators and their weight counts, as
  measured in an export (`StorageProfile.ops`). Per operator, the container
  comes from `keras_mpq.export.decide` (int4 packed where that target runs
  it, else int8; float on mobile only); on 'mcu' each weight buffer is
  rounded up to `BUFFER_ALIGNMENT` bytes, as the aligned file stores it; on
  'mobile' a buffer that is not int8 is charged an upper bound (see
  `BUFFER_ALIGNMENT`). Integer layers add a float32 scale and
  an int64 zero point per channel (one zero point in all when stripped), and
  their int32 biases with the biases' own scales and zero points; float layers
  add float32 biases.
  """
  from keras_mpq import export as export_lib  # pylint: disable=g-import-not-at-top  # the storage rules
  total = 0.0
  integer = False
  for op, n in ops:
    d = export_lib.decide(cost.name, op, bits, activation_bits, target)
    data = container_bytes(d.container, n)
    if target == "mcu":  # TFLite Micro files align each buffer to 16 bytes
      data = _round_up(data)
    elif d.container != "int8":  # mobile: an upper bound over both of its file layouts
      data = _round_up(data) + BUFFER_ALIGNMENT
    total += data
    if d.repack_int4 or d.unpack_int8:  # the model editor rebuilds the file (+144..152 B)
      total += REPACK_ALLOWANCE
    integer = integer or d.container != "float"
  if not integer:
    return total + 4.0 * cost.n_bias
  zp = (lambda k: 8.0 if k else 0.0) if zero_points_stripped else (lambda k: 8.0 * k)
  total += 4.0 * cost.n_scales + zp(cost.n_scales)
  if cost.n_bias:
    total += 4.0 * cost.n_bias + 4.0 * cost.n_bias + zp(cost.n_bias)
  return total


def file_cost_table(model, profile, bits: Sequence[int] = (2, 4, 8),
                    activation_bits: Union[int, Mapping[str, int]] = 8) -> CostTable:
  """`cost_table` whose ``bytes`` are the exported file's bytes for ``profile.target``.

  Each layer costs what `storage_bytes` says; the rest of the file (graph,
  activation tensors' quantization, names, signature, metadata) is
  ``profile.fixed_bytes``, measured from a real export of this model
  (`keras_mpq.export.measure_storage`). A plan's ``bytes`` is then the
  predicted size of its file.

  Example:

  >>> profile = export.measure_storage(model, "mcu")       # doctest: +SKIP
  >>> t = file_cost_table(model, profile)                  # doctest: +SKIP
  >>> t.plan_cost(plan, "bytes")                           # predicted file size  # doctest: +SKIP
  """
  base = cost_table(model, bits=bits, activation_bits=activation_bits)
  act = _activation_bits(activation_bits, base.layers)
  by_name = {c.name: c for c in base.layer_costs}
  missing = [n for n in base.layers if n not in profile.ops]
  if missing:
    raise InvalidInputError(
        f"Expected a storage profile of this model. Received: one without layers {missing}")
  rows = []
  for name, a in zip(base.layers, act):
    rows.append([storage_bytes(by_name[name], profile.ops[name], b, a, profile.target,
                               profile.zero_points_stripped) for b in base.bits])
  layer_bytes = np.array(rows, dtype=np.float64)
  at_reference = sum(storage_bytes(by_name[n], profile.ops[n], profile.reference_bits, a,
                                   profile.target, profile.zero_points_stripped)
                     for n, a in zip(base.layers, act))
  fixed = float(profile.size - at_reference)
  if fixed < 0:
    raise InvalidInputError(
        f"Expected a measured file ({profile.size} bytes) at least as large as its layers' "
        f"storage ({at_reference:.0f} bytes). Received: a profile of another model?")
  table = dict(base.table)
  table[BudgetKind.BYTES.value] = layer_bytes + fixed / len(base.layers)
  return CostTable(base.layers, base.bits, table, base.layer_costs, fixed, profile.target)


def _check_bits(bits) -> Tuple[int, ...]:
  if isinstance(bits, (int, np.integer)):
    bits = (bits,)
  try:
    bits = [check_weight_bits(b, "bits") for b in bits]
  except TypeError:
    raise InvalidInputError(
        f"Expected a sequence of weight bit-widths such as (2, 4, 8). Received: bits={bits!r}"
    ) from None
  if not bits or len(set(bits)) != len(bits):
    raise InvalidInputError(
        f"Expected distinct weight bit-widths such as (2, 4, 8). Received: bits={bits}")
  return tuple(sorted(bits))


def _activation_bits(activation_bits, names: Sequence[str]) -> List[int]:
  if isinstance(activation_bits, Mapping):
    unknown = sorted(set(activation_bits) - set(names))
    if unknown:
      raise InvalidInputError(
          f"Expected activation_bits for known layers {list(names)}. "
          f"Received: unknown layers {unknown}")
    return [check_activation_bits(activation_bits.get(n, 8), f"activation_bits[{n!r}]")
            for n in names]
  a = check_activation_bits(activation_bits)
  return [a] * len(names)


def _latency(latency_table, costs: Sequence[LayerCost], bits: Sequence[int]) -> np.ndarray:
  if not isinstance(latency_table, Mapping):
    raise InvalidInputError(
        "Expected latency_table as {layer name or type: {bits: ms}}. Received: "
        f"{type(latency_table).__name__}")
  rows, missing = [], []
  for c in costs:
    entry = latency_table.get(c.name, latency_table.get(c.layer_type))
    if entry is None:
      missing.append(f"{c.name} ({c.layer_type})")
      rows.append([0.0] * len(bits))
      continue
    if not isinstance(entry, Mapping):
      raise InvalidInputError(
          f"Expected latency_table[{c.name!r} or {c.layer_type!r}] to map bits -> ms. "
          f"Received: {entry!r}")
    by_bits = {}
    for key, ms in entry.items():
      b = FLOAT_BITS if str(key).lower() == "float" else _int_key(key, c)
      try:
        ms = float(ms)
      except (TypeError, ValueError):
        ms = math.nan
      if not math.isfinite(ms) or ms < 0:
        raise InvalidInputError(
            f"Expected finite latencies >= 0 in ms. Received: latency for {c.name!r} "
            f"at {key!r} bits = {entry[key]!r}")
      by_bits[b] = ms
    lacking = [b for b in bits if b not in by_bits]
    if lacking:
      raise InvalidInputError(
          f"Expected a latency for every candidate bit-width {list(bits)}. Received: "
          f"layer {c.name!r} ({c.layer_type}) has none for {lacking}")
    rows.append([by_bits[b] for b in bits])
  if missing:
    raise InvalidInputError(
        "Expected a latency entry for every layer, by name or by layer type. "
        f"Received: none for {missing}")
  return np.array(rows, dtype=np.float64)


def _int_key(key, c: LayerCost) -> int:
  try:
    return int(key)
  except (TypeError, ValueError):
    raise InvalidInputError(
        f"Expected bit-width keys (ints or 'float') in the latency table. Received: "
        f"{key!r} for layer {c.name!r}") from None
