"""What each layer costs in an exported file, per target: the storage rules and their measurement.

`storage_bytes` is the bytes a layer's weights take in a target's file at a
bit-width (packed int4, int8 or float containers, alignment, per-channel
scales); `measure_storage` exports the model once to measure the file's fixed
part. `keras_mpq.plan.costs.file_cost_table` reads both, so a byte budget
means the same to the allocator and to the file.

>>> profile = measure_storage(model, "mcu")  # doctest: +SKIP
>>> profile.fixed_bytes  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from keras_mpq.base import layers as layers_lib
from keras_mpq.base.errors import InvalidInputError, UnsupportedModelError
from keras_mpq.base.types import LayerCost, QuantizationPlan, to_jsonable
from keras_mpq.export.exporter import export_tflite
from keras_mpq.export.flatbuffer import resolve_strip
from keras_mpq.export.targets import TARGETS

# --------------------------------------------------------------------------- file bytes per target


REPACK_ALLOWANCE = 16
"""Bytes charged per layer whose weights the exporter rewrites with TFLite
Micro's model editor (3-bit layers repacked into int4, 4-bit layers unpacked
into int8 where the operator has no int4 kernel): the rebuild moves a file by
at most 8 bytes (a Conv+Dense model's 2-, 3- and 4-bit plans: mobile -8..+8,
mcu 0, its buffers re-aligned afterwards), so the prediction errs on the
large side. The rebuild once kept the model's old metadata buffers beside
the new ones (+144..152 bytes, charged 256 here); `keras_mpq.export.flatbuffer`
now drops them."""


BUFFER_ALIGNMENT = 16
"""mcu files are rebuilt with TFLite Micro's 16-byte buffer alignment
(`keras_mpq.export.flatbuffer.inline_buffers`): a weight buffer takes its data rounded up
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
  comes from `keras_mpq.export.recipe.decide` (int4 packed where that target runs
  it, else int8; float on mobile only); on 'mcu' each weight buffer is
  rounded up to `BUFFER_ALIGNMENT` bytes, as the aligned file stores it; on
  'mobile' a buffer that is not int8 is charged an upper bound (see
  `BUFFER_ALIGNMENT`). Integer layers add a float32 scale and
  an int64 zero point per channel (one zero point in all when stripped), and
  their int32 biases with the biases' own scales and zero points; float layers
  add float32 biases.
  """
  from keras_mpq.export import recipe as export_recipe_lib  # pylint: disable=g-import-not-at-top  # the storage rules
  total = 0.0
  integer = False
  for op, n in ops:
    d = export_recipe_lib.decide(cost.name, op, bits, activation_bits, target)
    data = container_bytes(d.container, n)
    if target == "mcu":  # TFLite Micro files align each buffer to 16 bytes
      data = _round_up(data)
    elif d.container != "int8":  # mobile: an upper bound over both of its file layouts
      data = _round_up(data) + BUFFER_ALIGNMENT
    total += data
    if d.repack_int4 or d.unpack_int8:  # the model editor rebuilds the file (<= 8 B)
      total += REPACK_ALLOWANCE
    integer = integer or d.container != "float"
  if not integer:
    return total + 4.0 * cost.n_bias
  zp = (lambda k: 8.0 if k else 0.0) if zero_points_stripped else (lambda k: 8.0 * k)
  total += 4.0 * cost.n_scales + zp(cost.n_scales)
  if cost.n_bias:
    total += 4.0 * cost.n_bias + 4.0 * cost.n_bias + zp(cost.n_bias)
  return total


@dataclasses.dataclass(frozen=True)
class StorageProfile:
  """What a real export of a model for a target measured, for `keras_mpq.plan.costs.file_cost_table`.

  ``size``: the file's bytes with every planned layer at ``reference_bits``;
  ``ops``: per layer, its weight operators and their weight counts;
  ``zero_points_stripped``: whether the file's per-channel zero points were
  cut (the mcu default).
  """

  target: str
  size: int
  ops: Mapping[str, Tuple[Tuple[str, int], ...]]
  reference_bits: int = 8
  zero_points_stripped: bool = False
  strip: Tuple[str, ...] = ()

  def to_dict(self) -> Dict[str, Any]:
    return to_jsonable(dataclasses.asdict(self))


def measure_storage(model, target: str = "mobile", layers: Optional[Sequence[str]] = None,
                    activation_bits: int = 8, strip=None, seed: int = 0) -> StorageProfile:
  """Exports ``model`` once for ``target`` at 8 bits and measures its file (one cheap export).

  Calibration uses two random inputs: ranges do not change a file's size.
  The same stripping as the final export (``strip``) is applied, so the
  fixed part measured is the fixed part of the file that will be written.

  Example:

  >>> p = measure_storage(model, "mcu")                     # doctest: +SKIP
  >>> p.size, p.ops["fc1"]                                  # doctest: +SKIP
  (55280, (('FULLY_CONNECTED', 50176),))
  """
  if target not in TARGETS:
    raise InvalidInputError(f"Expected target in {TARGETS}. Received: target={target!r}")
  if layers is None:
    layers = [l.name for l in layers_lib.quantizable_layers(model)]
  steps = resolve_strip(strip, target)
  plan = QuantizationPlan({n: 8 for n in layers}, {n: activation_bits for n in layers},
                          activation_bits)
  rng = np.random.default_rng(seed)
  x = [rng.uniform(0.0, 1.0, (2,) + tuple(int(d) for d in t.shape[1:])).astype(np.float32)
       for t in model.inputs]
  x = x[0] if len(x) == 1 else x
  with tempfile.TemporaryDirectory(prefix="keras_mpq_measure_") as tmp:
    r = export_tflite(model, os.path.join(tmp, "m.tflite"), plan, target, x, strip=steps,
                      deployment=False, seed=seed)
  ops: Dict[str, List[Tuple[str, int]]] = {n: [] for n in layers}
  for l in r.layers:
    if l.stored_type != "INT8":
      raise UnsupportedModelError(
          f"Expected every layer stored int8 in an 8-bit export. Received: {l.layer} "
          f"stored {l.stored_type}")
    ops[l.layer].append((l.op, int(l.bytes)))
  return StorageProfile(target, int(r.size), {k: tuple(v) for k, v in ops.items()}, 8,
                        "zero_points" in steps, tuple(steps))
