"""Atomic file output: every file keras_mpq writes appears whole or not at all.

Write to a temporary file in the destination's directory, flush and fsync,
then ``os.replace`` it over the destination. A killed run leaves the previous
file intact and no half-written one.

Example:

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> write_json(os.path.join(d, "plan.json"), {"conv1": 8})
>>> open(os.path.join(d, "plan.json")).read()
'{\\n  "conv1": 8\\n}'
"""

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator

from keras_mpq.types import InvalidInputError, to_jsonable


def ensure_dir(path) -> pathlib.Path:
  """Creates ``path`` (and parents); a clear error if it can't be written."""
  path = pathlib.Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise InvalidInputError(
        f"Cannot create output directory {str(path)!r}: {e.strerror}. "
        "Choose a writable directory.") from None
  if not os.access(path, os.W_OK):
    raise InvalidInputError(
        f"Output directory {str(path)!r} is not writable. Choose a writable directory.")
  return path


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
  """Yields a temporary path beside ``path``; renames it to ``path`` on success.

  For libraries that insist on writing to a path themselves (matplotlib,
  Keras ``save``). On an exception the temporary file is removed and
  ``path`` is untouched.
  """
  path = pathlib.Path(path)
  ensure_dir(path.parent if str(path.parent) else ".")
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix,
                             dir=path.parent)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_bytes(path, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (fsync, then rename)."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path, obj: Any) -> None:
  """Writes ``obj`` (dataclass dicts, numpy values allowed) as indented JSON."""
  write_text(path, json.dumps(to_jsonable(obj), indent=2))
