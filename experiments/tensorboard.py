"""TensorBoard event files for training metrics, written without TensorFlow or another dependency.

`write_scalars(directory, record)` appends one event per numeric field of a metrics record
(`train/loss`, `eval/loss`, `train/lr`, ...) at `record["step"]` to this process's event file in
`directory` (`events.out.tfevents.<time>.<host>.<pid>.idjax`), so `tensorboard --logdir WORKDIR/tensorboard`
shows the curves of `metrics.jsonl`. A resumed run starts a new event file; TensorBoard merges them. The
directory may be local or any `etils.epath` URI (gs://...): records are appended with `files.append_bytes`.

Format: TFRecord framing (little-endian length, masked CRC-32C of the length, the payload, masked
CRC-32C of the payload) around `tensorflow.Event` protocol buffers: wall_time = 1 (double),
step = 2 (int64), file_version = 3 (string), summary = 5 (Summary: value = 1 (Value: tag = 1
(string), simple_value = 2 (float)))).
"""

from __future__ import annotations

import os
import socket
import struct
import time

from etils import epath

from experiments.files import absolute, append_bytes

_CRC_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ 0x82F63B78 if _crc & 1 else _crc >> 1  # CRC-32C (Castagnoli), reflected
    _CRC_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 is encoded as its two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def event_bytes(wall_time: float, step: int, *, scalars: dict[str, float] | None = None,
                file_version: str | None = None) -> bytes:
    """One serialized Event."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                          for tag, value in scalars.items())
        out += _field(5, 2, values)
    return out


def record_bytes(payload: bytes) -> bytes:
    """TFRecord framing of one payload."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


_FILES: dict[str, epath.Path] = {}  # absolute directory -> this process's event file there


def event_file(directory: epath.PathLike) -> epath.Path:
    """This process's event file in `directory` (created with its file_version header on first use)."""
    directory = absolute(directory)
    if str(directory) not in _FILES:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.idjax"
        append_bytes(path, record_bytes(event_bytes(time.time(), 0, file_version="brain.Event:2")))
        _FILES[str(directory)] = path
    return _FILES[str(directory)]


def write_scalars(directory: epath.PathLike, record: dict) -> None:
    """Appends the numeric fields of a metrics record (kind, step, ...) as `<kind>/<field>` scalars."""
    scalars = {f"{record.get('kind', 'metrics')}/{key}": float(value) for key, value in sorted(record.items())
               if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}
    if not scalars:
        return
    append_bytes(event_file(directory), record_bytes(event_bytes(time.time(), int(record["step"]), scalars=scalars)))
