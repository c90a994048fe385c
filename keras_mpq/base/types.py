"""Shared types of keras_mpq: budgets, plans, sensitivity tables, cost tables, errors.

Every stage speaks in these. They are frozen dataclasses with ``to_dict`` /
``from_dict`` (and ``to_json`` / ``from_json``) and validate themselves in
``__post_init__``, so a bad value fails where it is made, not three stages later.

Conventions used everywhere:

* Layers are named by their Keras layer name in the *float* model (after
  BatchNorm folding, which keeps the name of the layer folded into).
* A weight bit-width is an int in 2..8; ``FLOAT_BITS`` (32) means "kept float".
* Activation bit-widths are 8 or 16.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from keras_mpq.base.errors import InvalidInputError, KerasMpqError

FLOAT_BITS = 32
"""Bit-width that means "not quantized, kept float32"."""

MIN_WEIGHT_BITS = 2
MAX_WEIGHT_BITS = 8
ACTIVATION_BITS = (8, 16)


# --------------------------------------------------------------------------- budget


class BudgetKind(str, enum.Enum):
  """What a `Budget` limits."""

  BYTES = "bytes"  # total weight storage, scales included
  AVG_BITS = "avg_bits"  # parameter-weighted average weight bit-width
  BOPS = "bops"  # sum over layers of MACs * weight bits * activation bits
  LATENCY = "latency"  # sum of per-layer latency from a target's table (ms)


_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
               "gb": 1000**3, "gib": 1024**3}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.I)


@dataclasses.dataclass(frozen=True)
class Budget:
  """A limit on one resource of the quantized model.

  ``value`` may be ``math.inf``: then the resource is unrestricted and the
  allocator returns the all-highest-bits plan.

  Example:

  >>> Budget.bytes(48_000)
  Budget(kind=<BudgetKind.BYTES: 'bytes'>, value=48000.0)
  >>> Budget.parse("48KB") == Budget.bytes(48_000)
  True
  >>> Budget.parse("4bit")
  Budget(kind=<BudgetKind.AVG_BITS: 'avg_bits'>, value=4.0)
  """

  kind: BudgetKind
  value: float

  def __post_init__(self):
    try:
      kind = BudgetKind(self.kind)
    except ValueError:
      raise InvalidInputError(
          f"Expected a budget kind in {[k.value for k in BudgetKind]}. "
          f"Received: kind={self.kind!r}") from None
    object.__setattr__(self, "kind", kind)
    try:
      value = float(self.value)
    except (TypeError, ValueError):
      raise InvalidInputError(
          f"Expected a number for the budget value. Received: value={self.value!r}"
      ) from None
    if math.isnan(value) or value <= 0:
      raise InvalidInputError(
          f"Expected a positive budget value. Received: value={self.value!r}")
    object.__setattr__(self, "value", value)

  @classmethod
  def bytes(cls, n: float) -> "Budget":
    """Bytes of the exported file (flash) when costs come from a target's storage rules.

    `keras_mpq.quantize` measures the file's fixed part (graph, activations'
    quantization, names, ...) with one export of the model for its target, so
    ``n`` is the size of the whole .tflite file. A `CostTable` built without
    a target counts weights only (packed weights, biases, per-channel scales).
    """
    return cls(BudgetKind.BYTES, n)

  @classmethod
  def avg_bits(cls, bits: float) -> "Budget":
    """Average weight bit-width, weighted by parameter count."""
    return cls(BudgetKind.AVG_BITS, bits)

  @classmethod
  def bops(cls, n: float) -> "Budget":
    """Bit operations: sum of MACs * weight bits * activation bits."""
    return cls(BudgetKind.BOPS, n)

  @classmethod
  def latency(cls, ms: float) -> "Budget":
    """Latency in milliseconds, from a target's per-layer latency table."""
    return cls(BudgetKind.LATENCY, ms)

  @classmethod
  def parse(cls, spec: Any) -> "Budget":
    """Turns a user's budget into a `Budget`.

    Accepts a `Budget`, a dict from `to_dict`, a size string (``"48KB"``,
    ``"1.5MiB"``, ``"20000B"``), an average bit-width (``"4bit"``,
    ``"3.5bits"``), BOPs (``"2.1e9bops"``, ``"300MBOPs"``) or latency
    (``"5ms"``).
    """
    if isinstance(spec, Budget):
      return spec
    if isinstance(spec, Mapping):
      return cls.from_dict(spec)
    if not isinstance(spec, str):
      raise InvalidInputError(
          "Expected a budget such as Budget.bytes(48000), '48KB', '4bit', "
          f"'2e9bops' or '5ms'. Received: budget={spec!r} "
          f"(type {type(spec).__name__}); a bare number is ambiguous.")
    text = spec.strip().lower().replace("_", "")
    match = _BUDGET_RE.match(text)
    if not match:
      raise InvalidInputError(
          "Expected a budget such as '48KB', '1.5MiB', '4bit', '3.5bits', "
          f"'2e9bops' or '5ms'. Received: budget={spec!r}")
    number, unit = float(match.group(1)), match.group(2)
    if unit in ("bit", "bits", "b_avg"):
      return cls.avg_bits(number)
    if unit in _SIZE_UNITS:
      return cls.bytes(number * _SIZE_UNITS[unit])
    bops_units = {"bops": 1, "kbops": 1e3, "mbops": 1e6, "gbops": 1e9}
    if unit in bops_units:
      return cls.bops(number * bops_units[unit])
    if unit == "ms":
      return cls.latency(number)
    raise InvalidInputError(
        f"Unknown budget unit {unit!r} in {spec!r}. Use one of: B, KB, KiB, MB, "
        "MiB (bytes); bit or bits (average bit-width); bops, MBOPs, GBOPs; ms.")

  def is_satisfied_by(self, plan: "QuantizationPlan", costs: "CostTable",
                      rtol: float = 1e-9) -> bool:
    """True if ``plan`` costs at most ``value`` under ``costs``."""
    return costs.plan_cost(plan, self.kind) <= self.value * (1 + rtol)

  def describe(self) -> str:
    unit = {BudgetKind.BYTES: "B", BudgetKind.AVG_BITS: " bits avg",
            BudgetKind.BOPS: " BOPs", BudgetKind.LATENCY: " ms"}[self.kind]
    return f"{self.value:g}{unit}"

  def to_dict(self) -> Dict[str, Any]:
    return {"kind": self.kind.value, "value": self.value}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Budget":
    if not isinstance(d, Mapping) or "kind" not in d or "value" not in d:
      raise InvalidInputError(
          "Expected a budget dict {'kind': ..., 'value': ...}. "
          f"Received: {dict(d) if isinstance(d, Mapping) else d!r}")
    return cls(d["kind"], d["value"])


