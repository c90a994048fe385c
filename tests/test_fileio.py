"""Atomic writes: whole files or none, previous outputs intact on failure."""

import json
import os

import pytest

from keras_mpq.base import fileio as fileio_lib
from keras_mpq.base.errors import InvalidInputError


def test_write_json_and_text(tmp_path):
  fileio_lib.write_json(tmp_path / "a" / "x.json", {"k": 1})
  assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": 1}
  fileio_lib.write_text(tmp_path / "t.txt", "hello")
  assert (tmp_path / "t.txt").read_text() == "hello"


def test_written_files_get_the_usual_mode(tmp_path):
  fileio_lib.write_text(tmp_path / "r.md", "x")
  mask = os.umask(0)
  os.umask(mask)
  assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o666 & ~mask


def test_failed_write_keeps_previous_file(tmp_path):
  target = tmp_path / "model.tflite"
  fileio_lib.write_bytes(target, b"old contents")
  with pytest.raises(RuntimeError):
    with fileio_lib.atomic_path(target) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"half")
      raise RuntimeError("killed mid-write")
  assert target.read_bytes() == b"old contents"
  assert [p.name for p in tmp_path.iterdir()] == ["model.tflite"]  # no temp left


def test_unwritable_directory():
  # /proc refuses new directories even to root, so this runs the same under CI.
  with pytest.raises(InvalidInputError, match="Cannot create output directory"):
    fileio_lib.ensure_dir("/proc/keras_mpq_out")


def test_directory_over_a_file(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(InvalidInputError, match="Cannot create output directory"):
    fileio_lib.ensure_dir(tmp_path / "f" / "sub")
