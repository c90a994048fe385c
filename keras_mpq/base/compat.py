"""The one place that decides Keras 2 versus Keras 3.

tensorflow-model-optimization works on Keras 2 (``tf_keras``). Every module of
keras_mpq imports ``keras`` from here and never ``tf.keras``, so a user's Keras 3
session is left alone: we import ``tf_keras`` by name. Loading user models
(tf_keras models, Keras 3 models, ``.keras``/``.h5``/SavedModel paths) lives in
`keras_mpq.model.load`.
"""

import random

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

__all__ = ["keras", "tf", "tfmot", "set_global_seed", "is_keras3_model"]


def set_global_seed(seed: int) -> np.random.Generator:
  """Seeds Python, NumPy and TensorFlow; returns a NumPy Generator for ``seed``."""
  seed = int(seed)
  random.seed(seed)
  np.random.seed(seed % (2**32))
  tf.random.set_seed(seed)
  keras.utils.set_random_seed(seed)
  return np.random.default_rng(seed)


def is_keras3_model(obj) -> bool:
  """True for a Keras 3 (``keras``) model, which tfmot cannot wrap directly."""
  cls = type(obj)
  return any(c.__module__.startswith("keras.") or c.__module__ == "keras"
             for c in cls.__mro__) and not isinstance(obj, keras.Model)
