"""End to end on stock keras.applications architectures (plain Keras 3, weights=None).

Each architecture is built at 32x32x3, quantized to a 4-bit average (2/4/8
candidates) on 16 real images (digits or MNIST, resized and tiled to 3
channels, 0..255 mapped onto the model's input range: raw pixels for the
models that rescale inside, [0, 1] for the others), and exported for
'mobile' and 'mcu'; each file is run in
its runtime (LiteRT, TFLite Micro). Slow (minutes per model): run with
``make test-slow``; ``benchmarks/bench_applications.py`` runs the same eight
data-free and times them.
"""

import numpy as np
import pytest

keras3 = pytest.importorskip("keras")
pytest.importorskip("ai_edge_litert")

import keras_mpq  # pylint: disable=g-import-not-at-top
from keras_mpq import demo_data as demo_data_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base.compat import tf  # pylint: disable=g-import-not-at-top

ARCHITECTURES = ("MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large",
                 "EfficientNetB0", "ResNet50", "DenseNet121", "NASNetMobile")
SIZE = 32


def _images(n, model):
  """``n`` real images on ``model``'s input scale (`keras_mpq.resolve_input_range`)."""
  low, high = keras_mpq.resolve_input_range(model)[:2]
  data = demo_data_lib.load_default()
  x = np.asarray(data.x_test[:n], np.float32)
  if x.max() <= 1.0:
    x = x * 255.0
  x = tf.image.resize(x, (SIZE, SIZE)).numpy()
  x = low + x / 255.0 * (high - low)
  return np.repeat(x, 3, axis=-1).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stock_architecture_quantizes_and_both_files_run(arch, tmp_path):
  k3 = getattr(keras3.applications, arch)(weights=None, input_shape=(SIZE, SIZE, 3),
                                          classes=10)
  x = _images(24, k3)
  result = keras_mpq.quantize(k3, "4bit", data=x[:16], weight_bits=(2, 4, 8), seed=0,
                              progress=False)
  assert result.report["achieved"]["avg_bits"] <= 4.0 + 1e-9
  float_bytes = 4 * int(k3.count_params())
  for target, runtime in (("mobile", "litert"), ("mcu", "tflm")):
    path = tmp_path / f"{target}.tflite"
    exported = result.export(path, target=target)
    assert path.exists() and exported.size < 0.5 * float_bytes, (target, exported.size)
    checked = keras_mpq.validate_tflite(path, x[16:], reference=result.float_model,
                                        runtime=runtime)
    assert checked.runtime == runtime
    out = runtime_lib.run_tflite(str(path), x[16:], runtime=runtime)
    assert np.all(np.isfinite(out)) and out.shape == (8, 10)
