"""Runs Sony MCT mixed-precision PTQ on one Keras model for a list of weight budgets.

This script runs INSIDE the isolated MCT venv (tensorflow 2.15.1,
model-compression-toolkit 2.6.1; see setup_env.sh), never in keras_mpq's venv:
MCT's Keras path refuses TensorFlow >= 2.16. `benchmarks/peer_mct.py` calls it
in a subprocess.

For each budget it runs ``mct.ptq.keras_post_training_quantization`` with a
``MixedPrecisionQuantizationConfig`` and a ``ResourceUtilization(weights_memory=
bytes)`` target on MCT's default TPC (IMX500 v1.0: per-channel symmetric kernels
with mixed-precision candidates {8, 4, 2} bits, biases float, 8-bit power-of-two
activations), then evaluates the returned fake-quant model on the test set.

MCT's weights memory counts only quantized kernels: sum(kernel elements * bits
/ 8). ``--avg-bits B`` therefore becomes ``weights_memory = n_kernel * B / 8``,
the same "parameter-weighted average kernel bits" keras_mpq's AVG_BITS budget
means.

Example (from the repo root, with the MCT venv built):

  .mct_venv/bin/python benchmarks/peer_mct/run_mct.py --model m.h5 \
      --data d.npz --avg-bits 4 3 --out results.json
"""

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

_KERNEL_LAYERS = ("Conv2D", "DepthwiseConv2D", "Dense", "Conv2DTranspose",
                  "Conv1D", "SeparableConv2D")


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="Keras 2 model saved as .h5")
  p.add_argument("--data", required=True, help=".npz with x_calib, x_test, y_test")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--weights-kb", type=float, nargs="+",
                     help="weight-memory budgets in kB (1 kB = 1000 bytes)")
  group.add_argument("--weights-bytes", type=float, nargs="+",
                     help="weight-memory budgets in bytes")
  group.add_argument("--avg-bits", type=float, nargs="+",
                     help="average kernel bit-width budgets")
  p.add_argument("--out", required=True, help="results JSON path")
  p.add_argument("--batch-size", type=int, default=32,
                 help="calibration batch size (default 32)")
  p.add_argument("--mp-images", type=int, default=32,
                 help="images MCT uses for its mixed-precision sensitivity "
                      "(MixedPrecisionQuantizationConfig.num_of_images; default 32)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--export-dir", default=None,
                 help="also write MCT's INT8 .tflite of each budget here")
  return p.parse_args(argv)


def _write_json_atomic(path, obj):
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


_UNKNOWN_KWARGS = re.compile(
    r"class '(?P<cls>[\w.]+)'.*Unrecognized keyword arguments: \[(?P<keys>[^\]]*)\]",
    re.S)


def load_keras2_h5(path):
  """Loads a tf_keras (2.16+) .h5 model into TF 2.15's Keras.

  Newer tf_keras writes config keys Keras 2.15 does not know (e.g.
  ``InputLayer(optional=...)``). On "Unrecognized keyword arguments" the
  offending keys are dropped from that layer class's configs and the model is
  rebuilt from the JSON config, then its weights are loaded from the same file.

  Returns:
    (model, {class name: [dropped keys]}).
  """
  try:
    return tf.keras.models.load_model(path, compile=False), {}
  except TypeError as e:
    first_error = e
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(path, "r") as f:
    config = json.loads(f.attrs["model_config"])
  dropped = {}
  error = first_error
  for _ in range(50):
    match = _UNKNOWN_KWARGS.search(str(error))
    if not match:
      raise error
    cls = match.group("cls").split(".")[-1]
    keys = [k.strip().strip("'\"") for k in match.group("keys").split(",") if k.strip()]
    if set(keys) <= set(dropped.get(cls, [])):
      raise error  # no progress
    dropped.setdefault(cls, []).extend(k for k in keys if k not in dropped.get(cls, []))
    _drop_keys(config, cls, keys)
    try:
      model = tf.keras.models.model_from_json(json.dumps(config))
      break
    except TypeError as e:
      error = e
  else:
    raise error
  model.load_weights(path)
  return model, dropped


def _drop_keys(node, cls, keys):
  """Removes ``keys`` from every ``{"class_name": cls, "config": {...}}`` in ``node``."""
  if isinstance(node, dict):
    if node.get("class_name") == cls and isinstance(node.get("config"), dict):
      for k in keys:
        node["config"].pop(k, None)
    for v in node.values():
      _drop_keys(v, cls, keys)
  elif isinstance(node, list):
    for v in node:
      _drop_keys(v, cls, keys)


def kernel_params(model):
  """Kernel elements of each quantizable layer (what MCT's weights memory counts)."""
  counts = {}
  for layer in model.layers:
    kind = type(layer).__name__
    if kind not in _KERNEL_LAYERS:
      continue
    n = 0
    for attr in ("kernel", "depthwise_kernel", "pointwise_kernel"):
      w = getattr(layer, attr, None)
      if w is not None:
        n += int(np.prod(w.shape))
    counts[layer.name] = n
  return counts


def accuracy(model, x, y, batch_size=256):
  logits = model.predict(x, batch_size=batch_size, verbose=0)
  return float(np.mean(np.argmax(logits, axis=-1) == y))


def chosen_bits(quantized_model, original_names=()):
  """{layer name: kernel bits} read off the MCT fake-quant model's wrappers.

  MCT renames a convolution it folded a BatchNormalization into to
  ``<conv>_bn``; such names are mapped back to ``original_names``.
  """
  from mct_quantizers import KerasQuantizationWrapper  # pylint: disable=g-import-not-at-top
  bits = {}
  for layer in quantized_model.layers:
    if isinstance(layer, KerasQuantizationWrapper):
      for attr, quantizer in layer.weights_quantizers.items():
        name = layer.layer.name
        if name not in original_names and name.endswith("_bn") and name[:-3] in original_names:
          name = name[:-3]
        key = name if attr in ("kernel", "depthwise_kernel") else f"{name}:{attr}"
        bits[key] = int(quantizer.num_bits)
  return bits


