"""Object stores and hubs through fsspec: s3:// (s3fs), gs:// (gcsfs), az:// (adlfs), hf:// (huggingface_hub).

storage.py calls in here for every fsspec location; nothing else should. Credentials are the backend's own
business (environment, ~/.aws, application default credentials, the HF token): nothing here reads, passes
or prints them, so they cannot reach config.json, a log or W&B.

Retries. We configure the backend's own machinery rather than wrapping a loop around it:
- s3://: botocore's "standard" retry mode with total_max_attempts = RESNET_DIST_HTTP_RETRIES (all tries, as
  for http) and connect/read timeouts = RESNET_DIST_HTTP_TIMEOUT. botocore retries what a store answers while
  it is busy or restarting: 5xx (503 SlowDown included), 429 and the other throttling codes, connections
  refused or reset, timeouts, with capped exponential backoff and jitter.
  s3fs runs its own loop (`S3FileSystem.retries`, 5 tries) around every botocore call, retrying SlowDown and
  connection errors again: a persistent 503 would cost 5 x N requests (measured: 2 x 4 with retries=2 and
  4 botocore tries). We set it to 1, so N tries are exactly N requests (measured).
- A body cut short is the one transient fault botocore cannot retry: it has returned the response before
  the body is read. aiohttp notices (ClientPayloadError "Not enough data to satisfy content length") and
  `_call` re-requests the object, up to the same number of tries with the same backoff as http.
- gs://, az://, hf://: their clients' own retry policies, unchanged and not tested here: gcsfs retries
  5xx and 429 (6 tries, gcsfs/retry.py); adlfs leaves it to the azure-storage-blob client's default policy;
  HfFileSystem retries 408/429/5xx where it goes through huggingface_hub's http_backoff. Only a body cut
  short is retried here, as for s3.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from resnet_dist.errors import DataError, UsageError
from resnet_dist.locations import FSSPEC_SCHEMES, backend_missing, scheme_of
from resnet_dist.storage import BACKOFF_CAP_S, CHECK_THREADS, http_settings

# The variables a backend reads its endpoint, region and credentials from: part of the cache key, so a
# process whose environment changes (a test; a notebook) gets a client that sees the change.
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCE_", "AZURE_", "HF_", "HUGGING_FACE_")
# Exception class names (anywhere in the MRO) that mean "the body stopped before its Content-Length".
_SHORT_BODY = {"ClientPayloadError", "ContentLengthError", "IncompleteRead", "IncompleteReadError"}
_SHORT_BODY |= {"ResponseStreamingError"}

# botocore's "found no credentials at all" (no key in the environment, no ~/.aws, no role): not retried.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}

_clients: dict[tuple, object] = {}


def _options(scheme: str) -> dict:
    if scheme != "s3":
        return {}
    tries, timeout, _ = http_settings()
    # total_max_attempts counts the first try too (botocore's max_attempts would count only the retries).
    config = {"retries": {"total_max_attempts": tries, "mode": "standard"}}
    config |= {"connect_timeout": timeout, "read_timeout": timeout}
    # max_concurrency=1: read an object with one GET; above it s3fs first HEADs for the size, then splits
    # the read into ranged GETs, doubling the requests for a shard-sized object.
    return {"config_kwargs": config, "max_concurrency": 1}


def filesystem(base: str):
    """(fsspec filesystem, path of `base` inside it), one client per process, scheme and environment."""
    scheme = scheme_of(base)
    missing = backend_missing(scheme)
    if missing:
        raise UsageError(f"{base}: {missing}")
    import fsspec

    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
    # The pid: a forked DataLoader worker must not share its parent's event loop or connections.
    key = (os.getpid(), scheme, http_settings(), env)
    fs = _clients.get(key)
    if fs is None:
        protocol = FSSPEC_SCHEMES[scheme][0]
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **_options(scheme))
        if scheme == "s3":
            fs.retries = 1  # botocore retries; see the module docstring
        _clients[key] = fs
    return fs, base.split("://", 1)[1].rstrip("/")


def _short_body(exc: BaseException) -> bool:
    return any(cls.__name__ in _SHORT_BODY for cls in type(exc).__mro__)


def _cause(exc: BaseException) -> str:
    if _short_body(exc):
        return "body cut short"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _error(url: str, exc: BaseException, tries: int) -> DataError:
    cause = _cause(exc)
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{url}: not found ({cause})")
    if any(cls.__name__ in _NO_CREDENTIALS for cls in type(exc).__mro__):
        return DataError(f"{url}: no credentials ({cause}): give them as docs/storage.md says for {scheme_of(url)}://")
    if isinstance(exc, PermissionError):
        return DataError(f"{url}: access denied ({cause}): check the credentials for {scheme_of(url)}://")
    # Anything else reached us after the backend's own retries (max_attempts for s3) ran out.
    return DataError(f"{url}: {cause} (gave up after {tries} tries)")


def _call(url: str, action):
    """action() with a body cut short retried (capped exponential backoff, equal jitter); DataError if not."""
    tries, _, first_delay = http_settings()
    for n in range(1, tries + 1):
        try:
            return action()
        except (UsageError, DataError):
            raise
        except Exception as exc:  # noqa: BLE001 - each backend raises its own types; all become one line
            if not _short_body(exc) or n == tries:
                raise _error(url, exc, n if _short_body(exc) else tries) from None
        delay = min(BACKOFF_CAP_S, first_delay * 2 ** (n - 1))
        time.sleep(delay / 2 + random.uniform(0, delay / 2))
    raise AssertionError("unreachable")


def read(base: str, name: str) -> bytes:
    fs, root = filesystem(base)
    return _call(f"{base.rstrip('/')}/{name}", lambda: fs.cat_file(f"{root}/{name}"))


def _basename(entry: dict) -> str:
    return entry["name"].rstrip("/").rsplit("/", 1)[-1]


def sizes(base: str, names: list[str]) -> dict[str, int | None]:
    """name -> size in bytes (None: missing) for files under `base`: one listing per folder they sit in."""
    fs, root = filesystem(base)
    folders = sorted({str(PurePosixPath(n).parent) for n in names})

    def listing(folder: str) -> dict[str, int]:
        path = root if folder == "." else f"{root}/{folder}"
        url = f"{base.rstrip('/')}/{'' if folder == '.' else folder}"
        try:
            entries = _call(url, lambda: fs.ls(path, detail=True, refresh=True))
        except DataError as exc:
            if "not found" in str(exc):
                return {}
            raise
        prefix = "" if folder == "." else f"{folder}/"
        return {prefix + _basename(e): e.get("size") for e in entries if e["type"] == "file"}

    with ThreadPoolExecutor(max_workers=min(CHECK_THREADS, len(folders)) or 1) as pool:
        found = {k: v for part in pool.map(listing, folders) for k, v in part.items()}
    return {n: found.get(n) for n in names}


def list_files(base: str) -> list[str]:
    fs, root = filesystem(base)
    try:
        entries = _call(base, lambda: fs.ls(root, detail=True, refresh=True))
    except DataError as exc:
        if "not found" in str(exc):
            return []
        raise
    return sorted(_basename(e) for e in entries if e["type"] == "file")


def exists(base: str, name: str) -> bool:
    fs, root = filesystem(base)
    return bool(_call(f"{base.rstrip('/')}/{name}", lambda: fs.exists(f"{root}/{name}")))


def check_bucket(base: str) -> None:
    """DataError unless the bucket (container) of `base` exists: found before packing, not after it."""
    scheme = scheme_of(base)
    if scheme == "hf":
        return  # a Hub repository is created on the Hub; writing into a missing one fails at the first upload
    fs, root = filesystem(base)
    bucket = root.split("/", 1)[0]
    if not _call(f"{scheme}://{bucket}", lambda: fs.exists(bucket)):
        raise DataError(f"{scheme}://{bucket}: no such bucket (or no permission to see it); create it first")


def put(base: str, name: str, local_path: str) -> None:
    """Upload one file. An object store shows an object whole or not at all (a multipart upload too,
    once completed), so no temporary name is needed."""
    fs, root = filesystem(base)
    _call(f"{base.rstrip('/')}/{name}", lambda: fs.put_file(local_path, f"{root}/{name}"))


def remove(base: str, name: str) -> None:
    fs, root = filesystem(base)
    _call(f"{base.rstrip('/')}/{name}", lambda: fs.rm_file(f"{root}/{name}"))
