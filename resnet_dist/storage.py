"""Where shards live: one storage layer for every location a user can name.

Locations: a plain path or file:// (local), http(s):// (our own urllib client, below), and s3://, gs:// (gcs://),
az:// (abfs://), hf:// through fsspec and its backends (s3fs, gcsfs, adlfs, huggingface_hub's HfFileSystem),
installed as extras. Any other `scheme://` is a UsageError naming the supported ones: it is never taken for a
local folder name (`Path("s3://b/x")` is the folder `s3:/b/x`). `check_location` is what the CLIs call first.

Over HTTP every request goes through `_retrying`: transient failures (refused or reset connections,
bodies cut short, timeouts, 5xx, 408/429) are retried with capped exponential backoff and jitter;
anything else, or running out of tries, is one DataError line naming the URL, the cause and the tries.
The settings are environment variables read at call time, so DataLoader worker processes (which
inherit the environment, not this module's state) see the same values as the main process.
docs/storage.md is the user-facing description; the fsspec side is in remote.py.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from resnet_dist.errors import DataError, UsageError
from resnet_dist.filesafe import fsync_dir
from resnet_dist.index import DatasetIndex, ShardInfo, parse_index, shards_at
from resnet_dist.locations import check_location, local_path, scheme_of

ENV_RETRIES = "RESNET_DIST_HTTP_RETRIES"  # total tries per request, including the first
ENV_TIMEOUT = "RESNET_DIST_HTTP_TIMEOUT"  # seconds for the connect and for each blocking read
ENV_BACKOFF = "RESNET_DIST_HTTP_BACKOFF"  # first delay between tries; doubles each retry
DEFAULT_RETRIES = 6
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_BACKOFF_S = 0.5
BACKOFF_CAP_S = 30.0  # no single wait is longer, whatever the doubling or a Retry-After header says
CHECK_THREADS = 8  # concurrent HEAD requests in check_shards: hundreds of shards in seconds

# Statuses worth another try: the server or something in front of it is overloaded or restarting.
# 501 Not Implemented and 505 HTTP Version Not Supported are 5xx but say the request itself will never
# work (and 501 is how some servers refuse HEAD, which check_shards answers with a ranged GET).
_TRANSIENT_4XX = {408, 425, 429}
_PERMANENT_5XX = {501, 505}

_T = TypeVar("_T")


def is_url(base: str) -> bool:
    """An http(s) URL: served by this module's own retrying urllib client."""
    return base.startswith(("http://", "https://"))


def is_remote(base: str) -> bool:
    """Anything not on this machine's file system (http(s) and every fsspec scheme)."""
    return scheme_of(base) not in (None, "file")


def _join(base: str, name: str) -> str:
    if is_url(base):
        return f"{base.rstrip('/')}/{urllib.parse.quote(name)}"
    if scheme_of(base) in (None, "file"):
        return str(Path(local_path(base)) / name)
    return f"{base.rstrip('/')}/{name}"


# --- settings -------------------------------------------------------------------------------------


def _env_number(name: str, default: float, kind: type, minimum: float, strict: bool) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        what = "an integer" if kind is int else "a number"
        raise UsageError(f"{name} must be {what} {bound}, got {raw!r}")
    return value


def http_settings() -> tuple[int, float, float]:
    """(tries, timeout seconds, first backoff seconds) from the environment, validated."""
    tries = int(_env_number(ENV_RETRIES, DEFAULT_RETRIES, int, 1, strict=False))
    timeout = _env_number(ENV_TIMEOUT, DEFAULT_TIMEOUT_S, float, 0, strict=True)
    backoff = _env_number(ENV_BACKOFF, DEFAULT_BACKOFF_S, float, 0, strict=False)
    return tries, timeout, backoff


# --- the retrying HTTP core -----------------------------------------------------------------------


class HTTPStatusError(DataError):
    """A response status that retrying will not change (404, 403, other 4xx, 501), or one that did not
    clear in time. A DataError, so every caller that reports data errors reports this one; `status`
    lets check_shards tell a missing shard (404) and a refused HEAD (405/501) from the rest."""

    def __init__(self, message: str, url: str, status: int):
        super().__init__(message)
        self.url = url
        self.status = status


class _ShortBody(Exception):
    """Fewer bytes than Content-Length, without http.client noticing (it cannot when reading in parts)."""


