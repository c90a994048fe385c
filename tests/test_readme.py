"""The README runs as written: its Python blocks execute, its help texts are the real ones."""

import contextlib
import io
import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language):
  return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
  """Every ```python block of the README, in order, in one namespace.

  The quickstart's prose says what the names it uses are: ``model`` (a trained
  classifier) and labeled ``x, y``, ``x_test, y_test``. They are given here
  small (an 8x8 four-class CNN briefly trained on random labeled data) so the
  blocks run in seconds; the code itself is the README's, unchanged.
  """
  from keras_mpq import model_zoo as model_zoo_lib  # pylint: disable=g-import-not-at-top
  blocks = _blocks("python")
  assert len(blocks) >= 2, "the README lost its Python quickstart"
  rng = np.random.default_rng(0)
  x = rng.random((96, 8, 8, 1)).astype(np.float32)
  y = (x[:, :4].mean(axis=(1, 2, 3)) * 8).astype(np.int64) % 4
  model = model_zoo_lib.train(model_zoo_lib.tiny_conv_dense(seed=0), x, y, epochs=2, seed=0)
  namespace = {"model": model, "x": x[:64], "y": y[:64], "x_test": x[64:], "y_test": y[64:]}
  monkeypatch.chdir(tmp_path)
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  result = namespace["result"]
  assert (tmp_path / "model.tflite").stat().st_size > 0
  assert {"plan.json", "report.json", "sensitivity.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
  restored = namespace["restored"]
  np.testing.assert_array_equal(restored.predict(x, verbose=0), result.model.predict(x, verbose=0))


def _help(*argv):
  from keras_mpq import cli as cli_lib  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli_lib.main(["keras-mpq", *argv]) == 0
  return out.getvalue().rstrip("\n")


def test_readme_help_texts_are_the_real_ones():
  text = README.read_text()
  shown = re.findall(r"<!-- cli-help: keras-mpq (.*?) -->\n```text\n(.*?)\n```", text, re.S)
  assert [argv for argv, _ in shown] == ["--help", "quantize --help"]
  for argv, block in shown:
    assert block == _help(*argv.split()), f"README's 'keras-mpq {argv}' is out of date"
