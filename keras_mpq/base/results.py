"""What the stages return: search, Pareto, export, validation and synthesis results (frozen, JSON-able).

>>> result.to_dict()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from keras_mpq.base.types import (
  FLOAT_BITS,
  QuantizationPlan,
  SensitivityTable,
  to_jsonable,
)

# --------------------------------------------------------------------------- sensitivity search results

@dataclasses.dataclass(frozen=True)
class SearchResult:
  """What `search` found.

  Attributes:
    plan: the plan with the lowest measured loss among the rounds' plans that
      meet the budget (``plan.info["search"]`` says which round).
    sensitivity: the last round's `SensitivityTable`.
    rounds: one dict per round: ``round``, ``weight_bits``, ``predicted``
      (the table's sum for the plan), ``measured_loss`` (L(plan) on the data,
      calibrated at the plan), ``cost`` (in the budget's unit), ``budget``,
      ``within_budget``, ``changed`` (plan differs from the previous round's),
      ``repeat_of`` (the earlier round with the same plan, else None),
      ``seconds``.
  """

  plan: QuantizationPlan
  sensitivity: SensitivityTable
  rounds: Tuple[Dict[str, Any], ...]

  @property
  def best_round(self) -> int:
    return int(self.plan.info.get("search", {}).get("round", 0))

  def to_dict(self) -> Dict[str, Any]:
    return {"plan": self.plan.to_dict(), "sensitivity": self.sensitivity.to_dict(),
            "rounds": to_jsonable(list(self.rounds))}


# --------------------------------------------------------------------------- allocation results

@dataclasses.dataclass(frozen=True)
class ParetoPoint:
  """One point of the cost / predicted-loss front: a plan and what it costs.

  Unpacks like a tuple: ``cost, loss, plan = point``.
  """

  cost: float
  predicted_loss: float
  plan: QuantizationPlan

  def __iter__(self):
    return iter((self.cost, self.predicted_loss, self.plan))

  def to_dict(self) -> Dict[str, Any]:
    return {"cost": self.cost, "predicted_loss": self.predicted_loss,
            "plan": self.plan.to_dict()}


# --------------------------------------------------------------------------- export results

@dataclasses.dataclass(frozen=True)
class LayerExport:
  """How one Keras layer was stored in the exported file.

  ``storage`` is one of 'int4 packed', 'int4 holding N levels', 'int8',
  'int8 holding N levels', 'float32'. ``levels`` is the number of distinct
  stored values counted in the file; ``bytes`` the weight tensor's bytes.
  """

  layer: str
  op: str
  planned_bits: int
  activation_bits: int
  storage: str
  stored_type: str
  levels: Optional[int]
  bytes: int
  note: str = ""

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What `export_tflite` wrote.

  Attributes:
    path: the .tflite file (for 'ethos-u', Vela's compiled ``*_vela.tflite``).
    target: 'mobile', 'mcu' or 'ethos-u'.
    size: file size in bytes.
    layers: one `LayerExport` per planned layer, read back from the file.
    notes: fallbacks and decisions, in words.
    vela: for 'ethos-u', Vela's summary (NPU op share, SRAM/flash bytes,
      cycle estimate, ...); else None.
    mcu_path: for 'ethos-u', the TFLite Micro file Vela compiled; else None.
    deployment: flash (file bytes), RAM (``arena_bytes``: the TFLite Micro
      arena, measured by its interpreter; mcu and ethos-u), LiteRT latency,
      the bytes each stripping or compression step saved, and Vela's figures
      for ethos-u. See `keras_mpq.export.runtime.deployment_report`.
    other_layers: layers without a plan entry that have operators in the
      file, mapped to what their outputs are stored as ('float32', 'int8',
      ...): whether a layer the search did not touch was left float is a
      property of the target, read here from the file.
  """

  path: str
  target: str
  size: int
  layers: Tuple[LayerExport, ...]
  notes: Tuple[str, ...] = ()
  vela: Optional[Mapping[str, Any]] = None
  mcu_path: Optional[str] = None
  deployment: Optional[Mapping[str, Any]] = None
  other_layers: Optional[Mapping[str, str]] = None

  def to_dict(self) -> Dict[str, Any]:
    return to_jsonable({"path": self.path, "target": self.target, "size": self.size,
                        "layers": [l.to_dict() for l in self.layers],
                        "notes": list(self.notes), "vela": self.vela,
                        "mcu_path": self.mcu_path, "deployment": self.deployment,
                        "other_layers": self.other_layers})

  def table(self) -> str:
    """A text table of the per-layer storage."""
    head = f"{'layer':<16} {'op':<18} {'plan':>4} {'act':>4} {'storage':<22} {'bytes':>7}  note"
    lines = [head, "-" * len(head)]
    for l in self.layers:
      plan = "f32" if l.planned_bits == FLOAT_BITS else str(l.planned_bits)
      lines.append(f"{l.layer:<16} {l.op:<18} {plan:>4} {l.activation_bits:>4} "
                   f"{l.storage:<22} {l.bytes:>7}  {l.note}")
    lines.append(f"file: {self.path} ({self.size} bytes, target {self.target})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- validation results

@dataclasses.dataclass(frozen=True)
class ValidationResult:
  """What `validate_tflite` measured.

  ``accuracy`` needs labels; ``agreement`` (share of equal argmax) and the
  output errors need a reference model. ``layer_errors`` maps a Keras layer to
  the max abs error of its output tensor against the float model (LiteRT
  only, with ``per_layer=True``). ``metric`` is the user's measure (``metric=``)
  on the labels, named ``metric_name``. ``fidelity`` maps each output to its
  ``correlation`` with the reference's and its ``normalized_error`` (mean
  squared error over the reference output's variance); ``note`` says what
  was measured where it is not a classifier's accuracy.
  """

  runtime: str
  n: int
  seconds: float
  accuracy: Optional[float] = None
  agreement: Optional[float] = None
  max_abs_error: Optional[float] = None
  mean_abs_error: Optional[float] = None
  layer_errors: Optional[Mapping[str, float]] = None
  metric: Optional[float] = None
  metric_name: Optional[str] = None
  fidelity: Optional[Mapping[str, Mapping[str, float]]] = None
  note: Optional[str] = None

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


# --------------------------------------------------------------------------- synthesis results

@dataclasses.dataclass(frozen=True)
class SynthesisResult:
  """Synthetic calibration data and how it was made.

  Attributes:
    x: float32 inputs, shape ``(num_samples,) + input_shape``, in
      ``input_range``; for a model with several inputs a list of them, one
      per input in ``model.inputs`` order, each in its own range.
    y: int64 labels in ``0..num_classes-1`` (a single-unit sigmoid output is
      two classes: 0 and 1).
    confidences: float32 ``p(y_j | x_j)`` under the model, measured on ``x``.
    steps: int32 optimization steps each sample took (0 for noise).
    target_confidences: float32 ``tau_j`` per sample (labeled method), else
      None.
    reached: bool, whether the sample reached its target confidence (labeled
      method), else None.
    method: the generator's name.
    input_range: ``(low, high)`` the inputs were kept in (with several
      inputs, a tuple of one ``(low, high)`` per input).
    input_range_source: where the range came from, in words.
    assumed_range: True when the range was neither inferred from the model nor
      given, so [0, 1] was assumed.
    num_classes: number of classes of the model's output (of its class head
      when it has several outputs); 0 for a model with no class head, whose
      labels are all -1 and confidences NaN.
    output_kind: how the output was read: ``logits``, ``softmax``,
      ``sigmoid_logit`` or ``sigmoid``; ``none`` without a class head.
    seed: the seed used.
    seconds: wall time of the synthesis.
    info: settings and counters (batch size, steps, traces, ...), JSON-able.
    x_midway: the inputs halfway through the optimization (generators that
      optimize), else None; `keras_mpq.synthesis.realism` compares them with ``x``.
  """

  x: np.ndarray
  y: np.ndarray
  confidences: np.ndarray
  steps: np.ndarray
  target_confidences: Optional[np.ndarray]
  reached: Optional[np.ndarray]
  method: str
  input_range: Tuple[float, float]
  input_range_source: str
  assumed_range: bool
  num_classes: int
  output_kind: str
  seed: int
  seconds: float
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
  x_midway: Optional[np.ndarray] = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def num_samples(self) -> int:
    return int(len(self.y))

  def class_counts(self) -> np.ndarray:
    """How many samples carry each label, shape ``(num_classes,)`` (empty without classes)."""
    if self.num_classes == 0:
      return np.zeros(0, np.int64)
    return np.bincount(self.y, minlength=self.num_classes)

  def reached_share(self) -> Optional[float]:
    """Share of samples that reached their target confidence (labeled only)."""
    return None if self.reached is None else float(np.mean(self.reached))

  def summary(self) -> Dict[str, Any]:
    """JSON-able numbers describing the set (no arrays of samples)."""
    conf = self.confidences.astype(np.float64)
    return to_jsonable({
        "method": self.method, "num_samples": self.num_samples,
        "num_classes": self.num_classes, "output_kind": self.output_kind,
        "input_range": [list(r) if isinstance(r, (tuple, list)) else r
                        for r in self.input_range],
        "input_range_source": self.input_range_source,
        "assumed_range": self.assumed_range, "seed": self.seed,
        "seconds": round(self.seconds, 3),
        "class_counts": self.class_counts().tolist(),
        "confidence": None if self.num_classes == 0 else {
            "min": float(conf.min()), "median": float(np.median(conf)),
            "max": float(conf.max()), "mean": float(conf.mean())},
        "reached_share": self.reached_share(),
        "mean_steps": float(np.mean(self.steps)), "info": dict(self.info)})
