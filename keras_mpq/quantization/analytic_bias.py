"""Data-free bias correction from BatchNorm statistics (the analytic form of DFQ).

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction" (ICCV 2019, section 4.2): a BatchNorm's output channel ``c`` is
modelled as ``N(beta_c, gamma_c^2)``; after a ReLU (or ReLU6) its expected
value is the clipped normal's mean. A weight layer whose input is such a
channel gets the bias change ``E[x]^T (W - Wq)`` per output channel
(`keras_mpq.quantization.weights.bias_correction` with float inputs) without any data.

`keras_mpq.quantization.fold.fold_batchnorm` reads each BatchNorm's ``(beta, |gamma|)``
under the name of the layer whose output it describes once folded (the folded
producer, or the BatchNorm itself where it stays), and `remember` keeps them
with the folded model. `quantize_model` passes them on
(`carry`) to the quantized model as each weight layer's expected input
(`expected_inputs`: back through ReLU/ReLU6, dropout, zero padding, average
pooling and Flatten to such a layer). `column_means` turns one into the
per-column means that the bias correction takes, as
`keras_mpq.quantization.weights.layer_columns` sees a constant input (so a
convolution's zero padding is counted at the borders). Layers it cannot reach
(the model input, max pooling, Add, another activation) have none, and
`keras_mpq.quantization.optimize.optimize_weights` corrects those empirically.

Selected with ``bias_correction="analytic"`` (`keras_mpq.apply_plan`,
`keras_mpq.quantize`). The default stays the empirical correction on the
calibration data, which also removes the shift of the already-quantized layers
before each layer. Measured in LiteRT on five trained copies at uniform 4 and 3
bits (benchmarks/results/quantizer_dfq.md): on round to nearest the analytic
form gains 2.7 points on average with synthetic calibration images (separable
CNN at 3 bits: 67-74% -> 86-88%); after AdaRound it is +0.8 on average against
the empirical form (MobileNetV2 3-bit +6.8, the MNIST CNNs -0.6 to +0.8).

Example:

>>> import numpy as np
>>> round(float(relu_mean(np.array([0.0]), np.array([1.0]))[0]), 4)  # 1/sqrt(2 pi)
0.3989
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np
from scipy import stats as scipy_stats

from keras_mpq.base import model_data
from keras_mpq.base.compat import keras, tf
from keras_mpq.quantization import weights as weights_lib

Prior = Tuple[np.ndarray, np.ndarray]  # (beta, |gamma|) per channel: N(beta, gamma^2)
PRIORS = "batchnorm priors"
"""`keras_mpq.base.model_data` key: a folded model's {producer: (beta, |gamma|)}."""
EXPECTED = "expected inputs"
"""`keras_mpq.base.model_data` key: a quantized model's {layer: expected input per channel}."""

_SAME = (keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
         keras.layers.GaussianDropout, keras.layers.AlphaDropout, keras.layers.ZeroPadding1D,
         keras.layers.ZeroPadding2D)  # keep a channel's distribution (padding: away from borders)
_MEAN_KEEPING = (keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
                 keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D)


def relu_mean(mu: np.ndarray, sigma: np.ndarray, max_value: Optional[float] = None
              ) -> np.ndarray:
  """``E[min(max(z, 0), max_value)]`` for ``z ~ N(mu, sigma^2)``, per channel.

  >>> float(relu_mean(np.array([5.0]), np.array([1e-6]), 6.0)[0])
  5.0
  """
  mu = np.asarray(mu, np.float64)
  sigma = np.maximum(np.asarray(sigma, np.float64), 1e-12)

  def positive_part(m):  # E[max(z, 0)] for z ~ N(m, sigma^2)
    a = m / sigma
    return m * scipy_stats.norm.cdf(a) + sigma * scipy_stats.norm.pdf(a)

  out = positive_part(mu)
  if max_value is not None:
    out = out - positive_part(mu - float(max_value))
  return out


def remember(folded_model, priors: Mapping[str, Prior], source=None) -> None:
  """Keeps ``priors`` with ``folded_model`` (with those already kept for ``source``)."""
  merged = dict(model_data.get(source, PRIORS, {})) if source is not None else {}
  merged.update(priors)
  model_data.put(folded_model, PRIORS, merged)


