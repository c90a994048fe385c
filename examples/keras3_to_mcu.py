"""From a Keras 3 `.keras` file to a TFLite Micro flatbuffer, checked on real data.

What a Keras 3 user does: build and train with `import keras`, save a
`.keras` file, then hand that file to keras_mpq with a byte budget for a
microcontroller. No training data goes into the quantization.

    .venv/bin/python examples/keras3_to_mcu.py [--out example_out]
"""

import argparse
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # Keras 3, as the user has it
import numpy as np

import keras_mpq
from keras_mpq import demo_data as demo_data_lib
from keras_mpq import report as report_lib


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="example_out")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  data = demo_data_lib.load_default()
  keras.utils.set_random_seed(0)
  model = keras.Sequential([
      keras.Input((28, 28, 1)),
      keras.layers.Conv2D(16, 3, activation="relu"),
      keras.layers.MaxPooling2D(),
      keras.layers.Conv2D(32, 3, activation="relu"),
      keras.layers.MaxPooling2D(),
      keras.layers.Flatten(),
      keras.layers.Dense(10),
  ])
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  model.fit(data.x_train, data.y_train, epochs=2, verbose=0)
  path = out / "user_model.keras"
  model.save(path)
  print(f"Keras 3 model saved to {path}; float test accuracy "
        f"{model.evaluate(data.x_test, data.y_test, verbose=0)[1]:.4f}")

  # A byte budget (the mcu file's size) halfway between the smallest file and
  # the all-8-bit one; one cheap export measures the file's fixed part.
  from keras_mpq.export import storage as storage_lib  # pylint: disable=g-import-not-at-top
  folded = keras_mpq.fold_batchnorm(keras_mpq.load_model(path))
  costs = keras_mpq.file_cost_table(folded, storage_lib.measure_storage(folded, "mcu"))
  per_layer = costs.matrix("bytes")
  smallest, largest = per_layer.min(axis=1).sum(), per_layer.max(axis=1).sum()
  budget = keras_mpq.Budget.bytes(smallest + 0.5 * (largest - smallest))
  result = keras_mpq.quantize(path, budget, target="mcu", seed=0)
  print(report_lib.summary_table(result.report))

  exported = result.export(out / "model_mcu.tflite", target="mcu")
  print(exported.table())
  checked = keras_mpq.validate_tflite(exported.path, data.x_test, data.y_test,
                                      runtime="tflm")
  print(f"TFLite Micro: accuracy {checked.accuracy:.4f} on {checked.n} held-out images "
        f"({exported.size} bytes, budget {budget.value:.0f}; arena "
        f"{exported.deployment['arena_bytes']} bytes)")


if __name__ == "__main__":
  main()
