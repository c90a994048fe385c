"""Real data for demos, tests and benchmarks: MNIST from ``../shared/data``, else scikit-learn digits.

The MNIST files hold the 10,000-image test set only. The fixed split used by
every figure in this project: the first 8,000 images to train and calibrate,
the last 2,000 to test. Without the files (a machine without ``../shared``), the
8x8 scikit-learn digits are upsampled to 28x28 so the same models run.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
from typing import Optional

import numpy as np

from keras_mpq.base.errors import InvalidInputError

TRAIN_SPLIT = 8000  # first 8,000 train/calibrate, last 2,000 test


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images in [0, 1] as float32 NHWC (N, 28, 28, 1) and int labels."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str
  split: str


def default_mnist_dir() -> Optional[pathlib.Path]:
  """``$KERAS_MPQ_MNIST_DIR`` or ``../shared/data/mnist`` beside the project, if present."""
  env = os.environ.get("KERAS_MPQ_MNIST_DIR")
  candidates = [pathlib.Path(env)] if env else []
  root = pathlib.Path(__file__).resolve().parent.parent
  candidates += [root.parent / "shared" / "data" / "mnist",
                 pathlib.Path.cwd().parent / "shared" / "data" / "mnist"]
  for c in candidates:
    if (c / "t10k-images-idx3-ubyte.gz").exists():
      return c
  return None


def load_mnist(directory=None) -> Dataset:
  """MNIST test set (IDX, gzipped), split 8,000 train / 2,000 test."""
  directory = pathlib.Path(directory) if directory else default_mnist_dir()
  if directory is None:
    raise InvalidInputError(
        "MNIST files not found. Expected ../shared/data/mnist beside the project "
        "or KERAS_MPQ_MNIST_DIR; use load_digits() otherwise.")
  images = np.frombuffer(gzip.open(directory / "t10k-images-idx3-ubyte.gz").read(),
                         np.uint8, offset=16).reshape(-1, 28, 28, 1)
  labels = np.frombuffer(gzip.open(directory / "t10k-labels-idx1-ubyte.gz").read(),
                         np.uint8, offset=8).astype(np.int64)
  x = images.astype(np.float32) / 255.0
  return Dataset(x[:TRAIN_SPLIT], labels[:TRAIN_SPLIT], x[TRAIN_SPLIT:],
                 labels[TRAIN_SPLIT:], "mnist",
                 "MNIST t10k: first 8000 train/calibrate, last 2000 test")


def load_digits() -> Dataset:
  """scikit-learn's 8x8 digits (1,797 images) upsampled to 28x28, split 1,400 / 397."""
  from sklearn.datasets import load_digits as _load  # ships with scikit-learn
  d = _load()
  img = (d.images / 16.0).astype(np.float32)  # (N, 8, 8) in [0, 1]
  big = np.kron(img, np.ones((3, 3), np.float32))  # 24x24
  big = np.pad(big, ((0, 0), (2, 2), (2, 2)))[..., None]  # 28x28x1
  y = d.target.astype(np.int64)
  n = 1400
  return Dataset(big[:n], y[:n], big[n:], y[n:], "digits",
                 "sklearn digits upsampled to 28x28: first 1400 train, last 397 test")


def load_default() -> Dataset:
  """MNIST when ``../shared/data/mnist`` exists, else scikit-learn digits."""
  return load_mnist() if default_mnist_dir() is not None else load_digits()
