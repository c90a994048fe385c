"""Shared fixtures: real data and trained reference models, built once per session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest


@pytest.fixture(scope="session")
def dataset():
  """MNIST split (8000/2000) from ../shared/data, else scikit-learn digits."""
  from keras_mpq import demo_data as demo_data_lib
  return demo_data_lib.load_default()


@pytest.fixture(scope="session")
def small_data(dataset):
  """512 real training images and labels (calibration-sized), and 500 test ones."""
  return (dataset.x_train[:512], dataset.y_train[:512],
          dataset.x_test[:500], dataset.y_test[:500])


@pytest.fixture(scope="session")
def trained_cnn(dataset):
  """The zoo's plain CNN trained on the real data (~97% on MNIST)."""
  from keras_mpq import model_zoo as model_zoo_lib
  return model_zoo_lib.build_and_train("plain_cnn", dataset, seed=0)


@pytest.fixture(scope="session")
def trained_separable(dataset):
  """The zoo's depthwise-separable CNN trained on the real data (~95% on MNIST)."""
  from keras_mpq import model_zoo as model_zoo_lib
  return model_zoo_lib.build_and_train("separable_cnn", dataset, seed=0)


@pytest.fixture
def rng():
  return np.random.default_rng(0)