# --------------------------------------------------------------------------- plan


def check_weight_bits(bits: int, where: str = "bits") -> int:
  """Validates one weight bit-width (2..8, or FLOAT_BITS)."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise InvalidInputError(
        f"Expected an integer weight bit-width. Received: {where}={bits!r}")
  bits = int(bits)
  if bits != FLOAT_BITS and not MIN_WEIGHT_BITS <= bits <= MAX_WEIGHT_BITS:
    raise InvalidInputError(
        f"Expected weight bits in {MIN_WEIGHT_BITS}..{MAX_WEIGHT_BITS} "
        f"(or {FLOAT_BITS} for float). Received: {where}={bits}")
  return bits


def check_activation_bits(bits: int, where: str = "activation_bits") -> int:
  if isinstance(bits, bool) or int(bits) not in ACTIVATION_BITS:
    raise InvalidInputError(
        f"Expected activation bits in {ACTIVATION_BITS}. Received: {where}={bits!r}")
  return int(bits)


@dataclasses.dataclass(frozen=True)
class QuantizationPlan:
  """One weight bit-width (and activation bit-width) per quantizable layer.

  Example:

  >>> plan = QuantizationPlan({"conv1": 8, "dense": 4})
  >>> plan.weight_bits["dense"]
  4
  >>> QuantizationPlan.from_json(plan.to_json()) == plan
  True
  """

  weight_bits: Mapping[str, int]
  activation_bits: Mapping[str, int] = dataclasses.field(default_factory=dict)
  default_activation_bits: int = 8
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    if not isinstance(self.weight_bits, Mapping):
      raise InvalidInputError(
          "Expected weight_bits to be a mapping layer name -> bits. "
          f"Received: {type(self.weight_bits).__name__}")
    wb = {str(k): check_weight_bits(v, f"weight_bits[{k!r}]")
          for k, v in self.weight_bits.items()}
    ab = {str(k): check_activation_bits(v, f"activation_bits[{k!r}]")
          for k, v in dict(self.activation_bits).items()}
    object.__setattr__(self, "weight_bits", dict(wb))
    object.__setattr__(self, "activation_bits", dict(ab))
    object.__setattr__(self, "default_activation_bits",
                       check_activation_bits(self.default_activation_bits))
    object.__setattr__(self, "info", dict(self.info))

  @classmethod
  def uniform(cls, layers: Iterable[str], bits: int, **kwargs) -> "QuantizationPlan":
    """The same weight bit-width for every layer."""
    return cls({name: bits for name in layers}, **kwargs)

  @property
  def layers(self) -> Tuple[str, ...]:
    return tuple(self.weight_bits)

  def act_bits(self, layer: str) -> int:
    return self.activation_bits.get(layer, self.default_activation_bits)

  def replace(self, **changes) -> "QuantizationPlan":
    """A copy with some layers' weight bits changed: ``plan.replace(conv1=4)``."""
    wb = dict(self.weight_bits)
    for name, bits in changes.items():
      if name not in wb:
        raise InvalidInputError(
            f"Layer {name!r} is not in the plan. Layers: {sorted(wb)}")
      wb[name] = bits
    return dataclasses.replace(self, weight_bits=wb)

  def to_dict(self) -> Dict[str, Any]:
    return {"weight_bits": dict(self.weight_bits),
            "activation_bits": dict(self.activation_bits),
            "default_activation_bits": self.default_activation_bits,
            "info": _jsonable(self.info)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "QuantizationPlan":
    if not isinstance(d, Mapping) or "weight_bits" not in d:
      received = f"keys {sorted(map(str, d))}" if isinstance(d, Mapping) else _kind(d)
      raise InvalidInputError(
          "Expected a plan: an object with a 'weight_bits' mapping layer -> bits, as "
          f"QuantizationPlan.to_json writes. Received: {received}")
    return _build("plan", lambda: cls(
        d["weight_bits"], d.get("activation_bits", {}) or {},
        d.get("default_activation_bits", 8), d.get("info", {}) or {}))

  def to_json(self, indent: int = 2) -> str:
    return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

  @classmethod
  def from_json(cls, text: str) -> "QuantizationPlan":
    """The plan in ``text`` (what `to_json` wrote); `InvalidInputError` if it is not one.

    >>> QuantizationPlan.from_json("{not json")
    Traceback (most recent call last):
    ...
    keras_mpq.base.errors.InvalidInputError: Expected a plan as JSON. Received text that is not valid JSON (line 1 column 2: Expecting property name enclosed in double quotes).
    """
    return cls.from_dict(_parse_json(text, "plan"))


# --------------------------------------------------------------------------- sensitivity


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
  """Score of each (layer, weight bit-width): higher means more harmful.

  ``scores[i, j]`` is the sensitivity of ``layers[i]`` at ``bits[j]``. For the
  task-loss metrics it is a loss increase, so it may be slightly negative.

  Example:

  >>> t = SensitivityTable(("a", "b"), (4, 8), np.array([[0.5, 0.0], [0.1, 0.0]]))
  >>> t.score("a", 4)
  0.5
  """

  layers: Tuple[str, ...]
  bits: Tuple[int, ...]
  scores: np.ndarray
  metric: str = "task_interaction"
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    layers = tuple(str(x) for x in self.layers)
    bits = tuple(check_weight_bits(b) for b in self.bits)
    scores = np.asarray(self.scores, dtype=np.float64)
    if len(set(layers)) != len(layers):
      raise InvalidInputError(f"Duplicate layer names in sensitivity table: {layers}")
    if len(set(bits)) != len(bits) or not bits:
      raise InvalidInputError(f"Expected distinct bit-widths. Received: bits={bits}")
    if scores.shape != (len(layers), len(bits)):
      raise InvalidInputError(
          f"Expected scores of shape {(len(layers), len(bits))} "
          f"(layers x bits). Received: shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
      raise InvalidInputError("Sensitivity scores must be finite; found NaN or Inf.")
    scores = scores.copy()
    scores.setflags(write=False)
    object.__setattr__(self, "layers", layers)
    object.__setattr__(self, "bits", bits)
    object.__setattr__(self, "scores", scores)
    object.__setattr__(self, "info", dict(self.info))

  def __eq__(self, other):
    return (isinstance(other, SensitivityTable) and self.layers == other.layers
            and self.bits == other.bits and self.metric == other.metric
            and np.array_equal(self.scores, other.scores))

  def score(self, layer: str, bits: int) -> float:
    return float(self.scores[self.layers.index(layer), self.bits.index(bits)])

  def predicted(self, plan: QuantizationPlan) -> float:
    """Sum over layers of the score at the plan's bits (the allocator's objective)."""
    total = 0.0
    for i, layer in enumerate(self.layers):
      b = plan.weight_bits.get(layer, max(self.bits))
      if b in self.bits:
        total += self.scores[i, self.bits.index(b)]
    return float(total)

  def to_dict(self) -> Dict[str, Any]:
    return {"metric": self.metric, "layers": list(self.layers),
            "bits": list(self.bits), "scores": self.scores.tolist(),
            "info": _jsonable(self.info)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SensitivityTable":
    missing = ([k for k in ("layers", "bits", "scores") if k not in d]
               if isinstance(d, Mapping) else None)
    if missing is None or missing:
      received = f"missing {missing}" if missing else _kind(d)
      raise InvalidInputError(
          "Expected a sensitivity table: an object with 'layers', 'bits' and 'scores', "
          f"as SensitivityTable.to_json writes. Received: {received}")
    return _build("sensitivity table", lambda: cls(
        tuple(d["layers"]), tuple(d["bits"]), np.asarray(d["scores"], dtype=np.float64),
        str(d.get("metric", "task_interaction")), d.get("info", {}) or {}))

  def to_json(self, indent: int = 2) -> str:
    return json.dumps(self.to_dict(), indent=indent)

  @classmethod
  def from_json(cls, text: str) -> "SensitivityTable":
    """The table in ``text`` (what `to_json` wrote); `InvalidInputError` if it is not one.

    >>> SensitivityTable.from_json('{"layers": ["a"], "bits": [4]}')
    Traceback (most recent call last):
    ...
    keras_mpq.base.errors.InvalidInputError: Expected a sensitivity table: an object with 'layers', 'bits' and 'scores', as SensitivityTable.to_json writes. Received: missing ['scores']
    """
    return cls.from_dict(_parse_json(text, "sensitivity table"))


def _kind(value) -> str:
  return f"a JSON {type(value).__name__}: {str(value)[:60]!r}"


def _parse_json(text, what: str):
  """``json.loads``, but text that is not JSON is an `InvalidInputError`."""
  if isinstance(text, (bytes, bytearray)):
    text = bytes(text).decode("utf-8", "replace")
  if not isinstance(text, str):
    raise InvalidInputError(
        f"Expected the JSON text of a {what} (a str). Received: {type(text).__name__}")
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise InvalidInputError(
        f"Expected a {what} as JSON. Received text that is not valid JSON (line {e.lineno} "
        f"column {e.colno}: {e.msg}).") from None


def _build(what: str, make):
  """``make()``; a wrong field type (a list where bits belong, ...) is an `InvalidInputError`."""
  try:
    return make()
  except KerasMpqError:
    raise
  except (TypeError, ValueError, AttributeError) as e:
    raise InvalidInputError(f"Expected a {what} as to_json writes it. Received a field of "
                            f"the wrong type ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- costs


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """What one quantizable layer costs, read off the model.

  ``n_params`` counts the quantized weights (kernels), ``n_bias`` the biases
  (stored int32), ``n_scales`` the per-channel scales (float32 each, plus an
  int64 zero point in TFLite's file). ``macs`` counts multiply-accumulates for
  one input sample; None when a spatial size is unknown (then no BOPs costs).
  """

  name: str
  layer_type: str
  n_params: int
  n_bias: int
  n_scales: int
  macs: Optional[int]

  def weight_bytes(self, bits: int) -> float:
    """Bytes this layer's weights take in a TFLite file at ``bits``.

    Packed storage: int4 containers for 2..4 bits (two per byte), int8 for 5..8,
    float32 for FLOAT_BITS; plus 4-byte bias per output and 12 bytes per channel
    (float32 scale + int64 zero point), as TFLite writes them.
    """
    if bits == FLOAT_BITS:
      return 4.0 * (self.n_params + self.n_bias)
    container = 4 if bits <= 4 else 8
    return self.n_params * container / 8.0 + 4.0 * self.n_bias + 12.0 * self.n_scales

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CostTable:
  """Per-layer, per-bit-width costs for each `BudgetKind` the allocator knows.

  ``table[kind][i, j]`` is the cost of ``layers[i]`` at ``bits[j]``; a plan's
  cost is the sum over layers. Average bits are expressed as the sum of
  ``n_params * bits`` divided by the total parameter count, so they add up too.
  """

  layers: Tuple[str, ...]
  bits: Tuple[int, ...]
  table: Mapping[str, np.ndarray]
  layer_costs: Tuple[LayerCost, ...] = ()
  fixed_bytes: float = 0.0
  """The part of the file no plan changes (graph, names, activations' scales).
  When > 0, each row of the ``bytes`` matrix includes ``fixed_bytes /
  len(layers)``, so a plan's sum is the whole file; `layer_bytes` gives a
  layer's own bytes."""
  target: Optional[str] = None

  def layer_bytes(self, layer: str, bits: int) -> float:
    """One layer's own bytes at ``bits`` (its share of ``fixed_bytes`` taken out)."""
    i, j = self.layers.index(layer), self.bits.index(bits)
    return float(self.matrix("bytes")[i, j] - self.fixed_bytes / len(self.layers))

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
    fixed = {}
    for kind, arr in dict(self.table).items():
      kind = BudgetKind(kind).value
      arr = np.asarray(arr, dtype=np.float64)
      if arr.shape != (len(self.layers), len(self.bits)):
        raise InvalidInputError(
            f"Cost table for {kind!r} has shape {arr.shape}; expected "
            f"{(len(self.layers), len(self.bits))} (layers x bits).")
      if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise InvalidInputError(f"Cost table for {kind!r} must be finite and >= 0.")
      arr = arr.copy()
      arr.setflags(write=False)
      fixed[kind] = arr
    object.__setattr__(self, "table", fixed)

  def has(self, kind: BudgetKind) -> bool:
    return BudgetKind(kind).value in self.table

  def matrix(self, kind: BudgetKind) -> np.ndarray:
    kind = BudgetKind(kind).value
    if kind not in self.table:
      raise InvalidInputError(
          f"No {kind!r} costs are known for this model; known: {sorted(self.table)}. "
          "A latency budget needs a target with a latency table.")
    return self.table[kind]

  def plan_cost(self, plan: QuantizationPlan, kind: BudgetKind) -> float:
    m = self.matrix(kind)
    total = 0.0
    for i, layer in enumerate(self.layers):
      b = plan.weight_bits.get(layer, max(self.bits))
      if b not in self.bits:
        raise InvalidInputError(
            f"Plan gives layer {layer!r} {b} bits; costs are known for {self.bits}.")
      total += m[i, self.bits.index(b)]
    return float(total)

  def to_dict(self) -> Dict[str, Any]:
    return {"layers": list(self.layers), "bits": list(self.bits),
            "table": {k: v.tolist() for k, v in self.table.items()},
            "layer_costs": [c.to_dict() for c in self.layer_costs],
            "fixed_bytes": self.fixed_bytes, "target": self.target}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CostTable":
    return cls(tuple(d["layers"]), tuple(d["bits"]),
               {k: np.asarray(v) for k, v in d["table"].items()},
               tuple(LayerCost(**c) for c in d.get("layer_costs", [])),
               float(d.get("fixed_bytes", 0.0)), d.get("target"))


# --------------------------------------------------------------------------- helpers


def _jsonable(obj: Any) -> Any:
  """Converts numpy scalars/arrays and tuples inside ``obj`` to JSON types."""
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, enum.Enum):
    return obj.value
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)
  return obj


def to_jsonable(obj: Any) -> Any:
  """Public form of the JSON conversion used by every ``to_dict``."""
  return _jsonable(obj)
