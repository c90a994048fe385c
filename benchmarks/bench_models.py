"""The benchmark's models: independently trained copies, cached on disk.

Accuracy claims must hold beyond one training run and beyond the project's own
designs, so every accuracy benchmark draws its models from here:

* ``plain_cnn`` and ``separable_cnn`` (the zoo's MNIST CNNs), trained with
  seeds 1 and 2 (seed 0 is what the unit tests train, so these are copies the
  tests never saw);
* ``nobn_cnn``: a 5-layer MNIST CNN without BatchNorm (Conv-Conv-Conv-Dense-Dense,
  ReLU), the case where BatchNorm statistics give a data-free method nothing;
* ``mobilenet_v2``: the stock ``keras.applications.MobileNetV2`` (alpha 0.35,
  ``weights=None``), a model the project did not design, trained briefly on
  the same MNIST split padded to 32x32 and tiled to 3 channels.

Trained models are saved as ``.h5`` under ``bench_out/models/`` (ignored by
git) and loaded from there on the next call, so several benchmarks share one
training run. Delete the folder to retrain.

    from benchmarks import bench_models          # or: import bench_models
    data = bench_models.dataset_for("plain_cnn")
    model = bench_models.get("plain_cnn", seed=1)
"""

from __future__ import annotations

import os
import pathlib
from typing import Dict, Iterator, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from keras_mpq import demo_data as demo_data_lib
from keras_mpq import model_zoo as model_zoo_lib
from keras_mpq.base.compat import keras, set_global_seed

HERE = pathlib.Path(__file__).resolve().parent
CACHE = HERE.parent / "bench_out" / "models"
SEEDS = (1, 2)
NAMES = ("plain_cnn", "separable_cnn", "nobn_cnn", "mobilenet_v2")
STOCK_EPOCHS = 3

_DATA: Dict[str, demo_data_lib.Dataset] = {}


def _rgb32(x: np.ndarray) -> np.ndarray:
  """(N, 28, 28, 1) in [0, 1] -> (N, 32, 32, 3): zero-padded, tiled to 3 channels."""
  x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  return np.repeat(x, 3, axis=-1).astype(np.float32)


def dataset_for(name: str) -> demo_data_lib.Dataset:
  """The data set model ``name`` takes: the MNIST split (or digits), 32x32x3 for the stock model."""
  key = "rgb32" if name == "mobilenet_v2" else "gray28"
  if key not in _DATA:
    base = demo_data_lib.load_default()
    if key == "rgb32":
      base = demo_data_lib.Dataset(_rgb32(base.x_train), base.y_train, _rgb32(base.x_test),
                               base.y_test, base.name + "-rgb32",
                               base.split + "; padded to 32x32, tiled to 3 channels")
    _DATA[key] = base
  return _DATA[key]


def _build_stock(data: demo_data_lib.Dataset, seed: int):
  set_global_seed(seed)
  num_classes = int(data.y_train.max()) + 1
  model = keras.applications.MobileNetV2(input_shape=data.x_train.shape[1:], alpha=0.35,
                                         weights=None, classes=num_classes,
                                         classifier_activation=None)
  epochs = max(STOCK_EPOCHS, round(STOCK_EPOCHS * 8000 / len(data.x_train)))
  model = model_zoo_lib.train(model, data.x_train, data.y_train, epochs=epochs, seed=seed)
  return model_zoo_lib.recalibrate_batchnorm(model, data.x_train[:2000])


def nobn_cnn(input_shape=(28, 28, 1), num_classes=10):
  """Conv(16)-Conv(32, s2)-Conv(64, s2)-Dense(64)-Dense(classes), ReLU, no BatchNorm."""
  layers = keras.layers
  inp = keras.Input(input_shape, name="image")
  x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
  x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
  x = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu", name="conv3")(x)
  x = layers.Flatten(name="flatten")(x)
  x = layers.Dense(64, activation="relu", name="fc1")(x)
  return keras.Model(inp, layers.Dense(num_classes, name="logits")(x), name="nobn_cnn")


def get(name: str, seed: int = 1):
  """Model ``name`` trained with ``seed`` (loaded from the cache when present)."""
  if name not in NAMES:
    raise ValueError(f"Unknown benchmark model {name!r}; known: {NAMES}")
  data = dataset_for(name)
  path = CACHE / f"{name}-seed{seed}-{data.name}.h5"
  if path.exists():
    return keras.models.load_model(path, compile=False)
  if name == "mobilenet_v2":
    model = _build_stock(data, seed)
  elif name == "nobn_cnn":
    set_global_seed(seed)
    model = nobn_cnn(data.x_train.shape[1:], int(data.y_train.max()) + 1)
    epochs = max(3, round(3 * 8000 / len(data.x_train)))
    model = model_zoo_lib.train(model, data.x_train, data.y_train, epochs=epochs, seed=seed)
  else:
    model = model_zoo_lib.build_and_train(name, data, seed=seed)
  CACHE.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.h5")
  model.save(tmp)
  os.replace(tmp, path)
  return keras.models.load_model(path, compile=False)


def float_accuracy(model, data: demo_data_lib.Dataset) -> float:
  """Test-split accuracy of a float model."""
  pred = model.predict(data.x_test, verbose=0, batch_size=256).argmax(-1)
  return float(np.mean(pred == data.y_test))


def all_models(names=NAMES, seeds=SEEDS) -> Iterator[Tuple[str, int, object, demo_data_lib.Dataset]]:
  """(name, seed, model, data) for every benchmark model copy."""
  for name in names:
    for seed in seeds:
      yield name, seed, get(name, seed), dataset_for(name)


if __name__ == "__main__":
  for n, s, m, d in all_models():
    print(f"{n} seed {s}: float accuracy {float_accuracy(m, d):.4f} on {d.name}")