def _plural(n: int) -> str:
    return f"{n} try" if n == 1 else f"{n} tries"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _cause(exc: BaseException, timeout: float) -> str:
    """A short human reason for a failed try; the exception's own class names mean little to a user."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        inner = exc.reason
        if isinstance(inner, BaseException):
            return _cause(inner, timeout)
        return _one_line(f"cannot connect ({inner})")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"timed out (no data for {timeout:g} s)"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "server closed the connection without a response"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, http.client.IncompleteRead):
        got = len(exc.partial)
        return f"body cut short ({got} of {got + exc.expected} bytes)" if exc.expected else "body cut short"
    if isinstance(exc, _ShortBody):
        return f"body cut short ({exc})"
    if isinstance(exc, socket.gaierror):
        return _one_line(f"cannot resolve host ({exc.strerror or exc})")
    return _one_line(f"{type(exc).__name__}: {exc}")


def _permanent_oserror(exc: BaseException) -> bool:
    # A certificate that does not verify stays that way; retrying only delays the message.
    inner = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(inner, ssl.SSLCertVerificationError)


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    """Seconds from a numeric Retry-After header (429/503 often carry one); dates are ignored."""
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _retrying(url: str, attempt: Callable[[float], _T]) -> _T:
    """attempt(timeout) until it returns, a permanent failure, or the tries run out."""
    tries, timeout, first_delay = http_settings()
    cause = "no attempt made"
    for n in range(1, tries + 1):
        wait_at_least = 0.0
        try:
            return attempt(timeout)
        except urllib.error.HTTPError as exc:
            exc.close()  # the error carries the open response; free its socket now, not at GC
            cause = _one_line(f"HTTP {exc.code} {exc.reason}")
            transient = exc.code in _TRANSIENT_4XX or (exc.code >= 500 and exc.code not in _PERMANENT_5XX)
            if not transient:
                raise HTTPStatusError(f"{url}: {cause} (after {_plural(n)})", url, exc.code) from None
            if n == tries:
                raise HTTPStatusError(f"{url}: {cause} (gave up after {_plural(n)})", url, exc.code) from None
            wait_at_least = _retry_after(exc) or 0.0
        except (OSError, http.client.HTTPException, _ShortBody) as exc:
            # OSError covers URLError (refused, DNS, connect timeout), resets and read timeouts;
            # HTTPException covers IncompleteRead and garbled status lines.
            cause = _cause(exc, timeout)
            if _permanent_oserror(exc):
                raise DataError(f"{url}: {cause} (after {_plural(n)})") from None
            if n == tries:
                break
        # Exponential backoff, capped; "equal jitter" (half fixed, half random) so processes that
        # failed together (every rank and worker hitting one restarting server) do not retry together.
        delay = min(BACKOFF_CAP_S, first_delay * 2 ** (n - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)
        time.sleep(min(BACKOFF_CAP_S, max(delay, wait_at_least)))
    raise DataError(f"{url}: {cause} (gave up after {_plural(tries)})")


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, method=method, headers={"User-Agent": "resnet-dist", **(headers or {})})


def _get_whole(url: str, timeout: float) -> bytes:
    """One GET of the full body; a body shorter than its Content-Length is a failed try, not data."""
    with urllib.request.urlopen(_request(url), timeout=timeout) as resp:
        data = resp.read()  # raises IncompleteRead itself when Content-Length is known and not met
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and len(data) != int(length):
            raise _ShortBody(f"{len(data)} of {length} bytes")
        return data


def fetch(url: str) -> bytes:
    """The body of `url`, retried on transient failures; DataError (HTTPStatusError for a status) if not."""
    return _retrying(url, lambda timeout: _get_whole(url, timeout))


# --- public API -----------------------------------------------------------------------------------


def _kind(base: str) -> str:
    """ "local", "http" or "fsspec" for a location `check_location` accepts; its UsageError otherwise."""
    check_location(base)
    scheme = scheme_of(base)
    if scheme in (None, "file"):
        return "local"
    return "http" if scheme in ("http", "https") else "fsspec"


def read_bytes(base: str, name: str) -> bytes:
    """The whole file `name` under `base` (a folder, an http(s) URL prefix or an fsspec URL)."""
    kind = _kind(base)
    if kind == "http":
        return fetch(_join(base, name))
    if kind == "fsspec":
        from resnet_dist import remote

        return remote.read(base, name)
    path = Path(local_path(base)) / name
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_index(base: str) -> DatasetIndex:
    """index.json of a local folder or URL prefix; one clear DataError if absent or malformed."""
    where = _join(base, "index.json")
    if _kind(base) == "local":
        if not Path(local_path(base)).is_dir():
            raise DataError(f"{base}: no such folder (expected a shard folder made by `python -m resnet_dist.shard`)")
        if not Path(where).is_file():
            raise DataError(f"{where}: not found (expected a shard folder made by `python -m resnet_dist.shard`)")
    raw = read_bytes(base, "index.json")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not valid JSON ({_one_line(exc)})") from None
    return parse_index(obj, where)


def list_files(base: str) -> list[str]:
    """Names of the files directly under `base`, sorted; [] if it does not exist."""
    kind = _kind(base)
    if kind == "http":
        hint = f"{base.rstrip('/')}/x-{{0000..0009}}.tar"
        raise UsageError(f"{base}: an http(s) URL cannot be listed: give a brace pattern like {hint}")
    if kind == "fsspec":
        from resnet_dist import remote

        return remote.list_files(base)
    folder = Path(local_path(base))
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def exists(base: str, name: str) -> bool:
    """Whether file `name` exists under `base`."""
    kind = _kind(base)
    if kind == "http":
        try:
            remote_size(_join(base, name))
        except HTTPStatusError as exc:
            if exc.status in (404, 410):
                return False
            raise
        return True
    if kind == "fsspec":
        from resnet_dist import remote

        return remote.exists(base, name)
    return (Path(local_path(base)) / name).is_file()


def write_file(base: str, name: str, local_file: str | Path) -> None:
    """Copy `local_file` to `name` under `base`, whole or not at all: a local temporary file, fsynced and
    renamed; a remote object store's single put. DataError (one line) if the store refuses."""
    kind = _kind(base)
    if kind == "http":
        raise UsageError(f"{base}: cannot write to an http(s) URL (write to a folder or an object store)")
    if kind == "fsspec":
        from resnet_dist import remote

        return remote.put(base, name, str(local_file))
    dest = Path(local_path(base)) / name
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(local_file, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    fsync_dir(dest.parent, best_effort=True)


def remove_file(base: str, name: str) -> None:
    """Delete `name` under `base` if it is there."""
    kind = _kind(base)
    if kind == "http":
        raise UsageError(f"{base}: cannot delete from an http(s) URL")
    if kind == "fsspec":
        from resnet_dist import remote

        if remote.exists(base, name):
            remote.remove(base, name)
        return
    (Path(local_path(base)) / name).unlink(missing_ok=True)


def _content_range_total(value: str | None) -> int | None:
    # "bytes 0-0/12345" -> 12345; "bytes 0-0/*" (size unknown) -> None
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _remote_size_once(url: str, timeout: float, use_head: bool) -> int | None:
    """Size of `url` from one HEAD, or one GET of its first byte; None if the server does not say."""
    if use_head:
        with urllib.request.urlopen(_request(url, "HEAD"), timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
    with urllib.request.urlopen(_request(url, headers={"Range": "bytes=0-0"}), timeout=timeout) as resp:
        if resp.status == 206:
            return _content_range_total(resp.headers.get("Content-Range"))
        # The server ignored Range and started sending the whole file: its length is the size, and
        # leaving the `with` closes the connection without reading the body.
        length = resp.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None


def remote_size(url: str) -> int | None:
    """Size of a remote file by HEAD (retried), or a 1-byte ranged GET if HEAD is refused (405/501)."""
    try:
        return _retrying(url, lambda timeout: _remote_size_once(url, timeout, use_head=True))
    except HTTPStatusError as exc:
        if exc.status not in (405, 501):
            raise
    return _retrying(url, lambda timeout: _remote_size_once(url, timeout, use_head=False))


def _check_remote_shard(base: str, shard: ShardInfo) -> str | None:
    url = _join(base, shard.file)
    try:
        size = remote_size(url)
    except HTTPStatusError as exc:
        if exc.status in (404, 410):
            return f"{url}: shard listed in index.json is missing (HTTP {exc.status})"
        return str(exc)
    except DataError as exc:
        return str(exc)
    # A server that names no size cannot be checked here; the streaming size and sha256 check still is.
    if size is not None and size != shard.bytes:
        return f"{url}: {size} bytes, index.json says {shard.bytes}"
    return None


def _check_fsspec(base: str, shards: list[ShardInfo]) -> list[str]:
    from resnet_dist import remote

    sizes = remote.sizes(base, [s.file for s in shards])
    problems = []
    for shard in shards:
        url, size = _join(base, shard.file), sizes[shard.file]
        if size is None:
            problems.append(f"{url}: shard listed in index.json is missing")
        elif size != shard.bytes:
            problems.append(f"{url}: {size} bytes, index.json says {shard.bytes}")
    return problems


def check_shards(base: str, index: DatasetIndex, splits: list[str]) -> None:
    """Cheap up-front check that each shard exists with the size index.json gives.

    Hashing every byte would cost a full pass over the data; sizes catch missing and truncated files.
    Over HTTP that is one HEAD per shard, CHECK_THREADS at a time; on an object store one listing per
    folder of shards. `base` is where index.json is; the tars are at `shards_at(base, index)`.
    """
    base = shards_at(base, index)
    shards = [shard for split in splits for shard in index.splits[split].shards]
    kind = _kind(base)
    if kind != "local":
        if kind == "http":
            with ThreadPoolExecutor(max_workers=min(CHECK_THREADS, len(shards)) or 1) as pool:
                problems = [p for p in pool.map(lambda s: _check_remote_shard(base, s), shards) if p]
        else:
            problems = _check_fsspec(base, shards)
        if problems:
            # In index order, so the message is the same on every rank and every run; one line.
            more = f" (and {len(problems) - 1} more shards with problems)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)
        return
    for shard in shards:
        path = Path(local_path(base)) / shard.file
        if not path.is_file():
            raise DataError(f"{path}: shard listed in index.json is missing")
        if path.stat().st_size != shard.bytes:
            raise DataError(f"{path}: {path.stat().st_size} bytes, index.json says {shard.bytes}")
