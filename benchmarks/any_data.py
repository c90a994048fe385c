"""Non-classifier Keras models and real inputs for them (issue 31: any Keras model, not only classifiers).

Five small models are trained here on real data (seeded: two seeds give two
independently initialized and shuffled copies trained on the same data) and
cached under ``KERAS_MPQ_ANY_CACHE`` (default ``/tmp/keras_mpq_any``), never
in the repository. Three pretrained non-classifiers from ``../shared/models``
are used as a user would bring them. Each entry point returns a `Task`, a
5-tuple ``(model, x_pool, x_test, y_test, metric_fn)``:

* ``model``: the float tf_keras model (``compile=False`` on reload);
* ``x_pool``: real inputs to calibrate with (training split or held apart):
  an array, or for a model with several inputs a dict by input name;
* ``x_test``, ``y_test``: held-out real inputs and what the metric compares
  with (labels, masks, targets; for the pretrained files: the float model's
  own outputs on ``x_test``);
* ``metric_fn(pred, idx=None)``: the task metric of predictions ``pred`` on
  ``x_test`` (an array; for a multi-output model a dict keyed by output name,
  or a list in ``model.output_names`` order); with ``idx``, ``pred`` are the
  predictions on ``x_test[idx]`` and the metric is on that subset. Returns a
  dict; its first key is the headline metric (`HEADLINE`).

MNIST (``../shared/data/mnist``: the 10,000-image test set only, see its
README) is split as everywhere in this project: the first 8,000 images train
and calibrate, the last 2,000 test.

Trained here
------------
1. `conv_autoencoder` (``conv_autoencoder``): Conv2D/MaxPool encoder, a
   16-unit Dense bottleneck, Conv2DTranspose decoder, sigmoid output, 28x28x1
   pixels in [0, 1]; trained (binary cross-entropy, 20 epochs) on the training
   split's digits 0-4 only (4,103 images). Without the Dense bottleneck the
   autoencoder reconstructed every digit about as well (AUC 0.63-0.67). Anomaly score = per-image
   reconstruction MSE; metric = ROC AUC of the score on the 2,000 test images
   with digits 5-9 anomalous (``sklearn.metrics.roc_auc_score``).
2. `mask_net` (``mask_net``): a small U-Net (Conv2D, one stride-2 Conv2D
   down, Conv2D, UpSampling2D up, Concatenate skip, 1x1 sigmoid): input = an
   MNIST image in [0, 1] with Gaussian noise (std `MASK_NOISE_STD`) and one
   random rectangle (6..12 px a side) filled with a random gray level, clipped
   to [0, 1]; target = pixel > 0.5 of the *clean* image (so the occluded
   strokes must be guessed). Metric = mean over test images of the IoU of
   (pred > 0.5) with the target (an image with an empty union counts 1). The
   noise and occlusions are fixed (data seeds 1000 train / 2000 test), the
   same for every model seed.
3. `regression_mlp` (``regression_mlp``): scikit-learn's bundled diabetes
   table (``load_diabetes(scaled=False)``: 442 patients, 10 raw features, no
   download; ``fetch_california_housing`` needs a download, not available
   offline). Fixed split (permutation seed 0): 342 train, 100 test. Inputs
   are standardized with the training split's mean and std *outside* the
   model (the model takes standardized inputs, about -2.5..+4); target = the
   raw disease-progression score (25..346), linear output (Dense(1), bias
   initialized to the training mean); 150 epochs, Adam 1e-3 (longer training
   overfits: 500 epochs gave train R^2 0.86, test 0.03-0.08). Metric = R^2 on
   the test split; ordinary least squares reaches 0.353 on this split.
4. `two_head` (``two_head``): a functional CNN with two outputs, ``class``
   (softmax over 10) and ``box`` (4 sigmoid numbers: the digit's bounding box
   [ymin, xmin, ymax, xmax] / 28 from pixels > 0.3, max edges exclusive). So
   the box is not constant, every digit is shifted by a random (dy, dx) in
   [-4, 4] (zero fill; fixed data seeds). Metrics: class accuracy, mean
   absolute box error (in units of the image side), mean box IoU.
5. `two_input` (``two_input``): a classifier with two inputs, ``image`` (the
   28x28x1 MNIST digit in [0, 1]: Conv2D/MaxPool twice) and ``table`` (56
   numbers derived from the same image: its 28 row and 28 column ink sums,
   0..28, read through a ``Rescaling(1/28)`` layer, then a Dense layer); the
   two branches are concatenated, then Dense(64) and a 10-way softmax; 6
   epochs. Its inputs ``x`` are a dict by input name (`take` and
   `num_samples` slice and count them). Metric: accuracy on the 2,000 test
   images.

Pretrained (``../shared/models``, not trained here)
----------------------------------------------------
6. ``anomaly_detection`` (MLPerf-Tiny AD autoencoder, 5x128x1 log-mel frames
   of ToyADMOS toy cars, as MLTK trained it). No machine sounds here; the real
   source is speech: sentences spoken by espeak-ng (several voices, speeds,
   pitches), resampled to 16 kHz, peak-normalized to full scale plus Gaussian
   background noise (std `AD_NOISE_STD` of full scale), then the MLPerf-Tiny
   front end in numpy (librosa defaults re-implemented: 1024-sample = 64 ms
   Hann window, 512-sample = 32 ms hop, centered with reflect padding, power
   spectrum, 128 Slaney mel bands 0..8 kHz with Slaney norm, 10*log10(mel +
   eps)), 5 consecutive frames per input (frames x mels). MLTK trained this
   file on a preprocessed set of spectrogram *images*, whose pixel mapping is
   not published; the model's scale was found by trying affine maps ``a * dB +
   c`` (and TensorFlow's audio microfrontend, 64 ms/32 ms, 128 channels, PCAN
   on/off, raw uint16 with several affine maps) and comparing (i) the median
   relative reconstruction error MSE / var(x) and (ii) the first Dense
   layer's output statistics with the first BatchNorm's moving mean/variance (``dmean2`` = mean over units of
   (mean - moving_mean)^2 / moving_variance, ``logvar`` = mean of
   log(var / moving_variance); 0 is a perfect match). Speech is not a toy
   car, so no map reconstructs well and the error surface is flat.
   `ad_scale_table` on the pool windows (``python benchmarks/any_data.py
   --ad-scales``):

   ==============  ===============  ===============  =======  =======
   a, c            x range          median rel. err  dmean2   logvar
   ==============  ===============  ===============  =======  =======
   1, 0 (raw dB)   -70 .. 29        18.1             229      -0.34
   1.5, 220        115 .. 263       1.83             5.1      +0.47
   2, 220          80 .. 277        1.09             3.8      +1.04
   3, 200          -11 .. 286       0.74             15.6     +1.85
   **3, 220**      9 .. 306         **0.75**         7.1      +1.85
   3, 240          29 .. 326        0.77             3.3      +1.85
   3.1875, 255     31 .. 346        0.82             3.0      +1.98
   4, 230          -51 .. 344       0.67             12.8     +2.43
   5, 260          -91 .. 403       0.66             10.5     +2.88
   ==============  ===============  ===============  =======  =======

   Chosen: **x = 3 * dB + 220** (peak-normalized speech, noise 1e-3): among
   the lowest reconstruction errors with a slope no steeper than the common
   image mapping of an 80 dB range onto 0..255 (3.1875 per dB: the MLTK file
   was trained on spectrogram images); steeper maps lower the error a little
   more (0.66 at a = 5) but put the first layer's variance 11-18x above the
   BatchNorm's, shallower ones match the BatchNorm better but reconstruct
   worse than the mean (relative error > 1). TensorFlow's audio microfrontend
   (64 ms / 32 ms, 128 channels, PCAN on or off, noise reduction on or off,
   raw uint16 times 1/8..1 plus -100..100) did no better in a scratch search
   (relative error >= 0.80 with dmean2 >= 12, or dmean2 >= 5.7 with relative
   error >= 1.1). Calibration pool (8 sentences x 3 voices) and test inputs
   (8 other sentences x 3 voices) come from different sentences, 400 windows
   each (5 frames, hop 2 frames). Metrics compare with the float
   model: Pearson correlation of the per-input anomaly score (reconstruction
   MSE) with float's, Spearman rank correlation, the score ratio mean(score) /
   mean(float score) and the output error ratio rms(out - float out) /
   rms(float out - x) (quantization error relative to float's own
   reconstruction error).
7. ``autoencoder_example`` (MLTK's example: a Dense autoencoder over 140-sample
   ECG-like beats, sigmoid output, nested Sequential encoder/decoder). **No
   real source here**: inputs are synthetic heartbeats (P, Q, R, S, T waves as
   Gaussians with random timing, width and height, a random baseline wander
   and noise), min-max scaled to [0, 1] per beat, the scale of the ECG5000
   autoencoder tutorial this example follows (sigmoid output). The file is
   barely trained: on these beats (and on uniform noise, x5 or standardized
   beats) one of its 8 code units is active and its reconstruction hardly
   varies (std over inputs 0.008), so its relative reconstruction error is
   2.3 and its anomaly score follows the input alone. Metrics as for 5 (the
   error ratio is the informative one here).
8. ``fingerprint_signature_generator`` (180x180x1 -> 16). **No real source
   here**: inputs are synthetic fingerprints: dark ridges (period 8..11 px,
   the ridge spacing of a 500 dpi scan) on a white background, concentric
   loops around a random core warped by a smooth random field, inside an
   elliptical finger outline, plus noise; drawn at 192x192 uint8 and cropped
   to 180x180 and shifted to int8 (``pixel - 128``, in [-128, 127]), the
   preprocessing MLTK's model specification documents
   (``crop_and_convert_from_uint8_to_int8``: white background = 127). The first
   two BatchNorms agree (40 images): int8 dmean2 0.66 / 0.90, logvar -0.08 /
   +0.27; uint8 0..255: dmean2 5.8 / 13.0; [0, 1] or [-1, 1]: logvar -11 / -10
   (variance 10^4 too small). Metrics:
   Pearson correlation of all 16 outputs with float's, relative error
   ||out - float|| / ||float||, correlation of pairwise signature distances
   with float's (the model is used through distances).

    import any_data                                  # benchmarks/ on sys.path
    model, x_pool, x_test, y_test, metric = any_data.task("mask_net", seed=0)
    print(metric(model.predict(x_test)))           # {'IoU': 0.86, ...}

``python benchmarks/any_data.py [names] [--seeds 0,1]`` trains (or loads) and
prints each float model's metrics.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import time
import zlib
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
# Bump when data, architectures or training change (retrains, re-makes inputs).
VERSION = 1
TRAIN_SPLIT = 8000
SAMPLE_RATE = 16000

TRAINED = ("conv_autoencoder", "mask_net", "regression_mlp", "two_head", "two_input")
SHARED = ("anomaly_detection", "autoencoder_example", "fingerprint_signature_generator")
ALL = TRAINED + SHARED
HEADLINE = {"conv_autoencoder": "ROC AUC", "mask_net": "IoU", "regression_mlp": "R2",
            "two_head": "accuracy", "two_input": "accuracy", "anomaly_detection": "score corr",
            "autoencoder_example": "score corr", "fingerprint_signature_generator": "output corr"}
# Whether a higher headline is better (all are).
HIGHER_IS_BETTER = {name: True for name in ALL}

MASK_NOISE_STD = 0.35
AD_NOISE_STD = 1e-3
AD_SCALE = (3.0, 220.0)  # x = a * dB + c (see the module docstring)
BOX_SHIFT = 4
BOX_THRESHOLD = 0.3


class Task(NamedTuple):
  model: object
  x_pool: object  # an array, or for a model with several inputs a dict by input name
  x_test: object
  y_test: object
  metric_fn: Callable


# --------------------------------------------------------------------------- paths, MNIST


def cache_dir() -> pathlib.Path:
  """Where trained models and made inputs go: ``KERAS_MPQ_ANY_CACHE``, else /tmp/keras_mpq_any."""
  return pathlib.Path(os.environ.get("KERAS_MPQ_ANY_CACHE", "/tmp/keras_mpq_any"))


def models_dir() -> pathlib.Path:
  env = os.environ.get("KERAS_MPQ_ZOO_MODELS")
  return pathlib.Path(env) if env else REPO.parent / "shared" / "models"


def mnist_dir() -> pathlib.Path:
  env = os.environ.get("KERAS_MPQ_MNIST_DIR")
  return pathlib.Path(env) if env else REPO.parent / "shared" / "data" / "mnist"


_MNIST = {}


def load_mnist() -> Tuple[np.ndarray, np.ndarray]:
  """All 10,000 MNIST test-set images as float32 (n, 28, 28, 1) in [0, 1], and labels."""
  if not _MNIST:
    d = mnist_dir()
    images = d / "t10k-images-idx3-ubyte.gz"
    labels = d / "t10k-labels-idx1-ubyte.gz"
    if not images.exists():
      raise FileNotFoundError(f"MNIST not found: expected {images} (../shared/data/mnist)")
    with gzip.open(images) as f:
      x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(labels) as f:
      y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    _MNIST["x"], _MNIST["y"] = (x.astype(np.float32) / 255.0), y
  return _MNIST["x"], _MNIST["y"]


def _split():
  x, y = load_mnist()
  return x[:TRAIN_SPLIT], y[:TRAIN_SPLIT], x[TRAIN_SPLIT:], y[TRAIN_SPLIT:]


def _rng(name: str, seed: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


# --------------------------------------------------------------------------- training cache


def model_path(name: str, seed: int) -> pathlib.Path:
  return cache_dir() / "models" / f"{name}_s{seed}_v{VERSION}.h5"


def info(name: str, seed: int = 0) -> Dict:
  """What training recorded for a model trained here (time, float metrics), or {}."""
  path = model_path(name, seed).with_suffix(".json")
  return json.loads(path.read_text()) if path.exists() else {}


def _trained(name: str, seed: int, build: Callable, fit: Callable, evaluate: Callable):
  """The cached model, trained first when missing (tf_keras, compile=False)."""
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  path = model_path(name, seed)
  if not path.exists():
    start = time.perf_counter()
    keras.utils.set_random_seed(int(seed))
    model = build(seed)
    fit(model, seed)
    seconds = time.perf_counter() - start
    record = {"name": name, "seed": seed, "version": VERSION,
              "train_seconds": round(seconds, 1), "params": int(model.count_params()),
              "float_metrics": evaluate(model)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.h5")
    model.save(str(tmp), include_optimizer=False)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1))
  return keras.models.load_model(str(path), compile=False)


def predict(model, x, batch_size: int = 256, names=None):
  """``model.predict``: an array, or a dict keyed by output name for a multi-output model.

  ``names``: the output names to key by, in the model's output order (default
  ``model.output_names``; give the float model's for a quantized copy, whose
  layers may be renamed).
  """
  out = model.predict(x, verbose=0, batch_size=batch_size)
  if isinstance(out, (list, tuple)):
    return {n: np.asarray(o) for n, o in zip(names or model.output_names, out)}
  return np.asarray(out)


def _take(a, idx):
  return a if idx is None else np.asarray(a)[idx]


def take(x, idx):
  """``x[idx]`` of inputs ``x``: one array, or a dict by input name (a dict back)."""
  if isinstance(x, dict):
    return {k: np.asarray(v)[idx] for k, v in x.items()}
  return np.asarray(x)[idx]


def num_samples(x) -> int:
  """How many samples inputs ``x`` (one array, or a dict by input name) hold."""
  return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def value_range(x) -> Tuple[float, float]:
  """(min, max) over inputs ``x``: one array, or every array of a dict by input name."""
  arrays = list(x.values()) if isinstance(x, dict) else [x]
  return (float(min(np.min(a) for a in arrays)), float(max(np.max(a) for a in arrays)))


def _as_dict(pred, names) -> Dict[str, np.ndarray]:
  if isinstance(pred, dict):
    return {k: np.asarray(v) for k, v in pred.items()}
  if isinstance(pred, (list, tuple)):
    return {n: np.asarray(p) for n, p in zip(names, pred)}
  raise ValueError(f"Expected a dict or list of outputs {names}. Received: {type(pred)}")


# --------------------------------------------------------------------------- 1. conv autoencoder


def _ae_metric(x_test, anomalous):
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top

  def metric(pred, idx=None):
    x, bad = _take(x_test, idx), _take(anomalous, idx)
    pred = np.asarray(pred, np.float32).reshape(x.shape)
    score = np.mean((pred - x) ** 2, axis=(1, 2, 3))
    return {"ROC AUC": float(roc_auc_score(bad, score)),
            "MSE normal": float(score[bad == 0].mean()),
            "MSE anomalous": float(score[bad == 1].mean())}
  return metric


def conv_autoencoder(seed: int = 0) -> Task:
  """A convolutional autoencoder on MNIST digits 0-4; anomaly = digits 5-9 (ROC AUC)."""
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  layers = keras.layers
  x_tr, y_tr, x_te, y_te = _split()
  x_normal = x_tr[y_tr < 5]
  anomalous = (y_te >= 5).astype(np.int64)
  metric = _ae_metric(x_te, anomalous)

  def build(seed):
    inp = keras.Input((28, 28, 1))
    h = layers.Conv2D(16, 3, padding="same", activation="relu", name="enc1")(inp)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Conv2D(8, 3, padding="same", activation="relu", name="enc2")(h)
    h = layers.MaxPooling2D(2)(h)  # 7x7x8
    h = layers.Flatten()(h)
    h = layers.Dense(16, activation="relu", name="code")(h)
    h = layers.Dense(7 * 7 * 8, activation="relu", name="expand")(h)
    h = layers.Reshape((7, 7, 8))(h)
    h = layers.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu",
                               name="dec1")(h)
    h = layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu",
                               name="dec2")(h)
    out = layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="recon")(h)
    return keras.Model(inp, out, name=f"conv_autoencoder_s{seed}")

  def fit(model, seed):
    model.compile(keras.optimizers.Adam(2e-3), "binary_crossentropy")
    model.fit(x_normal, x_normal, batch_size=128, epochs=20, shuffle=True, verbose=0)

  model = _trained("conv_autoencoder", seed, build, fit,
                   lambda m: metric(predict(m, x_te)))
  return Task(model, x_normal, x_te, anomalous, metric)


# --------------------------------------------------------------------------- 2. mask net


def _corrupt(x: np.ndarray, seed: int) -> np.ndarray:
  """``x`` plus Gaussian noise and one random gray rectangle per image, clipped to [0, 1]."""
  rng = np.random.default_rng(seed)
  n = len(x)
  out = x + rng.normal(0.0, MASK_NOISE_STD, x.shape).astype(np.float32)
  hs, ws = rng.integers(6, 13, n), rng.integers(6, 13, n)
  tops, lefts = rng.integers(0, 28 - hs + 1), rng.integers(0, 28 - ws + 1)
  gray = rng.uniform(0.0, 1.0, n).astype(np.float32)
  for i in range(n):
    out[i, tops[i]:tops[i] + hs[i], lefts[i]:lefts[i] + ws[i]] = gray[i]
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def _iou_metric(target):
  def metric(pred, idx=None):
    t = _take(target, idx)
    p = np.asarray(pred).reshape(t.shape) > 0.5
    inter = np.sum(p & t, axis=(1, 2, 3))
    union = np.sum(p | t, axis=(1, 2, 3))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"IoU": float(iou.mean()),
            "pixel accuracy": float(np.mean(p == t))}
  return metric


def mask_net(seed: int = 0) -> Task:
  """A small U-Net: per-pixel stroke mask of a noisy, occluded MNIST digit (mean IoU)."""
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  layers = keras.layers
  x_tr, _, x_te, _ = _split()
  xin_tr, xin_te = _corrupt(x_tr, 1000), _corrupt(x_te, 2000)
  t_tr, t_te = x_tr > 0.5, x_te > 0.5
  metric = _iou_metric(t_te)

  def build(seed):
    inp = keras.Input((28, 28, 1))
    c1 = layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inp)
    d = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="down")(c1)
    d = layers.Conv2D(32, 3, padding="same", activation="relu", name="mid")(d)
    u = layers.UpSampling2D(2, name="up")(d)
    u = layers.Conv2D(16, 3, padding="same", activation="relu", name="up_conv")(u)
    h = layers.Concatenate(name="skip")([u, c1])
    h = layers.Conv2D(16, 3, padding="same", activation="relu", name="fuse")(h)
    out = layers.Conv2D(1, 1, activation="sigmoid", name="mask")(h)
    return keras.Model(inp, out, name=f"mask_net_s{seed}")

  def fit(model, seed):
    model.compile(keras.optimizers.Adam(2e-3), "binary_crossentropy")
    model.fit(xin_tr, t_tr.astype(np.float32), batch_size=128, epochs=4, shuffle=True,
              verbose=0)

  model = _trained("mask_net", seed, build, fit, lambda m: metric(predict(m, xin_te)))
  return Task(model, xin_tr, xin_te, t_te, metric)


# --------------------------------------------------------------------------- 3. regression MLP


def diabetes_split():
  """(x_train, y_train, x_test, y_test, mean, std): inputs standardized with the train split's."""
  from sklearn.datasets import load_diabetes  # pylint: disable=g-import-not-at-top
  x, y = load_diabetes(return_X_y=True, scaled=False)
  perm = np.random.default_rng(0).permutation(len(x))
  tr, te = perm[:342], perm[342:]
  mean, std = x[tr].mean(0), x[tr].std(0)
  z = ((x - mean) / std).astype(np.float32)
  return z[tr], y[tr].astype(np.float32), z[te], y[te].astype(np.float32), mean, std


