"""A machine-local cache of remote shards: each shard is downloaded once per machine, not once per epoch,
rank and loader worker.

Entries are named by the shard's sha256 from index.json, so the same bytes are one file whatever URL
they came from, and a shard that changed upstream (a new sha256 in a new index) is a new entry.

    ROOT/shards-v1/SHA256.tar     a checked shard; its mtime is its last use (least-recently-used eviction)
    ROOT/shards-v1/SHA256.lock    its lock file: shared while read, exclusive while written or evicted
    ROOT/shards-v1/SHA256.tar.tmp.PID   a download in progress; one left by a crash is deleted on later use

Why not fsspec's own caches (`simplecache`, `filecache`, `blockcache`): they key entries by URL, not by
content; they keep no size limit (filecache only an expiry time); they take no lock across processes, so
every rank and loader worker missing at once downloads the same file; and they check no sha256. The
locks are fcntl.flock rather than the `filelock` package: readers need a shared lock and the evictor a
non-blocking exclusive one, and filelock's FileLock is exclusive only.

Settings travel inside the ShardCache object (it is pickled into every loader worker with the
ShardStream), and so do the counts, which each worker process keeps for itself and the loader carries
to the trainer with its batches.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from resnet_dist.errors import UsageError
from resnet_dist.index import ShardInfo
from resnet_dist.locations import local_path
from resnet_dist.storage import is_remote, read_bytes

ENV_CACHE = "RESNET_DIST_CACHE"  # the default cache folder, when --cache-dir is not given
LAYOUT = "shards-v1"  # a subfolder per entry layout: a future layout never misreads this one
GB = 1e9


def default_dir() -> str:
    return os.environ.get(ENV_CACHE, "").strip() or str(Path.home() / ".cache" / "resnet-dist")


@dataclass
class CacheCounts:
    """Shard reads of remote data: served from the cache, downloaded (cached or not), bytes downloaded."""

    hits: int = 0
    downloads: int = 0
    bytes_downloaded: int = 0

    def __add__(self, other: CacheCounts) -> CacheCounts:
        return CacheCounts(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def __sub__(self, other: CacheCounts) -> CacheCounts:
        return CacheCounts(*(a - b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[int, int, int]:
        return self.hits, self.downloads, self.bytes_downloaded

    def as_dict(self) -> dict:
        return {"hits": self.hits, "downloads": self.downloads, "bytes_downloaded": self.bytes_downloaded}


@dataclass
class ShardCache:
    """Where remote shards are kept (`root` None: --no-cache, every read downloads) and the byte limit
    (None: no limit), with this process's counts."""

    root: Path | None
    limit_bytes: int | None = None
    counts: CacheCounts = field(default_factory=CacheCounts)

    @property
    def folder(self) -> Path:
        return self.root / LAYOUT


def make_cache(base: str, enabled: bool, cache_dir: str, limit_gb: float) -> ShardCache | None:
    """The cache for shards under `base`: None for local data (read in place); checked to be writable."""
    if not is_remote(base):
        return None
    if not enabled:
        return ShardCache(None)
    root = Path(cache_dir or default_dir()).expanduser()
    try:
        (root / LAYOUT).mkdir(parents=True, exist_ok=True)
        probe = root / LAYOUT / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--cache-dir {root}: cannot write there ({exc.strerror or exc}); or use --no-cache") from None
    return ShardCache(root.resolve(), round(limit_gb * GB) if limit_gb else None)


def check_limit(limit_gb: float) -> None:
    if not (limit_gb >= 0 and math.isfinite(limit_gb)):
        raise UsageError(f"--cache-limit must be a number of GB >= 0, 0 for no limit (got {limit_gb})")


def cache_dir(cache: ShardCache | None) -> str | None:
    """The folder to report: None for local data and --no-cache."""
    return str(cache.root) if cache and cache.root else None


def cache_line(cache: dict) -> str:
    """One line for people: a summary's or eval.json's "cache" entry."""
    where = f"in {cache['dir']}" if cache["dir"] else "off (--no-cache)"
    return (
        f"shard cache {where}: {cache['hits']} hits, {cache['downloads']} downloads, "
        f"{cache['bytes_downloaded'] / 1e6:.1f} MB downloaded"
    )


# --- locking --------------------------------------------------------------------------------------


