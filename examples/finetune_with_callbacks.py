"""Quantization-aware fine-tuning of a mixed-precision plan with Keras callbacks.

`quantize` returns a calibrated tfmot model; `model.fit` fine-tunes it with the
weights fake-quantized at their planned bits. The callbacks freeze activation
ranges after a while, and export and validate the .tflite after each epoch,
logging its accuracy into the Keras history.

    .venv/bin/python examples/finetune_with_callbacks.py [--out example_out]
"""

import argparse
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_mpq
from keras_mpq import demo_data as demo_data_lib
from keras_mpq import model_zoo as model_zoo_lib
from keras_mpq.base.compat import keras


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="example_out")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  data = demo_data_lib.load_default()
  model = model_zoo_lib.build_and_train("separable_cnn", data, seed=0)
  result = keras_mpq.quantize(model, "3bit", seed=0)  # data-free
  qmodel = result.model
  qmodel.compile(optimizer=keras.optimizers.Adam(1e-4),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"])
  before = qmodel.evaluate(data.x_test, data.y_test, verbose=0)[1]
  history = qmodel.fit(
      data.x_train, data.y_train, epochs=2, batch_size=64, verbose=2,
      callbacks=[
          keras_mpq.FreezeRanges(after_steps=125),
          keras_mpq.ExportAndValidate(out / "finetuned_{epoch}.tflite", data.x_test,
                                      data.y_test, target="mobile",
                                      calibration_data=result.calibration_data),
      ])
  print(f"plan {result.plan.weight_bits}")
  print(f"Keras accuracy after quantize: {before:.4f}; after fine-tuning: "
        f"{qmodel.evaluate(data.x_test, data.y_test, verbose=0)[1]:.4f}")
  print("exported .tflite accuracy per epoch:", history.history["tflite_accuracy"])


if __name__ == "__main__":
  main()