def _r2_metric(y_test):
  def metric(pred, idx=None):
    y = _take(y_test, idx).astype(np.float64)
    p = np.asarray(pred, np.float64).reshape(-1)
    ss_res = float(np.sum((y - p) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {"R2": 1.0 - ss_res / ss_tot, "MAE": float(np.mean(np.abs(y - p)))}
  return metric


def regression_mlp(seed: int = 0) -> Task:
  """An MLP regressor on scikit-learn's diabetes table (R^2 on 100 held-out patients)."""
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  layers = keras.layers
  x_tr, y_tr, x_te, y_te, _, _ = diabetes_split()
  metric = _r2_metric(y_te)

  def build(seed):
    inp = keras.Input((10,))
    h = layers.Dense(32, activation="relu", name="fc1")(inp)
    h = layers.Dense(16, activation="relu", name="fc2")(h)
    out = layers.Dense(1, name="progression",
                       bias_initializer=keras.initializers.Constant(float(y_tr.mean())))(h)
    return keras.Model(inp, out, name=f"regression_mlp_s{seed}")

  def fit(model, seed):
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.fit(x_tr, y_tr, batch_size=32, epochs=150, shuffle=True, verbose=0)

  model = _trained("regression_mlp", seed, build, fit, lambda m: metric(predict(m, x_te)))
  return Task(model, x_tr, x_te, y_te, metric)


# --------------------------------------------------------------------------- 4. two heads


def boxes(x: np.ndarray, threshold: float = BOX_THRESHOLD) -> np.ndarray:
  """[ymin, xmin, ymax, xmax] / 28 of pixels > threshold (max edges exclusive), float32 (n, 4)."""
  on = x[..., 0] > threshold
  rows, cols = on.any(axis=2), on.any(axis=1)
  side = x.shape[1]
  out = np.zeros((len(x), 4), np.float32)
  for i in range(len(x)):
    r, c = np.nonzero(rows[i])[0], np.nonzero(cols[i])[0]
    if len(r):
      out[i] = (r[0], c[0], r[-1] + 1, c[-1] + 1)
  return out / side


def _shifted(x: np.ndarray, seed: int) -> np.ndarray:
  """Each image shifted by a random (dy, dx) in [-BOX_SHIFT, BOX_SHIFT], zero fill."""
  rng = np.random.default_rng(seed)
  s = BOX_SHIFT
  padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))
  d = rng.integers(-s, s + 1, size=(len(x), 2))
  out = np.empty_like(x)
  for i, (dy, dx) in enumerate(d):
    out[i] = padded[i, s - dy:s - dy + 28, s - dx:s - dx + 28]
  return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  ih = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
  iw = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
  inter = ih * iw
  area = lambda z: np.clip(z[:, 2] - z[:, 0], 0, None) * np.clip(z[:, 3] - z[:, 1], 0, None)
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _two_head_metric(y_test):
  def metric(pred, idx=None):
    labels, truth = _take(y_test["class"], idx), _take(y_test["box"], idx)
    p = _as_dict(pred, ("class", "box"))
    cls, box = p["class"].reshape(len(labels), -1), p["box"].reshape(-1, 4)
    return {"accuracy": float(np.mean(cls.argmax(1) == labels)),
            "box MAE": float(np.mean(np.abs(box - truth))),
            "box IoU": float(box_iou(box, truth).mean())}
  return metric


