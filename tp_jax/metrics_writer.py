"""TensorBoard event files (no TensorFlow needed), and a one-line progress bar with ETA.

``EventWriter`` writes scalars for ``tensorboard --logdir=<workdir>`` with the
``tensorboard`` package's own ``Event`` protos and TFRecord ``RecordWriter`` (length,
CRC-32C, payload, CRC-32C); the package reads without TensorFlow and is what shows them.

A resumed run opens a new event file whose first event is ``SessionLog(START)`` at the
resume step + 1: TensorBoard then drops the events a killed run had written past its
last checkpoint, so the curves show each step once. That rule only drops events read
before the ``SessionLog``, and TensorBoard reads a directory's files in name order, so
the names carry a fixed-width microsecond timestamp. (tensorboard's ``EventFileWriter``
names files by whole seconds and an unpadded per-process counter, so two files opened in
one second could be read out of order: ``...10`` sorts before ``...9``.)
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

# --------------------------------------------------------------------------------------
# Event files


class EventWriter:
  """Appends scalar events to ``<logdir>/events.out.tfevents.<time>.<host>.<pid>``.

  Args:
    logdir: where the file goes (created if needed).
    start_step: > 0 for a resumed run: a SessionLog(START) at ``start_step + 1`` tells
      TensorBoard to discard older files' events from that step on.
  """

  def __init__(self, logdir: str | os.PathLike, start_step: int = 0):
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    name = f'events.out.tfevents.{time.time_ns() // 1000:016d}.{socket.gethostname()}.{os.getpid()}'
    self.path = logdir / name
    self._records = RecordWriter(open(self.path, 'ab'))
    self._write(event_pb2.Event(file_version='brain.Event:2'))
    if start_step:
      self._write(
          event_pb2.Event(
              step=start_step + 1,
              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
          )
      )
    self.flush()

  def _write(self, event: event_pb2.Event) -> None:
    if self._records.closed:
      raise ValueError(f'{self.path} is closed')
    event.wall_time = time.time()
    self._records.write(event.SerializeToString())

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event holding every value of ``values`` at ``step``."""
    if values:
      summary = summary_pb2.Summary(
          value=[
              summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()
          ]
      )
      self._write(event_pb2.Event(step=step, summary=summary))

  def flush(self) -> None:
    if not self._records.closed:
      self._records.flush()

  def close(self) -> None:
    if not self._records.closed:
      self._records.close()

  def __enter__(self) -> 'EventWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------------------------
# Progress


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  s = int(round(seconds))
  h, s = divmod(s, 3600)
  m, s = divmod(s, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m:d}:{s:02d}'


def progress_line(
    epoch: int,
    num_epochs: int,
    done: int,
    total: int,
    elapsed_s: float,
    run_steps_left: int | None = None,
    loss: float | None = None,
    width: int = 24,
) -> str:
  """``epoch 2/10 [######------]  96/234  3.1 ms/step  ETA 0:00:43  run ETA 0:05:10``.

  The ETA extrapolates this epoch's time per step so far (elapsed_s over done steps).
  """
  frac = done / total if total else 1.0
  filled = int(round(width * frac))
  per_step = elapsed_s / done if done else math.nan
  parts = [
      f'epoch {epoch}/{num_epochs} [{"#" * filled}{"-" * (width - filled)}] ' f'{done}/{total}'
  ]
  if done:
    parts.append(f'{1e3 * per_step:.1f} ms/step')
  parts.append(f'ETA {format_duration((total - done) * per_step)}')
  if run_steps_left is not None:
    parts.append(f'run ETA {format_duration(run_steps_left * per_step)}')
  if loss is not None:
    parts.append(f'loss {loss:.4f}')
  return '  '.join(parts)


class Progress:
  """A ``\\r``-rewritten line on a terminal (or Jupyter) stream; silent when disabled."""

  def __init__(self, enabled: bool | None = None, stream: IO[str] | None = None):
    self.stream = stream if stream is not None else sys.stderr
    if enabled is None:
      enabled = bool(getattr(self.stream, 'isatty', lambda: False)()) or 'ipykernel' in sys.modules
    self.enabled = enabled
    self._width = 0

  def update(self, line: str) -> None:
    if not self.enabled:
      return
    pad = max(self._width - len(line), 0)
    self.stream.write('\r' + line + ' ' * pad)
    self.stream.flush()
    self._width = len(line)

  def clear(self) -> None:
    """Erases the line, so that the next log line starts clean."""
    if self.enabled and self._width:
      self.stream.write('\r' + ' ' * self._width + '\r')
      self.stream.flush()
      self._width = 0
