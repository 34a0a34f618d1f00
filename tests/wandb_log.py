"""A short reader of W&B's offline run file (`run-ID.wandb`), for tests.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
records, each with a 7-byte header (crc32, length, type) and possibly split across blocks
(FULL=1, FIRST=2, MIDDLE=3, LAST=4). Every record is a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7


def raw_records(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        space = BLOCK - pos % BLOCK
        if space < HEADER:  # the writer pads a block tail too short for a record header
            pos += space
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding at the end of a block or file
            pos += space
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def records(path: Path):
    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def _items(items) -> dict:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


def history(path: Path) -> list[dict]:
    """The rows logged with wandb.log (accelerator.log), values JSON-decoded."""
    return [_items(r.history.item) for r in records(path) if r.WhichOneof("record_type") == "history"]


def _merged(path: Path, kind: str) -> dict:
    """A summary or config as its successive update records leave it."""
    merged: dict = {}
    for record in records(path):
        if record.WhichOneof("record_type") == kind:
            merged.update(_items(getattr(record, kind).update))
    return merged


def summary(path: Path) -> dict:
    return _merged(path, "summary")


def config(path: Path) -> dict:
    return _merged(path, "config")


def run_file(run_dir: Path) -> Path:
    found = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if not found:
        raise FileNotFoundError(f"no offline W&B run file under {run_dir}/wandb")
    return found[-1]