def two_head(seed: int = 0) -> Task:
  """A two-output CNN on shifted MNIST digits: ``class`` (softmax) and ``box`` (4 sigmoid)."""
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  layers = keras.layers
  x_tr, y_tr, x_te, y_te = _split()
  xs_tr, xs_te = _shifted(x_tr, 3000), _shifted(x_te, 4000)
  y_train = {"class": y_tr, "box": boxes(xs_tr)}
  y_test = {"class": y_te, "box": boxes(xs_te)}
  metric = _two_head_metric(y_test)

  def build(seed):
    inp = keras.Input((28, 28, 1))
    h = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(h)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv3")(h)
    h = layers.Flatten()(h)
    h = layers.Dense(64, activation="relu", name="fc")(h)
    cls = layers.Dense(10, activation="softmax", name="class")(h)
    box = layers.Dense(4, activation="sigmoid", name="box")(h)
    return keras.Model(inp, [cls, box], name=f"two_head_s{seed}")

  def fit(model, seed):
    model.compile(keras.optimizers.Adam(2e-3),
                  {"class": "sparse_categorical_crossentropy", "box": "mae"},
                  loss_weights={"class": 1.0, "box": 10.0})
    model.fit(xs_tr, y_train, batch_size=128, epochs=10, shuffle=True, verbose=0)

  model = _trained("two_head", seed, build, fit, lambda m: metric(predict(m, xs_te)))
  return Task(model, xs_tr, xs_te, y_test, metric)


