"""Small reference models used by the demo, the tests and the benchmarks.

These are real architectures a user would bring for a 28x28 grayscale task: a
plain CNN (Conv2D + BatchNorm + Dense) and a depthwise-separable CNN
(MobileNet-style DepthwiseConv2D + pointwise Conv2D blocks). Both are tf_keras.
"""

from __future__ import annotations

from keras_mpq.base.compat import keras, set_global_seed

layers = keras.layers


def plain_cnn(input_shape=(28, 28, 1), num_classes=10, name="plain_cnn"):
  """Conv(16)-BN-ReLU, Conv(32)-BN-ReLU, pool, Conv(32), GAP, Dense(64), Dense(classes)."""
  inp = keras.Input(input_shape, name="image")
  x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
  x = layers.BatchNormalization(name="bn1")(x)
  x = layers.ReLU(name="relu1")(x)
  x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="conv2")(x)
  x = layers.BatchNormalization(name="bn2")(x)
  x = layers.ReLU(name="relu2")(x)
  x = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu", name="conv3")(x)
  x = layers.Flatten(name="flatten")(x)
  x = layers.Dropout(0.2, name="dropout")(x)
  x = layers.Dense(64, activation="relu", name="fc1")(x)
  out = layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inp, out, name=name)


def separable_cnn(input_shape=(28, 28, 1), num_classes=10, name="separable_cnn"):
  """MobileNet-style: Conv stem, three DepthwiseConv+BN+ReLU6 / 1x1 Conv+BN+ReLU6 blocks, GAP, Dense."""
  inp = keras.Input(input_shape, name="image")
  x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
  x = layers.BatchNormalization(name="stem_bn")(x)
  x = layers.ReLU(6.0, name="stem_relu")(x)
  for i, (filters, stride) in enumerate([(32, 1), (64, 2), (64, 1)]):
    x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                               name=f"dw{i}")(x)
    x = layers.BatchNormalization(name=f"dw{i}_bn")(x)
    x = layers.ReLU(6.0, name=f"dw{i}_relu")(x)
    x = layers.Conv2D(filters, 1, use_bias=False, name=f"pw{i}")(x)
    x = layers.BatchNormalization(name=f"pw{i}_bn")(x)
    x = layers.ReLU(6.0, name=f"pw{i}_relu")(x)
  x = layers.GlobalAveragePooling2D(name="gap")(x)
  out = layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inp, out, name=name)


def train(model, x, y, epochs=3, batch_size=64, seed=0, verbose=0):
  """Compiles with Adam and sparse CE on logits, fits, returns the model."""
  set_global_seed(seed)
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose, shuffle=True)
  return model


def recalibrate_batchnorm(model, x):
  """Sets every BatchNorm's moving statistics to those of ``x`` (one batch, training mode).

  keras.applications' BatchNorm momentum is 0.999, so after a brief training its
  moving statistics still sit near their initial values and the model predicts
  at chance in inference mode (8.5% on the MNIST split; 76% in training mode).
  Works on tf_keras and plain Keras 3 models alike.
  """
  bns = [l for l in model.layers if type(l).__name__ == "BatchNormalization"]  # Keras 3 too
  saved = [l.momentum for l in bns]
  for l in bns:
    l.momentum = 0.0
  model(x, training=True)
  for l, m in zip(bns, saved):
    l.momentum = m
  return model


def tiny_conv_dense(input_shape=(8, 8, 1), num_classes=4, seed=0, name="tiny"):
  """Conv2D(8, 3, relu) 'conv' -> Flatten -> Dense(num_classes) 'fc', seeded: for fast tests."""
  set_global_seed(seed)
  inp = keras.Input(input_shape)
  h = layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
  h = layers.Flatten()(h)
  return keras.Model(inp, layers.Dense(num_classes, name="fc")(h), name=name)


BUILDERS = {"plain_cnn": plain_cnn, "separable_cnn": separable_cnn}
EPOCHS = {"plain_cnn": 3, "separable_cnn": 8}  # 96.8% / 95.3% on the MNIST split


def build_and_train(name, dataset, seed=0, epochs=None):
  """Builds zoo model ``name`` for ``dataset`` and trains it (deterministic for ``seed``).

  Example:

  >>> from keras_mpq import demo_data, model_zoo
  >>> data = demo_data.load_default()
  >>> model = model_zoo.build_and_train("plain_cnn", data)  # doctest: +SKIP
  """
  if name not in BUILDERS:
    raise ValueError(f"Unknown zoo model {name!r}; known: {sorted(BUILDERS)}")
  set_global_seed(seed)
  num_classes = int(dataset.y_train.max()) + 1
  model = BUILDERS[name](input_shape=dataset.x_train.shape[1:], num_classes=num_classes)
  if epochs is None:
    # Same number of optimizer steps as on the 8,000-image MNIST split, so the
    # smaller scikit-learn digits set (1,400 images) trains as far.
    epochs = max(EPOCHS[name], round(EPOCHS[name] * 8000 / len(dataset.x_train)))
  return train(model, dataset.x_train, dataset.y_train, epochs=epochs, seed=seed)