@contextmanager
def _locked(lock_path: Path, mode: int) -> Iterator[bool]:
    """Hold `lock_path` in `mode` (LOCK_SH/LOCK_EX, maybe | LOCK_NB); yields False if NB and it is held.

    The evictor deletes lock files; a process that waited on a deleted one would lock a file nobody else
    sees, so after locking, the path must still name the file we hold, else try again."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                yield False
                return
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return
        finally:
            os.close(fd)  # closing releases the lock


def _paths(cache: ShardCache, sha: str) -> tuple[Path, Path]:
    return cache.folder / f"{sha}.tar", cache.folder / f"{sha}.lock"


# --- reading through the cache --------------------------------------------------------------------


def fetch_shard(base: str, shard: ShardInfo, cache: ShardCache | None) -> bytes:
    """The bytes of `shard` under `base`: read in place (local data, no cache), or from the cache,
    downloading it once per machine. A download that is not the shard index.json describes (size,
    sha256) is returned as it is for the caller to judge, and not kept."""
    if cache is None:
        return read_bytes(base, shard.file)
    if cache.root is None:
        return _download(base, shard, cache)
    entry, lock = _paths(cache, shard.sha256)
    with _locked(lock, fcntl.LOCK_SH):
        data = _hit(entry, shard, cache)
    if data is not None:
        return data
    with _locked(lock, fcntl.LOCK_EX):
        # Another rank or worker may have written it while we waited for the exclusive lock.
        data = _hit(entry, shard, cache)
        if data is not None:
            return data
        data = _download(base, shard, cache)
        stored = _store(entry, shard, data)
    if stored and cache.limit_bytes is not None:
        evict(cache, keep=entry)
    return data


def shard_map(base: str, shard: ShardInfo, cache: ShardCache | None) -> mmap.mmap | None:
    """A read-only map of the shard's bytes in a local file, for reading single samples where they lie:
    the file itself for local data; for remote data the cache's entry, downloaded once per machine first
    (through fetch_shard) where it is missing. None where there is no such file of index.json's size: a
    local file that is missing or changed size, --no-cache, a download that is not the shard index.json
    describes, a cache disk that would not take it; the caller then reads the whole shard as before."""
    if not is_remote(base):
        return _map(Path(local_path(base)) / shard.file, shard)
    if cache is None or cache.root is None:
        return None
    entry, lock = _paths(cache, shard.sha256)
    with _locked(lock, fcntl.LOCK_SH):
        mapped = _map(entry, shard)
    if mapped is not None:
        os.utime(entry)  # its last use: what least-recently-used eviction orders by
        cache.counts.hits += 1
        return mapped
    fetch_shard(base, shard, cache)  # stores it if it is sound; counted there, as a download or a hit
    # Mapped under the shared lock: eviction unlinks only unlocked entries, and a map outlives an unlink.
    with _locked(lock, fcntl.LOCK_SH):
        return _map(entry, shard)


def _map(path: Path, shard: ShardInfo) -> mmap.mmap | None:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != shard.bytes or not shard.bytes:
                return None
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError:
        return None


def _hit(entry: Path, shard: ShardInfo, cache: ShardCache) -> bytes | None:
    """The entry's bytes if it is there with the right size (its sha256 was checked when written)."""
    try:
        if entry.stat().st_size != shard.bytes:
            return None
        data = entry.read_bytes()
        os.utime(entry)  # its last use: what least-recently-used eviction orders by
    except FileNotFoundError:
        return None
    cache.counts.hits += 1
    return data


def _download(base: str, shard: ShardInfo, cache: ShardCache) -> bytes:
    data = read_bytes(base, shard.file)
    cache.counts.downloads += 1
    cache.counts.bytes_downloaded += len(data)
    return data


def _store(entry: Path, shard: ShardInfo, data: bytes) -> bool:
    """Write `data` as the entry, atomically, if it is the shard index.json describes. Held: its exclusive
    lock, so any temp file of this entry is a dead process's and goes first."""
    for stale in entry.parent.glob(f"{entry.name}.tmp.*"):
        stale.unlink(missing_ok=True)
    if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
        return False
    tmp = entry.parent / f"{entry.name}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, entry)
    except OSError:
        # A full or failing cache disk costs speed, not the run: the bytes are in hand.
        tmp.unlink(missing_ok=True)
        return False
    return True


# --- eviction -------------------------------------------------------------------------------------


def evict(cache: ShardCache, keep: Path | None = None) -> list[Path]:
    """Delete least-recently-used entries until the cache holds at most its limit; skip entries another
    process holds (reading or writing) and `keep` (the entry just written). Returns what was deleted."""
    entries = []
    for path in cache.folder.glob("*.tar"):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        entries.append((st.st_mtime_ns, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, path in sorted(entries):
        if total <= cache.limit_bytes:
            break
        if path == keep:
            continue
        lock = path.with_suffix(".lock")
        with _locked(lock, fcntl.LOCK_EX | fcntl.LOCK_NB) as held:
            if held:
                path.unlink(missing_ok=True)
                lock.unlink()
                total -= size
                deleted.append(path)
    _clean_stale_tmp(cache)
    return deleted


def _clean_stale_tmp(cache: ShardCache) -> None:
    """Temp files of crashed downloads whose entry nobody is writing now."""
    for tmp in cache.folder.glob("*.tar.tmp.*"):
        sha = tmp.name.split(".", 1)[0]
        lock = cache.folder / f"{sha}.lock"
        with _locked(lock, fcntl.LOCK_EX | fcntl.LOCK_NB) as held:
            if held:
                tmp.unlink(missing_ok=True)
                if not (cache.folder / f"{sha}.tar").exists():
                    lock.unlink()  # a lock file with no entry behind it would stay forever