# --------------------------------------------------------------------------- 5. two inputs


def ink_table(x: np.ndarray) -> np.ndarray:
  """Each image's 28 row and 28 column ink sums (0..28), float32 (n, 56)."""
  return np.concatenate([x[..., 0].sum(axis=2), x[..., 0].sum(axis=1)], axis=1).astype(
      np.float32)


def _accuracy_metric(labels):
  def metric(pred, idx=None):
    y = _take(labels, idx)
    return {"accuracy": float(np.mean(np.asarray(pred).reshape(len(y), -1).argmax(1) == y))}
  return metric


def two_input(seed: int = 0) -> Task:
  """A two-input MNIST classifier: ``image`` (28x28x1) and ``table`` (its 56 ink sums)."""
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  layers = keras.layers
  x_tr, y_tr, x_te, y_te = _split()
  train = {"image": x_tr, "table": ink_table(x_tr)}
  test = {"image": x_te, "table": ink_table(x_te)}
  metric = _accuracy_metric(y_te)

  def build(seed):
    image = keras.Input((28, 28, 1), name="image")
    table = keras.Input((56,), name="table")
    h = layers.Conv2D(8, 3, activation="relu", name="conv1")(image)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Conv2D(16, 3, activation="relu", name="conv2")(h)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Flatten()(h)
    g = layers.Rescaling(1 / 28, name="table_scale")(table)
    g = layers.Dense(32, activation="relu", name="table_fc")(g)
    h = layers.Concatenate()([h, g])
    h = layers.Dense(64, activation="relu", name="fc")(h)
    out = layers.Dense(10, activation="softmax", name="class")(h)
    return keras.Model([image, table], out, name=f"two_input_s{seed}")

  def fit(model, seed):
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    model.fit(train, y_tr, batch_size=128, epochs=6, shuffle=True, verbose=0)

  model = _trained("two_input", seed, build, fit, lambda m: metric(predict(m, test)))
  return Task(model, train, test, y_te, metric)


