"""Where shards live: a local folder or an http(s) URL prefix holding index.json and the tars."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from .errors import DataError
from .index import DatasetIndex, parse_index

RETRIES = 5           # attempts for a transient HTTP failure (reset, timeout, 5xx), backoff 0.5 s doubling
TIMEOUT_S = 30.0      # per connection attempt and per blocking read


def is_url(base: str) -> bool:
    return base.startswith(("http://", "https://"))


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_url(base) else str(Path(base) / name)


def _open_url(url: str) -> BinaryIO:
    delay = 0.5
    for attempt in range(RETRIES):
        try:
            return urllib.request.urlopen(url, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == RETRIES - 1:
                raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if attempt == RETRIES - 1:
                raise DataError(f"{url}: cannot connect ({getattr(exc, 'reason', exc)}) after {RETRIES} tries") from exc
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def open_shard(base: str, name: str) -> BinaryIO:
    """A readable binary stream of one file under `base`."""
    if is_url(base):
        return _open_url(_join(base, name))
    path = Path(base) / name
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open shard ({exc.strerror})") from exc


def read_index(base: str) -> DatasetIndex:
    """index.json of a local folder or URL prefix; one clear DataError if absent or malformed."""
    where = _join(base, "index.json")
    if not is_url(base) and not Path(base).is_dir():
        raise DataError(f"{base}: no such folder (expected a shard folder made by `python -m resnet_dist.shard`)")
    try:
        with open_shard(base, "index.json") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from exc
    except DataError:
        raise
    return parse_index(obj, where)


def check_shards(base: str, index: DatasetIndex, splits: list[str]) -> None:
    """Cheap up-front check of local shards: each exists with the size index.json gives.

    Hashing every byte would cost a full pass over the data; sizes catch missing and truncated files.
    """
    if is_url(base):
        return
    for split in splits:
        for shard in index.splits[split].shards:
            path = Path(base) / shard.file
            if not path.is_file():
                raise DataError(f"{path}: shard listed in index.json is missing")
            if path.stat().st_size != shard.bytes:
                raise DataError(f"{path}: {path.stat().st_size} bytes, index.json says {shard.bytes}")
