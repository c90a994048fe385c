"""Progress bars: the one place that decides whether to show them, and how.

Every stage that can take more than a few seconds (synthesis, sensitivity,
weight optimization, tuning, the pipeline's stages) reports through `Bar`,
a thin tqdm bar that is silent when progress is off. Off by default when
stderr is not a terminal, so logs and CI stay clean.

>>> bar = Bar(total=3, desc="demo", enabled=False)
>>> bar.update(2); bar.to(3); bar.finished
3
>>> bar.close()
"""

from __future__ import annotations

import sys
from typing import Optional


def show_progress(progress: Optional[bool]) -> bool:
  """``progress`` as given, or (None) whether stderr is a terminal."""
  if progress is None:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())
  return bool(progress)


class Bar:
  """A tqdm bar counting ``total`` units of work; does nothing when not ``enabled``.

  Plug-ins (`keras_mpq.register_generator`) get one: ``update(n)``,
  ``to(count)`` (advance to a count of finished units), ``postfix(text)``.
  """

  def __init__(self, total: int, desc: str, enabled: Optional[bool], unit: str = "it"):
    self.finished = 0
    self._bar = None
    if show_progress(enabled) and total > 0:
      from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
      self._bar = tqdm_auto.tqdm(total=total, desc=desc, unit=unit, leave=False)

  def update(self, n: int = 1) -> None:
    self.finished += n
    if self._bar is not None:
      self._bar.update(n)

  def to(self, finished: int) -> None:
    """Advances the bar to ``finished`` units (never backwards)."""
    if finished > self.finished:
      self.update(finished - self.finished)

  def postfix(self, text: str) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> "Bar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class StageBar:
  """One line per finished pipeline stage and its seconds (stages with their own
  bars, synthesis and sensitivity, show those inside), when progress is shown."""

  STAGES = ("load", "synthesis", "sensitivity+allocation", "apply")

  def __init__(self, progress: Optional[bool]):
    self.bar = None
    if show_progress(progress):
      from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
      self.bar = tqdm_auto.tqdm(total=len(self.STAGES), desc="keras_mpq: load", leave=False,
                                bar_format="{desc} [{n_fmt}/{total_fmt} stages, {elapsed}]")

  def done(self, stage: str, seconds: float) -> None:
    if self.bar is None:
      return
    index = self.STAGES.index(stage) if stage in self.STAGES else len(self.STAGES) - 1
    following = self.STAGES[index + 1] if index + 1 < len(self.STAGES) else "report"
    self.bar.write(f"keras_mpq: {stage} took {seconds:.1f}s")
    self.bar.set_description_str(f"keras_mpq: {following}")
    self.bar.update(1)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