# --------------------------------------------------------------------------- pretrained: metrics vs float


def _pearson(a, b) -> float:
  a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
  if a.std() == 0 or b.std() == 0:
    return float("nan")
  return float(np.corrcoef(a, b)[0, 1])


def _spearman(a, b) -> float:
  from scipy.stats import spearmanr  # pylint: disable=g-import-not-at-top
  return float(spearmanr(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1))[0])


def _reconstruction_metric(x_test, y_float):
  """Metrics of an autoencoder's outputs against the float model's (``y_float``) on ``x_test``."""
  axes = tuple(range(1, x_test.ndim))

  def metric(pred, idx=None):
    x, f = _take(x_test, idx), _take(y_float, idx)
    float_score = np.mean((f - x) ** 2, axis=axes)
    p = np.asarray(pred, np.float32).reshape(x.shape)
    score = np.mean((p - x) ** 2, axis=axes)
    return {"score corr": _pearson(score, float_score),
            "score rank corr": _spearman(score, float_score),
            "score ratio": float(score.mean() / float_score.mean()),
            "error ratio": float(np.sqrt(np.mean((p - f) ** 2))
                                 / np.sqrt(np.mean((f - x) ** 2))),
            "rel. reconstruction error": float(score.mean() / x.var())}
  return metric