def activation_bits(quantized_model):
  """Sorted distinct bit-widths of MCT's activation quantizers."""
  from mct_quantizers import KerasActivationQuantizationHolder  # pylint: disable=g-import-not-at-top
  return sorted({int(layer.activation_holder_quantizer.num_bits)
                 for layer in quantized_model.layers
                 if isinstance(layer, KerasActivationQuantizationHolder)})


def run_budget(mct, model, x_calib, x_test, y_test, weights_bytes, args, names=()):
  """One MCT mixed-precision PTQ run; returns its result record."""
  batches = [x_calib[i:i + args.batch_size]
             for i in range(0, len(x_calib), args.batch_size)]

  def representative_data_gen():
    for b in batches:
      yield [b]

  tf.random.set_seed(args.seed)
  np.random.seed(args.seed)
  mp_config = mct.core.MixedPrecisionQuantizationConfig(
      num_of_images=min(args.mp_images, len(x_calib)))
  core_config = mct.core.CoreConfig(mixed_precision_config=mp_config)
  target = mct.core.ResourceUtilization(weights_memory=float(weights_bytes))
  tpc = mct.get_target_platform_capabilities()  # IMX500 v1.0: kernels {8,4,2}, act 8
  start = time.perf_counter()
  q_model, info = mct.ptq.keras_post_training_quantization(
      model, representative_data_gen, target_resource_utilization=target,
      core_config=core_config, target_platform_capabilities=tpc)
  seconds = time.perf_counter() - start
  final_ru = getattr(info, "final_resource_utilization", None)
  achieved = None if final_ru is None else float(final_ru.weights_memory)
  tflite = {}
  if args.export_dir:
    # MCT's own integer file (its INT8 TFLite exporter), for the caller to run in LiteRT.
    path = os.path.join(args.export_dir, f"mct_{weights_bytes:.0f}B.tflite")
    try:
      mct.exporter.keras_export_model(
          model=q_model, save_model_path=path,
          serialization_format=mct.exporter.KerasExportSerializationFormat.TFLITE,
          quantization_format=mct.exporter.QuantizationFormat.INT8)
      tflite = {"tflite_path": path, "tflite_bytes": os.path.getsize(path)}
    except Exception as e:  # pylint: disable=broad-except  # reported, the run goes on
      tflite = {"tflite_error": f"{type(e).__name__}: {str(e)[:300]}"}
  return {
      **tflite,
      "target_weights_bytes": float(weights_bytes),
      "achieved_weights_bytes": achieved,
      "accuracy": accuracy(q_model, x_test, y_test),
      "bits": chosen_bits(q_model, names),
      "activation_bits": activation_bits(q_model),
      "mct_mixed_precision_cfg": [int(v) for v in (info.mixed_precision_cfg or [])],
      "seconds": seconds,
  }


def main(argv=None):
  args = _parse_args(argv)
  import model_compression_toolkit as mct  # pylint: disable=g-import-not-at-top
  from model_compression_toolkit.verify_packages import FOUND_TF  # pylint: disable=g-import-not-at-top
  if not FOUND_TF:
    sys.exit(f"run_mct.py: Expected TensorFlow < 2.16 for MCT's Keras API. "
             f"Received: tensorflow {tf.__version__}. Run setup_env.sh.")

  model, dropped_config_keys = load_keras2_h5(args.model)
  data = np.load(args.data)
  x_calib = data["x_calib"].astype(np.float32)
  x_test = data["x_test"].astype(np.float32)
  y_test = data["y_test"].astype(np.int64).reshape(-1)

  params = kernel_params(model)
  n_kernel = sum(params.values())
  if args.avg_bits:
    budgets = [("avg_bits", b, n_kernel * b / 8.0) for b in args.avg_bits]
  elif args.weights_kb:
    budgets = [("weights_kb", b, b * 1000.0) for b in args.weights_kb]
  else:
    budgets = [("weights_bytes", b, b) for b in args.weights_bytes]

  results = {
      "tool": "model-compression-toolkit",
      "mct_version": mct.__version__,
      "tensorflow_version": tf.__version__,
      "tpc": "imx500 v1.0 (default): kernel bits {8,4,2}, activations 8",
      "dropped_config_keys": dropped_config_keys,
      "n_calib": int(len(x_calib)),
      "n_test": int(len(x_test)),
      "kernel_params": params,
      "n_kernel_params": n_kernel,
      "float_accuracy": accuracy(model, x_test, y_test),
      "runs": [],
  }
  for kind, value, weights_bytes in budgets:
    record = {"budget_kind": kind, "budget_value": value}
    try:
      record.update(run_budget(mct, model, x_calib, x_test, y_test, weights_bytes, args,
                               names=tuple(params)))
      bits = record["bits"]
      if n_kernel and all(k in params for k in bits):
        record["avg_bits"] = sum(params[k] * b for k, b in bits.items()) / n_kernel
      record["error"] = None
    except Exception as e:  # pylint: disable=broad-except
      # One infeasible budget must not lose the other runs: record the error.
      record.update({"target_weights_bytes": weights_bytes, "error":
                     f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc(limit=5)})
    results["runs"].append(record)
    print(json.dumps({k: record.get(k) for k in
                      ("budget_kind", "budget_value", "accuracy", "avg_bits",
                       "achieved_weights_bytes", "seconds", "error")}), flush=True)
  _write_json_atomic(args.out, results)


if __name__ == "__main__":
  main()