def priors_of(model) -> Dict[str, Prior]:
  """The priors `remember` kept for ``model`` (empty when it was not folded here)."""
  return dict(model_data.get(model, PRIORS, {}))


def _inbound(model, layer):
  from keras_mpq.model import graph as graph_lib  # pylint: disable=g-import-not-at-top
  nodes = graph_lib.model_nodes(model, layer)
  if len(nodes) != 1:
    return None
  inbound = tf.nest.flatten(nodes[0].inbound_layers)
  return inbound[0] if len(inbound) == 1 else None


def _relu_cap(layer) -> Tuple[bool, Optional[float]]:
  """(is a ReLU or ReLU6, its cap) for activation layers and fused activations."""
  if isinstance(layer, keras.layers.ReLU):
    cfg = layer.get_config()
    if cfg.get("negative_slope", 0.0) or cfg.get("threshold", 0.0):
      return False, None
    cap = cfg.get("max_value")
    return True, None if cap is None else float(cap)
  activation = getattr(layer, "activation", None)
  if activation is None:
    return False, None
  name = keras.activations.serialize(activation)
  name = name.get("config", {}).get("name", name) if isinstance(name, dict) else name
  if name == "relu":
    return True, None
  if name == "relu6":
    return True, 6.0
  return False, None


def _is_linear(layer) -> bool:
  activation = getattr(layer, "activation", None)
  return activation is None or activation is keras.activations.linear


def _output_state(model, layer, priors, depth: int = 0):
  """``("normal", mu, sigma)``, ``("mean", m)`` or None for ``layer``'s output."""
  if depth > 64 or layer is None or isinstance(layer, keras.layers.InputLayer):
    return None
  if layer.name in priors:  # a folded producer (linear, `fold_batchnorm` checks) or a BN
    return ("normal",) + tuple(priors[layer.name])
  is_relu, cap = _relu_cap(layer)
  if (is_relu and (isinstance(layer, keras.layers.ReLU)
                   or isinstance(layer, keras.layers.Activation))):
    state = _output_state(model, _inbound(model, layer), priors, depth + 1)
    if state is None or state[0] != "normal":
      return None
    return ("mean", relu_mean(state[1], state[2], cap))
  if isinstance(layer, _SAME) or (isinstance(layer, keras.layers.Activation)
                                  and _is_linear(layer)):
    return _output_state(model, _inbound(model, layer), priors, depth + 1)
  if isinstance(layer, _MEAN_KEEPING):
    state = _output_state(model, _inbound(model, layer), priors, depth + 1)
    return None if state is None else ("mean", state[1])
  if isinstance(layer, keras.layers.Flatten):
    state = _output_state(model, _inbound(model, layer), priors, depth + 1)
    shape = tuple(layer.input_shape[1:])
    if state is None or None in shape:
      return None
    return ("mean", np.broadcast_to(state[1], shape).reshape(-1))
  return None


def expected_inputs(model, priors: Mapping[str, Prior]) -> Dict[str, np.ndarray]:
  """Each weight layer's expected input (one sample, the layer's input shape) where known."""
  from keras_mpq.base import layers as layers_lib  # pylint: disable=g-import-not-at-top
  out: Dict[str, np.ndarray] = {}
  if not priors:
    return out
  for layer in layers_lib.quantizable_layers(model):
    shape = tuple(getattr(layer, "input_shape", (None,))[1:])
    if not shape or None in shape or weights_lib.stats_kind(layer) is None:
      continue
    state = _output_state(model, _inbound(model, layer), priors)
    if state is None:
      continue
    try:  # state[1] is the mean of either state
      out[layer.name] = np.broadcast_to(np.asarray(state[1], np.float32), shape).copy()
    except ValueError:
      continue
  return out


def carry(folded_model, qmodel) -> None:
  """Records ``folded_model``'s expected inputs (from its kept priors) for ``qmodel``."""
  model_data.put(qmodel, EXPECTED, expected_inputs(folded_model, priors_of(folded_model)))


def column_means(qmodel, layer) -> Optional[np.ndarray]:
  """``(G, d)`` column means of ``layer``'s expected input in ``qmodel``, or None."""
  expected = model_data.get(qmodel, EXPECTED, {}).get(layer.name)
  if expected is None:
    return None
  return weights_lib.layer_columns(layer, expected[None]).mean(axis=0).astype(np.float64)
