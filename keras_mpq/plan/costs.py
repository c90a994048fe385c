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

>>> from keras_mpq.base.compat import keras
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

from keras_mpq.base.compat import keras
from keras_mpq.base.errors import BudgetInfeasibleError, InvalidInputError
from keras_mpq.base.types import (
  FLOAT_BITS,
  BudgetKind,
  CostTable,
  LayerCost,
  check_activation_bits,
  check_weight_bits,
)
from keras_mpq.export.storage import storage_bytes
from keras_mpq.model.size import layer_costs

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

  >>> from keras_mpq.base.types import LayerCost
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


def file_cost_table(model, profile, bits: Sequence[int] = (2, 4, 8),
                    activation_bits: Union[int, Mapping[str, int]] = 8) -> CostTable:
  """`cost_table` whose ``bytes`` are the exported file's bytes for ``profile.target``.

  Each layer costs what `storage_bytes` says; the rest of the file (graph,
  activation tensors' quantization, names, signature, metadata) is
  ``profile.fixed_bytes``, measured from a real export of this model
  (`keras_mpq.export.storage.measure_storage`). A plan's ``bytes`` is then the
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


def file_costs(folded, target, bits, activation_bits, strip, seed, budget) -> CostTable:
  """Byte costs of ``target``'s file; refuses a budget below its fixed part, before synthesis."""
  from keras_mpq.export import storage as storage_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.plan import costs as costs_lib  # pylint: disable=g-import-not-at-top
  profile = storage_lib.measure_storage(folded, target, activation_bits=activation_bits,
                                       strip=strip, seed=seed)
  table = costs_lib.file_cost_table(folded, profile, bits=bits, activation_bits=activation_bits)
  smallest = float(table.matrix("bytes").min(axis=1).sum())
  m = table.matrix("bytes")
  fixed_rows = [n for n, row in zip(table.layers, m) if np.ptp(row) == 0]
  flat = (f" On {target}, layers {fixed_rows} cost the same at every bit-width (their "
          "operators run only with int8 weights there)." if fixed_rows else "")
  if budget.value < smallest:
    raise BudgetInfeasibleError(
        f"Expected a byte budget of at least {smallest:.0f} B for target={target!r}: that is "
        f"the smallest file (every layer at {min(bits)} bits), of which {table.fixed_bytes:.0f} B "
        "is the file's fixed part (graph, activation scales, structure), measured by "
        f"exporting this model.{flat} Received: budget={budget.describe()}. Raise the "
        "budget, or add lower candidate bit-widths.", smallest)
  return table