def _embedding_metric(y_float):
  from scipy.spatial.distance import pdist  # pylint: disable=g-import-not-at-top

  def metric(pred, idx=None):
    f = _take(y_float, idx)
    p = np.asarray(pred, np.float32).reshape(f.shape)
    return {"output corr": _pearson(p, f),
            "rel. error": float(np.linalg.norm(p - f) / np.linalg.norm(f)),
            "distance corr": _pearson(pdist(p), pdist(f))}
  return metric


def load_shared(name: str):
  import tf_keras  # pylint: disable=g-import-not-at-top
  path = models_dir() / f"{name}.h5"
  if not path.exists():
    raise FileNotFoundError(f"model file not found: {path}")
  return tf_keras.models.load_model(str(path), compile=False)


def _cached_inputs(tag: str, make: Callable) -> np.ndarray:
  path = cache_dir() / "inputs" / f"{tag}_v{VERSION}.npy"
  if path.exists():
    return np.load(path)
  x = np.asarray(make(), np.float32)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
  np.save(tmp, x)
  os.replace(tmp, path)
  return x


def _shared_task(name: str, x_pool, x_test, kind: str) -> Task:
  model = load_shared(name)
  y_float = np.asarray(model.predict(x_test, verbose=0, batch_size=256), np.float32)
  if kind == "reconstruction":
    metric = _reconstruction_metric(x_test, y_float)
  else:
    metric = _embedding_metric(y_float)
  return Task(model, x_pool, x_test, y_float, metric)


# --------------------------------------------------------------------------- 5. AD: speech log-mel


_SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "machine learning runs on tiny devices",
    "please turn the fan on and then off again",
    "seven eight nine ten eleven twelve",
    "hello world this is a test of speech",
    "the toy car drives around the track all day",
    "a pump and a valve make a steady sound",
    "quantization keeps the model small and fast",
    "rain falls softly on the quiet roof",
    "every morning the train leaves at nine",
    "she sells sea shells by the sea shore",
    "how much wood would a woodchuck chuck",
    "the engine hums while the wheels are turning",
    "open the window and let the air in",
    "numbers like four hundred and twenty two",
    "listen carefully to the sound of the motor",
)
_VOICES = ("en-us+m3", "en-us+f3", "en+m1", "en+f2", "en-gb-scotland+m4", "en-029+f4",
           "en-gb-x-rp+m2", "en-us-nyc+f1")


def _speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
  """espeak-ng's rendering at 16 kHz, float in [-1, 1] (WAV cached under `cache_dir`)."""
  wav_dir = cache_dir() / "wav"
  wav_dir.mkdir(parents=True, exist_ok=True)
  key = "%08x_%s_%d_%d" % (zlib.crc32(text.encode()), voice.replace("+", "-"), speed, pitch)
  path = wav_dir / f"{key}.wav"
  if not path.exists():
    tmp = wav_dir / f"{key}.{os.getpid()}.tmp.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w",
                    str(tmp), text], check=True, capture_output=True)
    os.replace(tmp, path)
  from scipy import signal  # pylint: disable=g-import-not-at-top
  from scipy.io import wavfile  # pylint: disable=g-import-not-at-top
  rate, data = wavfile.read(path)
  x = data.astype(np.float32) / 32768.0
  if x.ndim > 1:
    x = x.mean(axis=1)
  if rate != SAMPLE_RATE:
    g = np.gcd(rate, SAMPLE_RATE)
    x = signal.resample_poly(x, SAMPLE_RATE // g, rate // g).astype(np.float32)
  return x


def _hz_to_mel(f):
  f = np.asarray(f, np.float64)
  f_sp, min_hz = 200.0 / 3, 1000.0
  step = np.log(6.4) / 27.0
  return np.where(f >= min_hz, min_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_hz) / step,
                  f / f_sp)


def _mel_to_hz(m):
  m = np.asarray(m, np.float64)
  f_sp, min_hz = 200.0 / 3, 1000.0
  step = np.log(6.4) / 27.0
  return np.where(m >= min_hz / f_sp, min_hz * np.exp(step * (m - min_hz / f_sp)), f_sp * m)


