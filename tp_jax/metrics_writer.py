"""TensorBoard event files without TensorFlow, and a one-line progress bar with ETA.

``EventWriter`` writes the TFRecord-framed ``Event`` protocol buffers that TensorBoard
reads (``tensorboard --logdir=<workdir>``): scalars as ``Summary.Value.simple_value``,
so no dependency beyond the standard library. The protocol is small enough to encode by
hand:

  record   = uint64 len | uint32 masked_crc32c(len) | data | uint32 masked_crc32c(data)
  Event    = wall_time (1, double) | step (2, int64) | file_version (3, string)
             | summary (5, Summary) | session_log (7, SessionLog)
  Summary  = repeated value (1, Value);  Value = tag (1, string) | simple_value (2, float)

A resumed run opens a new event file whose first event is ``SessionLog(START)`` at the
resume step + 1: TensorBoard then drops the events a killed run had written past its
last checkpoint, so the curves show each step once. ``read_scalars`` decodes these
files (CRCs checked) with the same rule, for tests and plots.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import IO, Iterator, Mapping

# --------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TFRecord frames use it


def _crc_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
  """One TFRecord record around ``data``."""
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data
          + struct.pack('<I', masked_crc32c(data)))


# --------------------------------------------------------------------------------------
# Protocol-buffer encoding of the few messages needed


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _key(field: int, wire: int) -> bytes:
  return _varint((field << 3) | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def _scalar_value(tag: str, value: float) -> bytes:
  return _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack('<f', value)


def encode_event(step: int, wall_time: float, *, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None, session_start: bool = False) -> bytes:
  out = _key(1, 1) + struct.pack('<d', wall_time) + _key(2, 0) + _varint(int(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b''.join(_bytes_field(1, _scalar_value(t, v)) for t, v in scalars.items())
    out += _bytes_field(5, summary)
  if session_start:
    out += _bytes_field(7, _key(1, 0) + _varint(1))  # SessionLog.status = START
  return out


# --------------------------------------------------------------------------------------
# Writer


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
    # TensorBoard reads a directory's event files in name order: a fixed-width
    # microsecond timestamp keeps that the order they were written in.
    name = f'events.out.tfevents.{time.time_ns() // 1000:016d}.{socket.gethostname()}.{os.getpid()}'
    self.path = logdir / name
    self._f: IO[bytes] | None = open(self.path, 'ab')
    self._write(encode_event(0, time.time(), file_version='brain.Event:2'))
    if start_step:
      self._write(encode_event(start_step + 1, time.time(), session_start=True))
    self.flush()

  def _write(self, event: bytes) -> None:
    if self._f is None:
      raise ValueError(f'{self.path} is closed')
    self._f.write(frame(event))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event holding every finite value of ``values`` at ``step``."""
    values = {k: float(v) for k, v in values.items()}
    if values:
      self._write(encode_event(step, time.time(), scalars=values))

  def flush(self) -> None:
    if self._f is not None:
      self._f.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None

  def __enter__(self) -> 'EventWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------------------------
# Reader (tests, plots)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  shift = n = 0
  while True:
    b = buf[i]
    i += 1
    n |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return n, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
  i = 0
  while i < len(buf):
    key, i = _read_varint(buf, i)
    field, wire = key >> 3, key & 7
    if wire == 0:
      v, i = _read_varint(buf, i)
    elif wire == 1:
      v, i = buf[i:i + 8], i + 8
    elif wire == 5:
      v, i = buf[i:i + 4], i + 4
    elif wire == 2:
      n, i = _read_varint(buf, i)
      v, i = buf[i:i + n], i + n
    else:
      raise ValueError(f'unsupported protobuf wire type {wire}')
    yield field, wire, v


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
  """The records of one TFRecord file; raises ValueError on a CRC mismatch. A record
  cut short at the end (a killed writer) ends the iteration, as TensorBoard does."""
  data = Path(path).read_bytes()
  i = 0
  while i + 12 <= len(data):
    header = data[i:i + 8]
    (n,) = struct.unpack('<Q', header)
    (crc,) = struct.unpack('<I', data[i + 8:i + 12])
    if crc != masked_crc32c(header):
      raise ValueError(f'{path}: bad length CRC at byte {i}')
    if i + 12 + n + 4 > len(data):
      return
    payload = data[i + 12:i + 12 + n]
    (crc,) = struct.unpack('<I', data[i + 12 + n:i + 16 + n])
    if crc != masked_crc32c(payload):
      raise ValueError(f'{path}: bad data CRC at byte {i}')
    yield payload
    i += 16 + n


def decode_event(payload: bytes) -> dict:
  event: dict = {'step': 0, 'scalars': {}, 'session_start': False}
  for field, _, v in _fields(payload):
    if field == 1:
      event['wall_time'] = struct.unpack('<d', v)[0]
    elif field == 2:
      event['step'] = v if v < 1 << 63 else v - (1 << 64)
    elif field == 3:
      event['file_version'] = v.decode()
    elif field == 5:
      for f, _, value in _fields(v):
        if f != 1:
          continue
        tag, x = None, math.nan
        for vf, _, vv in _fields(value):
          if vf == 1:
            tag = vv.decode()
          elif vf == 2:
            x = struct.unpack('<f', vv)[0]
        if tag is not None:
          event['scalars'][tag] = x
    elif field == 7:
      event['session_start'] = any(f == 1 and v == 1 for f, _, v in _fields(v))
  return event


def event_files(logdir: str | os.PathLike) -> list[Path]:
  """Event files in ``logdir`` in name order, the order TensorBoard reads them."""
  return sorted(Path(logdir).glob('events.out.tfevents.*'))


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] over all event files, with TensorBoard's purge rule:
  a SessionLog(START) at step s drops the values logged earlier at steps >= s."""
  series: dict[str, list[tuple[int, float]]] = {}
  for path in event_files(logdir):
    for payload in read_records(path):
      e = decode_event(payload)
      if e['session_start']:
        for tag in series:
          series[tag] = [(s, v) for s, v in series[tag] if s < e['step']]
      for tag, v in e['scalars'].items():
        series.setdefault(tag, []).append((e['step'], v))
  return series


# --------------------------------------------------------------------------------------
# Progress


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  s = int(round(seconds))
  h, s = divmod(s, 3600)
  m, s = divmod(s, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m:d}:{s:02d}'


def progress_line(epoch: int, num_epochs: int, done: int, total: int, elapsed_s: float,
                  run_steps_left: int | None = None, loss: float | None = None,
                  width: int = 24) -> str:
  """``epoch 2/10 [######------]  96/234  3.1 ms/step  ETA 0:00:43  run ETA 0:05:10``.

  The ETA extrapolates this epoch's time per step so far (elapsed_s over done steps).
  """
  frac = done / total if total else 1.0
  filled = int(round(width * frac))
  per_step = elapsed_s / done if done else math.nan
  parts = [f'epoch {epoch}/{num_epochs} [{"#" * filled}{"-" * (width - filled)}] '
           f'{done}/{total}']
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
      enabled = bool(getattr(self.stream, 'isatty', lambda: False)()) or \
          'ipykernel' in sys.modules
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

