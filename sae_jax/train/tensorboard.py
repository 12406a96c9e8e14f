"""A minimal TensorBoard event-file writer for scalars (no TensorFlow or PyTorch needed).

Event files are TFRecords of ``Event`` protocol buffers; the few fields written here are
encoded by hand: Event{wall_time=1, step=2, file_version=3, summary=5},
Summary{value=1}, Summary.Value{tag=1, simple_value=2}.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from sae_jax import paths


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
  out = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint(2 << 3) + _varint(step)
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) +
                     struct.pack("<f", float(value)))
        for tag, value in scalars.items())
    out += _field_bytes(5, summary)
  return out


class EventWriter:
  """Appends scalar summaries to a new event file under ``logdir``."""

  def __init__(self, logdir: str | os.PathLike):
    logdir = paths.as_path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    self._f = paths.AppendFile(logdir / name, binary=True)
    self._write(_event(0, file_version="brain.Event:2"))

  def _write(self, record: bytes) -> None:
    header = struct.pack("<Q", len(record))
    self._f.write(header + struct.pack("<I", _masked(crc32c(header))) + record +
                  struct.pack("<I", _masked(crc32c(record))))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._write(_event(step, scalars=values))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()