def mel_filterbank(n_fft: int = 1024, n_mels: int = 128, sr: int = SAMPLE_RATE) -> np.ndarray:
  """librosa.filters.mel's default (Slaney scale and norm), 0..sr/2: (n_mels, 1 + n_fft // 2)."""
  fft = np.linspace(0.0, sr / 2, 1 + n_fft // 2)
  mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
  fdiff = np.diff(mel_f)
  ramps = mel_f[:, None] - fft[None, :]
  w = np.maximum(0.0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
  return w * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]


def log_mel(y: np.ndarray, n_fft: int = 1024, hop: int = 512, n_mels: int = 128) -> np.ndarray:
  """The MLPerf-Tiny AD front end: 10 * log10(mel power + eps), (frames, n_mels)."""
  from scipy import signal  # pylint: disable=g-import-not-at-top
  y = np.pad(np.asarray(y, np.float64), n_fft // 2, mode="reflect")
  window = signal.get_window("hann", n_fft, fftbins=True)
  n = 1 + (len(y) - n_fft) // hop
  frames = np.stack([y[i * hop:i * hop + n_fft] * window for i in range(n)])
  power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
  return 10.0 * np.log10(power @ mel_filterbank(n_fft, n_mels).T + np.finfo(np.float64).eps)


def ad_clips(part: str):
  """(text, voice, speed, pitch, noise seed) of the clips of ``part`` ('pool' or 'test')."""
  texts = _SENTENCES[0::2] if part == "pool" else _SENTENCES[1::2]
  rng = _rng(f"ad:{part}", 0)
  return [(t, _VOICES[(i + j) % len(_VOICES)], int(rng.integers(120, 191)),
           int(rng.integers(25, 76)), int(rng.integers(2**31)))
          for i, t in enumerate(texts) for j in range(3)]


def ad_log_mel_windows(part: str, hop_frames: int = 2) -> np.ndarray:
  """Unscaled dB windows (n, 5, 128) of speech clips: full-scale peak + noise `AD_NOISE_STD`."""
  out = []
  for text, voice, speed, pitch, noise_seed in ad_clips(part):
    y = _speak(text, voice, speed, pitch)
    y = y / max(float(np.abs(y).max()), 1e-6)
    y = y + np.random.default_rng(noise_seed).normal(0.0, AD_NOISE_STD, len(y))
    db = log_mel(np.clip(y, -1.0, 1.0))
    for t in range(0, db.shape[0] - 4, hop_frames):
      out.append(db[t:t + 5])
  return np.asarray(out, np.float32)


def ad_inputs(part: str, n: int) -> np.ndarray:
  """``n`` model inputs (n, 5, 128, 1) = a * dB + c (`AD_SCALE`), a seeded subset of the windows."""
  def make():
    a, c = AD_SCALE
    x = a * ad_log_mel_windows(part) + c
    idx = np.sort(_rng(f"ad-pick:{part}", 0).permutation(len(x))[:n])
    return x[idx][..., None]
  x = _cached_inputs(f"ad_{part}_n{n}_a{AD_SCALE[0]:g}_c{AD_SCALE[1]:g}", make)
  if len(x) < n:
    raise RuntimeError(f"only {len(x)} AD windows for part {part!r}; asked for {n}")
  return x


def anomaly_detection(n_pool: int = 400, n_test: int = 400) -> Task:
  """The MLPerf-Tiny AD autoencoder on log-mel windows of espeak-ng speech (vs float)."""
  return _shared_task("anomaly_detection", ad_inputs("pool", n_pool), ad_inputs("test", n_test),
                      "reconstruction")


def ad_scale_table(candidates=((1.0, 0.0), (1.5, 220.0), (2.0, 220.0), (3.0, 200.0),
                               (3.0, 220.0), (3.0, 240.0), (3.1875, 255.0), (4.0, 230.0),
                               (5.0, 260.0))) -> List[Dict]:
  """For each ``(a, c)``: the median relative reconstruction error and the first BatchNorm's fit."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  model = load_shared("anomaly_detection")
  first = tf_keras.Model(model.input, model.get_layer("dense").output)
  _, _, mean, var = model.get_layer("batch_normalization").get_weights()
  db = ad_log_mel_windows("pool")[..., None]
  rows = []
  for a, c in candidates:
    x = a * db + c
    rec = model.predict(x, verbose=0, batch_size=512)
    rel = np.mean((rec - x) ** 2, axis=(1, 2, 3)) / x.var()
    h = first.predict(x, verbose=0, batch_size=512)
    rows.append({"a": a, "c": c, "x range": (float(x.min()), float(x.max())),
                 "median rel. error": float(np.median(rel)),
                 "dmean2": float(np.mean((h.mean(0) - mean) ** 2 / var)),
                 "logvar": float(np.mean(np.log(h.var(0) / var)))})
  return rows


# --------------------------------------------------------------------------- 6. synthetic ECG


def ecg_beats(n: int, seed: int) -> np.ndarray:
  """``n`` synthetic heartbeats of 140 samples, min-max scaled to [0, 1] per beat (no real source)."""
  rng = np.random.default_rng(seed)
  t = np.arange(140, dtype=np.float64)
  out = np.empty((n, 140), np.float32)
  for i in range(n):
    r = rng.uniform(35, 55)  # R-peak position
    waves = (  # (center, width, height): P, Q, R, S, T
        (r - rng.uniform(18, 26), rng.uniform(3, 6), rng.uniform(0.1, 0.25)),
        (r - rng.uniform(3, 5), rng.uniform(1.0, 2.0), -rng.uniform(0.1, 0.3)),
        (r, rng.uniform(1.5, 3.0), rng.uniform(0.9, 1.3)),
        (r + rng.uniform(3, 6), rng.uniform(1.5, 3.0), -rng.uniform(0.2, 0.6)),
        (r + rng.uniform(30, 50), rng.uniform(7, 12), rng.uniform(0.2, 0.45)),
    )
    y = sum(h * np.exp(-0.5 * ((t - c) / w) ** 2) for c, w, h in waves)
    y = y + rng.uniform(-0.1, 0.1) * np.sin(2 * np.pi * t / 140 * rng.uniform(0.3, 1.0)
                                            + rng.uniform(0, 2 * np.pi))
    y = y + rng.normal(0, 0.01, t.shape)
    out[i] = (y - y.min()) / (y.max() - y.min())
  return out


def autoencoder_example(n_pool: int = 300, n_test: int = 300) -> Task:
  """MLTK's ECG-like autoencoder on synthetic heartbeats in [0, 1] (vs float; no real source)."""
  return _shared_task("autoencoder_example", ecg_beats(n_pool, 11), ecg_beats(n_test, 12),
                      "reconstruction")


# --------------------------------------------------------------------------- 7. synthetic fingerprints


def fingerprints(n: int, seed: int) -> np.ndarray:
  """``n`` synthetic fingerprints (n, 180, 180, 1): uint8 pixels - 128 (MLTK's int8 convention)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  size = 192
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  out = np.empty((n, 180, 180, 1), np.float32)
  for i in range(n):
    cy, cx = rng.uniform(70, 122, 2)
    period = rng.uniform(8, 11)
    warp = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 18)
    warp = warp / (np.abs(warp).max() + 1e-9) * rng.uniform(4, 10)
    ay = rng.uniform(0.6, 1.0)
    dist = np.sqrt(((yy - cy) * ay) ** 2 + (xx - cx) ** 2) + warp
    ridges = 0.5 + 0.5 * np.cos(2 * np.pi * dist / period)  # 1 = valley (light)
    ey, ex = rng.uniform(70, 90), rng.uniform(55, 75)
    inside = ((yy - size / 2 - rng.uniform(-8, 8)) / ey) ** 2 + (
        (xx - size / 2 - rng.uniform(-8, 8)) / ex) ** 2 <= 1.0
    inside = ndimage.gaussian_filter(inside.astype(np.float64), 2)
    dark, light = rng.uniform(0, 60), rng.uniform(190, 255)
    # Dark ridges inside the finger; white paper (255) outside it.
    img = (light + (dark - light) * (1 - ridges)) * inside + 255.0 * (1 - inside)
    img = img + rng.normal(0, rng.uniform(3, 12), img.shape)
    img = np.clip(np.round(img), 0, 255)
    out[i, ..., 0] = img[6:186, 6:186] - 128.0
  return out


def fingerprint_signature_generator(n_pool: int = 100, n_test: int = 100) -> Task:
  """MLTK's fingerprint signature model on synthetic fingerprints, int8 scale (vs float)."""
  return _shared_task("fingerprint_signature_generator",
                      _cached_inputs(f"fp_pool_n{n_pool}", lambda: fingerprints(n_pool, 21)),
                      _cached_inputs(f"fp_test_n{n_test}", lambda: fingerprints(n_test, 22)),
                      "embedding")


# --------------------------------------------------------------------------- dispatch

_TRAINED_FNS = {"conv_autoencoder": conv_autoencoder, "mask_net": mask_net,
                "regression_mlp": regression_mlp, "two_head": two_head,
                "two_input": two_input}
_SHARED_FNS = {"anomaly_detection": anomaly_detection,
               "autoencoder_example": autoencoder_example,
               "fingerprint_signature_generator": fingerprint_signature_generator}

HOW = {
    "conv_autoencoder": "conv AE (Dense-16 bottleneck) trained here on MNIST train-split digits "
                        "0-4 (20 epochs); test: last 2,000 MNIST, digits 5-9 anomalous; score = "
                        "reconstruction MSE",
    "mask_net": "U-Net trained here (4 epochs) on noisy (std 0.35) + occluded MNIST, target "
                "clean > 0.5; test: last 2,000",
    "regression_mlp": "MLP trained here on sklearn diabetes (342 train / 100 test), inputs "
                      "standardized outside the model, raw target",
    "two_head": "CNN trained here (10 epochs) on MNIST shifted +-4 px: class softmax + box "
                "sigmoid; test: last 2,000 shifted",
    "two_input": "CNN + MLP trained here (6 epochs) on MNIST with two inputs: the image and "
                 "a table of its 56 row/column ink sums (0..28, through Rescaling(1/28)); "
                 "test: last 2,000",
    "anomaly_detection": "pretrained; espeak-ng speech, MLPerf-Tiny log-mel (64/32 ms, 128 "
                         "mels, dB), x = 3*dB + 220; compared with float",
    "autoencoder_example": "pretrained; synthetic ECG-like beats in [0, 1] (no real source); "
                           "compared with float",
    "fingerprint_signature_generator": "pretrained; synthetic fingerprints, uint8 - 128 (no "
                                       "real source); compared with float",
}


def load_model(name: str, seed: int = 0):
  """A fresh copy of the float model ``name`` (a model trained here must have been trained:
  `task` trains it on first use)."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  if name in _SHARED_FNS:
    return load_shared(name)
  path = model_path(name, seed)
  if not path.exists():
    return task(name, seed).model
  return tf_keras.models.load_model(str(path), compile=False)


def task(name: str, seed: int = 0) -> Task:
  """The `Task` of ``name`` (`ALL`); ``seed`` selects the training seed of a model trained here."""
  if name in _TRAINED_FNS:
    return _TRAINED_FNS[name](seed)
  if name in _SHARED_FNS:
    return _SHARED_FNS[name]()
  raise KeyError(f"Expected a name in {ALL}. Received: {name!r}")


def why_unavailable(name: str) -> Optional[str]:
  """None when `task(name)` can run here, else the reason."""
  import shutil  # pylint: disable=g-import-not-at-top
  if name in ("conv_autoencoder", "mask_net", "two_head", "two_input") and not (
      mnist_dir() / "t10k-images-idx3-ubyte.gz").exists():
    return f"MNIST not found in {mnist_dir()}"
  if name in SHARED and not (models_dir() / f"{name}.h5").exists():
    return f"model file not found: {models_dir() / (name + '.h5')}"
  if name == "anomaly_detection" and shutil.which("espeak-ng") is None:
    return "espeak-ng is not installed (apt-get install espeak-ng)"
  return None


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("names", nargs="*", default=list(ALL))
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--ad-scales", action="store_true",
                      help="print the AD input-scale comparison (`ad_scale_table`)")
  args = parser.parse_args(argv)
  if args.ad_scales:
    for row in ad_scale_table():
      print(row)
    return
  for name in args.names:
    seeds = [int(s) for s in args.seeds.split(",")] if name in TRAINED else [None]
    for seed in seeds:
      start = time.perf_counter()
      t = task(name, seed or 0)
      m = t.metric_fn(predict(t.model, t.x_test))
      took = info(name, seed).get("train_seconds") if seed is not None else None
      low, high = value_range(t.x_test)
      print(f"{name} seed {seed}: {json.dumps({k: round(v, 4) for k, v in m.items()})}; "
            f"pool {num_samples(t.x_pool)} test {num_samples(t.x_test)} x in [{low:.3g}, "
            f"{high:.3g}]; trained in {took} s; {time.perf_counter() - start:.1f} s",
            flush=True)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
