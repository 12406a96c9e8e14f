"""What a person reads while a trace runs, and the same in a log file.

A ``log_fn`` is any ``str -> None`` callable. Two richer ones:

* :class:`Console` (stdout): permanent lines, and one *live* progress line per running fit:
  on a terminal it is rewritten in place; otherwise a plain line at most every
  ``plain_every_s`` seconds (60: a log collector gets a steady trickle, not one line per step).
* :class:`Tee`: forwards to another log_fn and appends every line, progress lines included, to
  a file (local or in a bucket, see :class:`sae_jax.paths.AppendFile`).

Code that reports progress calls ``live(log_fn)(text)``: the live channel where there is one,
else the plain log_fn.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from sae_jax import paths

LogFn = Callable[[str], None]


def live(log_fn: LogFn) -> LogFn:
  """The progress channel of ``log_fn`` (itself when it has none)."""
  return getattr(log_fn, "live", log_fn)


def last(log_fn: LogFn) -> LogFn:
  """The channel of a fit's last progress: live, but never dropped by the throttle."""
  return getattr(log_fn, "last", live(log_fn))


class Console:
  """stdout with one rewritable progress line on a TTY, throttled plain lines elsewhere."""

  def __init__(self, stream=None, tty: bool | None = None, plain_every_s: float = 60.0):
    self.stream = stream or sys.stdout
    self.tty = self.stream.isatty() if tty is None else tty
    self.plain_every_s = plain_every_s
    self._live_shown = False
    self._last_plain = float("-inf")

  def __call__(self, text: str) -> None:
    """A permanent line (clears the progress line first)."""
    self._clear()
    self.stream.write(text + "\n")
    self.stream.flush()
    self._last_plain = float("-inf")  # the next progress after news is shown at once

  def last(self, text: str) -> None:
    """A fit's final progress: in place on a TTY, else always a line."""
    self._last_plain = float("-inf")
    self.live(text)

  def live(self, text: str) -> None:
    """The current progress: rewritten in place on a TTY, else a line now and then."""
    if self.tty:
      width = 160
      self.stream.write("\r\x1b[K" + text[:width])
      self.stream.flush()
      self._live_shown = True
      return
    now = time.monotonic()
    if now - self._last_plain >= self.plain_every_s:
      self._last_plain = now
      self.stream.write(text + "\n")
      self.stream.flush()

  def _clear(self) -> None:
    if self._live_shown:
      self.stream.write("\r\x1b[K")
      self._live_shown = False


class Tee:
  """Forward to ``log_fn`` and append each line (progress lines too) to ``path``."""

  def __init__(self, log_fn: LogFn, path):
    self.log_fn = log_fn
    self._file = paths.AppendFile(path)
    self._pending = 0

  def __call__(self, text: str) -> None:
    self.log_fn(text)
    self._write(text, flush=True)

  def live(self, text: str) -> None:
    live(self.log_fn)(text)
    self._write(text, flush=False)

  def last(self, text: str) -> None:
    last(self.log_fn)(text)
    self._write(text, flush=False)

  def _write(self, text: str, flush: bool) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    self._file.write(f"{stamp} {text}\n")
    self._pending += 1
    # A bucket's log is rewritten whole on flush: with news, or every 50 progress lines.
    if flush or self._pending >= 50:
      self._file.flush()
      self._pending = 0

  def close(self) -> None:
    self._file.close()
