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

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import pathlib
import re
import signal
import tempfile
from typing import Any, Iterator, List

from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import to_jsonable


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
    _test_signal("before", path)
    os.replace(tmp, path)
    _test_signal("after", path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


# Test-only fault injection. ``KERAS_MPQ_TEST_SIGNAL="KILL before report.json"``
# makes this process send itself SIGKILL just before the rename that would
# publish a file whose name matches the glob ("after": just after it). The
# reliability tests use it to kill or interrupt a run at a known point instead
# of racing a poll. Unset (always, outside the tests) it costs one dict lookup.
TEST_SIGNAL_ENV = "KERAS_MPQ_TEST_SIGNAL"


def _test_signal(when: str, path: pathlib.Path) -> None:
  spec = os.environ.get(TEST_SIGNAL_ENV)
  if not spec:
    return
  name, at, pattern = spec.split(maxsplit=2)
  if at == when and fnmatch.fnmatch(path.name, pattern):
    os.kill(os.getpid(), getattr(signal, "SIG" + name.upper()))


# What `atomic_path` leaves behind when its process is killed between mkstemp
# and the rename: ".NAME.<8 random characters>.tmp[SUFFIX]".
_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]*)?$")


def remove_stale_temps(directory) -> List[str]:
  """Removes the temporary files that killed runs left in ``directory``.

  Call it only while holding `lock_dir` on ``directory``: then no other
  keras-mpq run is writing there, and every such file is a leftover.
  Returns the names removed.

  >>> import tempfile, os
  >>> d = tempfile.mkdtemp()
  >>> open(os.path.join(d, ".plan.json.ab12cd34.tmp.json"), "w").close()
  >>> remove_stale_temps(d)
  ['.plan.json.ab12cd34.tmp.json']
  """
  directory = pathlib.Path(directory)
  removed = []
  if not directory.is_dir():
    return removed
  for entry in sorted(directory.iterdir()):
    if _TEMP_RE.match(entry.name) and entry.is_file():
      with contextlib.suppress(FileNotFoundError):
        entry.unlink()
        removed.append(entry.name)
  return removed


LOCK_NAME = ".keras-mpq.lock"


@contextlib.contextmanager
def lock_dir(directory) -> Iterator[pathlib.Path]:
  """Holds an exclusive lock on ``directory`` (file ``.keras-mpq.lock``) while in the block.

  A second holder fails at once with `InvalidInputError` naming the
  process that has it. The lock is an ``flock`` on the file, so the kernel
  drops it when its process dies: a lock file left by a killed run is taken
  over, not obeyed. The file is removed when the block ends.

  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> with lock_dir(d):
  ...   with lock_dir(d):  # doctest: +ELLIPSIS
  ...     pass
  Traceback (most recent call last):
  ...
  keras_mpq.base.errors.InvalidInputError: Expected one keras-mpq run per output directory. ...
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  directory = ensure_dir(directory)
  path = directory / LOCK_NAME
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 100).decode("utf-8", "replace").strip() or "unknown"
      os.close(fd)
      raise InvalidInputError(
          f"Expected one keras-mpq run per output directory. Received: {str(directory)!r} "
          f"is in use by another run (process {holder}). Wait for it to finish or choose "
          "another --out.") from None
    # The previous holder may have removed the file between our open and flock:
    # then we locked an orphan inode, and must try again on the new file.
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    yield path
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)
    os.close(fd)


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
