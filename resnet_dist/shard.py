"""python -m resnet_dist.shard: pack a dataset into WebDataset shards + index.json, or verify them.

    python -m resnet_dist.shard SOURCE --root PATH [--out DIR] [options]
    python -m resnet_dist.shard verify DIR
    python -m resnet_dist.shard index DIR_OR_URL [--out DIR]   (shards other tools wrote: resnet_dist.foreign)

The flow per split: read the source (sources.py) -> carve val -> seeded global shuffle -> chunks
encoded in a process pool (ordered, so any worker count gives the same bytes) -> tar members
appended to the current shard -> shard fsynced and renamed. index.json is written last; the
format is docs/shard-format.md and, in code, resnet_dist/index.py.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from resnet_dist import __version__
from resnet_dist.errors import DataError, OneLineParser, UsageError, run_cli
from resnet_dist.filesafe import fsync_dir, write_json_atomic
from resnet_dist.index import (
    INDEX_NAME,
    DatasetIndex,
    ShardInfo,
    SplitInfo,
    class_ids,
    shards_at,
    write_index,
)
from resnet_dist.integrity import damaged_samples, intact_group, load_table
from resnet_dist.locations import check_location, local_path
from resnet_dist.sources import READERS, SOURCES, Sample, Source, Split, iter_samples, read_synthetic
from resnet_dist.storage import exists, is_remote, is_url, list_files, read_bytes, read_index, remove_file, write_file
from resnet_dist.tars import (
    IMAGE_EXTS,
    SIDECAR_RE,
    Group,
    SampleTable,
    sample_digest,
    sample_label,
    sample_table,
    sidecar_name,
    tar_groups,
)

# 5000 samples a shard: ~12 MB of Fashion-MNIST PNGs, ~20 MB of CIFAR or Tiny ImageNet. Big enough
# that tar overhead and file opens are noise, small enough that a shuffled shard order mixes well
# and a small dataset still gives several shards. The trainer splits work by exact sample ranges
# from the per-shard counts, so the shard count need not divide by the number of processes.
DEFAULT_SHARD_SIZE = 5000
# PNG zlib level 1: on 28x28 Fashion-MNIST it encodes ~16% faster than the default 6 and files are
# ~4% larger (524 vs 504 bytes), which the tar format's 512-byte blocks shrink to +1.5% a sample
# (docs/shards.md).
PNG_COMPRESS_LEVEL = 1
DEFAULT_JPEG_QUALITY = 90
# Fixed tar header fields: the same input and --seed give byte-identical shards (same sha256).
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z; 0 trips some tools' "implausibly old" checks
CHUNK = 256  # samples per pool task: large enough to amortise pickling, small for smooth progress
DOWNLOADABLE = ("cifar10", "cifar100", "mnist", "fashion-mnist")
FILE_SOURCES = ("tiny-imagenet", "imagefolder", "imagenet")  # sources of encoded image files, some possibly re-encoded
RESIZABLE = ("imagefolder", "imagenet")  # sources of images of any size (--max-size)
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
SHARD_RE = re.compile(r"^.+-\d{6}\.tar$")
TMP_RE = re.compile(r"^\.(.+\.tar|samples-[0-9a-f]{16}\.json\..+)\.tmp$")  # a shard or its table, being written
SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
JPEG_NAMES = ("jpg", "jpeg")
LOSSY_FORMATS = ("JPEG", "MPO")
# Train images whose pixels give mean/std when the source is files (each needs a full decode): the
# per-channel mean of 10,000 random photos is within ~0.001 of the whole set's (docs/shards.md).
# Decoded-array sources (CIFAR, IDX, synthetic) use every image: their pixels cost nothing to get.
DEFAULT_STATS_SAMPLE = 10_000
MAX_NAMED_DAMAGED = 100  # verify names each damaged sample of a shard up to this many, then counts the rest

console = Console(stderr=False, highlight=False)


# --- pure helpers: splits, order, statistics ------------------------------------------------------


def split_seed(seed: int, split: str) -> np.random.Generator:
    # One stream per split, so adding a split never changes another split's order.
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def carve_val(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Class-stratified, deterministic split of train into (train, val)."""
    rng = split_seed(seed, "val-carve")
    val_idx = []
    for c in np.unique(train.labels):
        members = np.flatnonzero(train.labels == c)
        count = int(np.floor(fraction * len(members) + 0.5))
        val_idx.append(rng.permutation(members)[:count])
    val_idx = np.sort(np.concatenate(val_idx)) if val_idx else np.array([], dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(train)), val_idx)
    return train.take(keep), train.take(val_idx)


def shuffled_order(n: int, seed: int, split: str, limit: int | None) -> np.ndarray:
    """A seeded global shuffle: class-sorted sources would otherwise give one-class shards."""
    order = split_seed(seed, split).permutation(n)
    return order[:limit] if limit else order


_LEVELS = np.arange(256, dtype=np.int64)


@dataclass
class PixelStats:
    """Per-channel sum and sum of squares of uint8 pixels, as exact Python integers.

    Integers make the result exact and independent of summation order (so of --workers); the
    division to float64 happens once, in `mean_std`.
    """

    count: int = 0  # pixels per channel
    sums: tuple[int, ...] = ()
    squares: tuple[int, ...] = ()

    def add(self, pixels: np.ndarray, channels: int) -> None:
        """Add uint8 pixels: ... x H x W for one channel, ... x H x W x C for C."""
        flat = pixels.reshape(-1, channels)
        # A 256-bin histogram per channel gives both sums exactly, ~9x faster than squaring in int64.
        hist = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(channels)]).astype(np.int64)
        sums, squares = (hist @ _LEVELS).tolist(), (hist @ (_LEVELS * _LEVELS)).tolist()
        self.merge(PixelStats(len(flat), tuple(sums), tuple(squares)))

    def merge(self, other: PixelStats) -> None:
        if not other.count:
            return
        if not self.count:
            self.count, self.sums, self.squares = other.count, other.sums, other.squares
            return
        self.count += other.count
        self.sums = tuple(a + b for a, b in zip(self.sums, other.sums))
        self.squares = tuple(a + b for a, b in zip(self.squares, other.squares))

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Mean and population std per channel on the [0, 1] scale."""
        n = self.count
        mean = [s / (n * 255) for s in self.sums]
        # n^2 var = n*sum(x^2) - sum(x)^2, exact in integers: no cancellation error.
        std = [((n * q - s * s) / (n * n)) ** 0.5 / 255 for s, q in zip(self.sums, self.squares)]
        return mean, std


# --- tar framing ----------------------------------------------------------------------------------

# Every member shares mode, owner and mtime; only name, size and checksum vary. A header built
# from this template is byte-for-byte what tarfile.TarInfo.tobuf(USTAR_FORMAT) gives (tests check
# it against tarfile) at ~5 us a member, where tarfile spends ~35 us in Python, which was ~40% of
# packing Fashion-MNIST (140k members; docs/shards.md).
_HEADER = bytearray(tarfile.BLOCKSIZE)
_HEADER[100:124] = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid
_HEADER[136:148] = b"%011o\x00" % TAR_MTIME
_HEADER[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
_HEADER[156:157] = tarfile.REGTYPE
_HEADER[257:265] = tarfile.POSIX_MAGIC


def tar_member(name: str, payload: bytes) -> bytes:
    """One regular-file member: USTAR header, data, zero padding to the 512-byte block."""
    raw = name.encode("ascii")
    assert len(raw) < 100, name  # keys are short: no prefix field needed
    header = bytearray(_HEADER)
    header[: len(raw)] = raw
    header[124:136] = b"%011o\x00" % len(payload)
    header[148:155] = b"%06o\x00" % sum(header)
    pad = -len(payload) % tarfile.BLOCKSIZE
    return bytes(header) + payload + b"\0" * pad


def tar_end(offset: int) -> bytes:
    """End-of-archive as tarfile writes it: two zero blocks, then zeros to a whole record."""
    offset += 2 * tarfile.BLOCKSIZE
    return b"\0" * (2 * tarfile.BLOCKSIZE + (-offset % tarfile.RECORDSIZE))


# --- encoding one sample (runs in pool workers) ---------------------------------------------------


@dataclass(frozen=True)
class Plan:
    size: tuple[int, int] | None  # (height, width) every image must have; None: each keeps its own
    channels: int
    format: str  # png | jpeg, for images this tool encodes
    quality: int
    resize: bool  # --image-size given: resize + center-crop instead of rejecting
    max_size: int | None  # --max-size: shrink images whose shorter side is larger
    stats_until: int  # samples at shuffled positions below this add to mean/std (0: none)


@dataclass
class Encoded:
    label: int
    coarse: int | None
    payload: bytes
    ext: str  # png | jpg
    size: tuple[int, int]  # (height, width) as stored
    conversions: tuple[str, ...] = ()  # why a file was not copied byte-for-byte
    gray_jpeg: bool = False  # a grayscale JPEG copied into a 3-channel dataset


@dataclass
class Skipped:
    path: str
    reason: str


def resize_crop(im: Image.Image, height: int, width: int) -> Image.Image:
    """Resize so the image covers height x width (shorter side first), then center-crop."""
    scale = max(height / im.height, width / im.width)
    size = (max(width, int(im.width * scale + 0.5)), max(height, int(im.height * scale + 0.5)))
    im = im.resize(size, Image.Resampling.BILINEAR)  # PIL's resize antialiases when shrinking
    left, top = int(round((im.width - width) / 2)), int(round((im.height - height) / 2))
    return im.crop((left, top, left + width, top + height))


def shrunk(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) with the shorter side brought down to max_size, the aspect ratio kept."""
    scale = max_size / min(width, height)
    if width <= height:
        return max_size, max(1, round(height * scale))
    return max(1, round(width * scale)), max_size


def encode_image(im: Image.Image, fmt: str, quality: int) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "jpeg":
        im.save(buf, "JPEG", quality=quality)
        return buf.getvalue(), "jpg"
    im.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue(), "png"


def decode_file(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()  # decode every byte now: a truncated file must fail here, not in the trainer
    return im


def conversion_reasons(im: Image.Image, ext: str | None) -> list[str]:
    """Why an image file cannot be copied byte-for-byte, from its header alone; [] means copy it.

    Copied: PNG in any mode (the decoder converts it), and baseline JPEG in RGB or L, the JPEG every
    decoder reads directly (PIL, libjpeg-turbo, nvJPEG's hardware engine). Progressive JPEGs decode
    ~3x slower (docs/shards.md), so they are re-encoded as baseline once, here, not in every epoch.
    """
    if im.format == "PNG":
        return ["png_named_jpeg"] if ext in JPEG_NAMES else []
    if im.format != "JPEG":
        return ["other_format"]  # BMP, TIFF, WebP, GIF, MPO (a camera JPEG with extra frames) ...
    reasons = []
    if im.mode not in ("RGB", "L"):
        reasons.append("cmyk_jpeg" if im.mode == "CMYK" else "other_jpeg_mode")
    if im.info.get("progressive") or im.info.get("progression"):
        reasons.append("progressive_jpeg")
    return reasons


def convert(sample: Sample, im: Image.Image, plan: Plan, fmt: str, with_pixels: bool) -> tuple[Encoded, np.ndarray]:
    """Decode, convert to the dataset's mode, resize if the plan says so, encode with `fmt`."""
    mode = "L" if plan.channels == 1 else "RGB"
    # The same conversion the trainer applies on decode (docs/shard-format.md), so the mean/std
    # describe exactly the pixels it will see.
    out = im if im.mode == mode else im.convert(mode)
    if plan.size is not None and out.size != (plan.size[1], plan.size[0]):
        out = resize_crop(out, *plan.size)
    elif plan.max_size and min(out.size) > plan.max_size:
        # LANCZOS after a box pre-reduction to 3x the target: PIL documents the result as
        # indistinguishable from plain LANCZOS, at a fraction of the cost for big shrinks.
        out = out.resize(shrunk(*out.size, plan.max_size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    payload, ext = encode_image(out, fmt, plan.quality)
    pixels = None
    if with_pixels:
        # JPEG is lossy (it smooths noise: std drops visibly): describe the decoded pixels.
        pixels = np.asarray(out if ext == "png" else decode_file(payload).convert(mode))
    return Encoded(sample.label, sample.coarse, payload, ext, (out.height, out.width)), pixels


def encode_file(sample: Sample, plan: Plan, with_pixels: bool) -> tuple[Encoded, np.ndarray | None] | Skipped:
    """An image file: copied byte-for-byte when it can be, else converted (and why, counted)."""
    try:
        im = Image.open(io.BytesIO(sample.data or b""))
        reasons = conversion_reasons(im, sample.ext)
        width, height = im.size
        if plan.size is not None and (height, width) != plan.size:
            if not plan.resize:
                h, w = plan.size
                return Skipped(sample.name, f"size {width}x{height} differs from {w}x{h} (see --image-size)")
            reasons.append("resized")
        elif plan.max_size and min(width, height) > plan.max_size:
            reasons.append("resized")
        if not reasons and not with_pixels and im.format == "JPEG":
            # Only checking that it decodes: entropy decoding covers every byte at 1/8 scale too.
            im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))  # (0, 0) divides by zero
        im.load()  # a truncated or corrupt file must fail here, not in the trainer
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return Skipped(sample.name, f"cannot decode: {exc}")
    if reasons:
        # A JPEG stays JPEG (PNG would not undo its loss, only make it ~5x bigger); --image-size
        # re-encodes with --format, as it always has.
        fmt = "jpeg" if im.format in LOSSY_FORMATS and not plan.resize else plan.format
        encoded, pixels = convert(sample, im, plan, fmt, with_pixels)
        encoded.conversions = tuple(reasons)
        return encoded, pixels
    pixels = None
    if with_pixels:
        mode = "L" if plan.channels == 1 else "RGB"
        pixels = np.asarray(im if im.mode == mode else im.convert(mode))
    ext = "png" if im.format == "PNG" else "jpg"
    gray = im.format == "JPEG" and im.mode == "L" and plan.channels == 3
    return Encoded(sample.label, sample.coarse, sample.data, ext, (height, width), gray_jpeg=gray), pixels


def encode_sample(sample: Sample, plan: Plan, with_pixels: bool) -> tuple[Encoded, np.ndarray | None] | Skipped:
    """One sample -> its shard payload and (if asked) the pixels the trainer will decode, or why not."""
    if sample.error:
        return Skipped(sample.name, sample.error)
    if sample.array is None:
        return encode_file(sample, plan, with_pixels)
    im = Image.fromarray(sample.array)
    if plan.size is not None and im.size != (plan.size[1], plan.size[0]) and not plan.resize:
        h, w = plan.size
        return Skipped(sample.name, f"size {im.width}x{im.height} differs from {w}x{h} (see --image-size)")
    return convert(sample, im, plan, plan.format, with_pixels)


def frame_sample(key: str, item: Encoded) -> bytes:
    # Image first, then labels: webdataset groups consecutive members by key in any order.
    parts = [tar_member(f"{key}.{item.ext}", item.payload), tar_member(f"{key}.cls", b"%d" % item.label)]
    if item.coarse is not None:
        parts.append(tar_member(f"{key}.coarse.cls", b"%d" % item.coarse))
    return b"".join(parts)


@dataclass
class ChunkResult:
    blob: bytes  # the chunk's samples, each already framed as tar members, back to back
    sizes: list[int]  # bytes of each sample in `blob`
    keys: list[str]  # each sample's key, and where it came from (sources.Sample.name)
    origins: list[str]
    skipped: list[Skipped]
    stats: PixelStats
    dims: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of each stored image
    conversions: Counter = field(default_factory=Counter)
    gray_jpegs: int = 0
    stats_images: int = 0  # images whose pixels are in `stats`


class PendingPixels:
    """Batches images into one PixelStats.add: per image, the call overhead dominates on 28x28 images."""

    LIMIT = 4 << 20  # bytes held before a flush: small images batch, large ones go almost one by one

    def __init__(self, stats: PixelStats, channels: int):
        self.stats, self.channels, self.held, self.size = stats, channels, [], 0

    def add(self, pixels: np.ndarray) -> None:
        self.held.append(pixels.reshape(-1, self.channels))
        self.size += pixels.size
        if self.size >= self.LIMIT:
            self.flush()

    def flush(self) -> None:
        if self.held:
            self.stats.add(np.concatenate(self.held), self.channels)
        self.held, self.size = [], 0


@dataclass(frozen=True)
class Task:
    chunk: Split
    plan: Plan
    split: str
    first: int  # ordinal of the chunk's first sample in the shuffled split


def encode_chunk(task: Task) -> ChunkResult:
    """Encode and frame a chunk in a worker: the parent only appends bytes to the shard file.

    A sample's key is its position in the shuffled split, known before encoding, so workers can
    frame it; a skipped input leaves a gap in the keys rather than renumbering the rest. The
    shuffle is seeded, so the first `stats_until` positions are a seeded random sample.
    """
    out = ChunkResult(b"", [], [], [], [], PixelStats())
    parts, pending = [], PendingPixels(out.stats, task.plan.channels)
    for i, sample in enumerate(iter_samples(task.chunk)):
        ordinal = task.first + i
        result = encode_sample(sample, task.plan, ordinal < task.plan.stats_until)
        if isinstance(result, Skipped):
            out.skipped.append(result)
            continue
        encoded, pixels = result
        key = f"{task.split}_{ordinal:08d}"
        parts.append(frame_sample(key, encoded))
        out.sizes.append(len(parts[-1]))
        out.keys.append(key)
        out.origins.append(sample.name)
        out.dims.append(encoded.size)
        if encoded.conversions:
            out.conversions.update(encoded.conversions)
        out.gray_jpegs += encoded.gray_jpeg
        if pixels is not None:
            pending.add(pixels)
            out.stats_images += 1
    pending.flush()
    out.blob = b"".join(parts)
    return out


def probe_chunk(chunk: Split) -> list[tuple[str, tuple[int, int] | None, str]]:
    """(path, (width, height), mode) from each file's header, or (path, None, reason)."""
    out = []
    for rel in chunk.files or ():
        try:
            with Image.open(chunk.root / rel) as im:
                out.append((rel, im.size, im.mode))
        except Exception as exc:
            out.append((rel, None, f"cannot decode: {exc}"))
    return out


def chunks(split: Split, size: int = CHUNK) -> Iterator[Split]:
    for start in range(0, len(split), size):
        yield split.take(np.arange(start, min(start + size, len(split))))


# --- writing shards -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Appends samples to {split}-NNNNNN.tar, rolling to a new shard every `shard_size` samples.

    Members are framed by `tar_member` (tarfile's exact bytes, faster) rather than by
    webdataset.TarWriter, which stamps every member with user/group "bigdata" and orders members
    by name. Each shard is written under a temporary name, fsynced, then renamed. Beside it goes its
    per-sample table (resnet_dist.tars.SampleTable: each sample's key, byte range, digest and origin),
    recorded as the samples are appended: the writer knows every offset, so nothing is read back.
    """

    def __init__(self, folder: Path, split: str, shard_size: int):
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.shards: list[ShardInfo] = []
        self.count = 0  # samples in the open shard
        self.total = 0
        self.tmp: Path | None = None
        self.file = None
        self.offset = 0
        self.sha = hashlib.sha256()
        self.table = SampleTable("", "", [], [], [], [], [])

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.offset += len(data)

    def add(self, sample: bytes, key: str, origin: str | None = None) -> None:
        """Append one sample, framed by `frame_sample`, with its key and where it came from; DataError (one
        line) if the disk refuses."""
        try:
            if self.file is None:
                self.tmp = self.folder / f".{self.split}-{len(self.shards):06d}.tar.tmp"
                self.file = open(self.tmp, "wb")
                self.offset, self.sha = 0, hashlib.sha256()
                self.table = SampleTable("", "", [], [], [], [], [])
            for column, value in zip(
                (self.table.keys, self.table.offsets, self.table.sizes, self.table.digests, self.table.origins),
                (key, self.offset, len(sample), sample_digest(sample), origin),
            ):
                column.append(value)
            self._write(sample)
            self.count += 1
            self.total += 1
            if self.count == self.shard_size:
                self._finish()
        except OSError as exc:
            raise write_error(self.folder, exc) from None

    def _finish(self) -> None:
        self._write(tar_end(self.offset))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        final = self.folder / self.tmp.name[1 : -len(".tmp")]
        self.table.shard, self.table.shard_sha256 = final.name, self.sha.hexdigest()
        table = write_json_atomic(
            self.folder / sidecar_name(self.sha.hexdigest()), self.table.to_json(), compact=True, shared=True
        )
        os.replace(self.tmp, final)
        self.shards.append(ShardInfo(final.name, self.count, self.sha.hexdigest(), self.offset, table.name))
        self.file = self.tmp = None
        self.count = 0

    def close(self) -> SplitInfo:
        try:
            if self.file is not None:
                self._finish()
        except OSError as exc:
            raise write_error(self.folder, exc) from None
        fsync_dir(self.folder, best_effort=True)
        return SplitInfo(self.total, tuple(self.shards))

    def abort(self) -> None:
        """Drop the shard being written (pack removes the finished ones: no index points at them)."""
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # closing flushes the buffer; on a full disk that fails again, and the file goes anyway
            self.file = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


def write_error(folder: Path, exc: OSError) -> DataError:
    """One line for a write the disk refused (full, over quota, file too large, permission, read-only)."""
    return DataError(f"{folder}: cannot write ({exc.strerror or exc}); nothing of this run is left there")


def remove_outputs(folder: Path) -> None:
    """Delete the shards, sidecars and temporary files a failed run left in `folder` (not index.json: pack
    writes it last, so a failed run has none of its own, and an older one was removed before packing)."""
    for path in existing_outputs(folder):
        if path.name != INDEX_NAME:
            path.unlink(missing_ok=True)


def existing_outputs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_output(p.name))


def is_output(name: str) -> bool:
    """A file the packer writes: index.json, a shard, a shard's sample table, or one of their temporaries."""
    return name == INDEX_NAME or any(pattern.match(name) for pattern in (SHARD_RE, SIDECAR_RE, TMP_RE))


def prepare_out_dir(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} exists and is not a folder")
    found = existing_outputs(folder)
    if found and not overwrite:
        raise UsageError(
            f"{folder} already holds shards ({len(found)} files, e.g. {found[0].name}): "
            "pass --overwrite to replace them"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {folder}: cannot create ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {folder}: not writable (permission denied)")
    # The index goes first: from here on no index points at shards we are about to replace.
    for path in sorted(found, key=lambda p: p.name != INDEX_NAME):
        path.unlink()
    fsync_dir(folder, best_effort=True)


# --- planning -------------------------------------------------------------------------------------


def decide_channels(probes: list[tuple[str, tuple[int, int], str]]) -> int:
    """1 when every file is grayscale, else 3: from the files' headers."""
    return 1 if all(p[2] in GRAY_MODES for p in probes) else 3


def ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group. A worker killed by it mid-task leaves Pool waiting
    # forever for that result (the parent hung here); only the parent handles it, then terminates
    # the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def imap(pool, fn, tasks: Iterable):
    return map(fn, tasks) if pool is None else pool.imap(fn, tasks)


def probe_files(source: Source, pool, strict: bool) -> list[tuple[str, tuple[int, int], str]]:
    """Read every file's header; drop (or, with --strict, fail on) the unreadable ones."""
    good = []
    for name, split in list(source.splits.items()):
        keep = []
        for results in imap(pool, probe_chunk, chunks(split, 1024)):
            for rel, size, mode in results:
                if size is None:
                    if strict:
                        raise DataError(f"{rel}: {mode} (--strict)")
                    source.skipped.append({"path": rel, "reason": mode})
                else:
                    good.append((rel, size, mode))
                    keep.append(rel)
        kept = set(keep)
        source.splits[name] = split.take([i for i, f in enumerate(split.files) if f in kept])
    if not good:
        raise DataError("no decodable images found")
    return good


def load_source(args: argparse.Namespace) -> Source:
    if args.source == "synthetic":
        return read_synthetic(
            args.num_classes or 10, args.image_size or 32, args.num_samples or 1000, args.channels or 3
        )
    root = Path(args.root)
    if args.download:
        download(args.source, root)
    return READERS[args.source](root)


def download(source: str, root: Path) -> None:
    """Fetch with torchvision into `root`, in the layout its readers then find (online only)."""
    from torchvision import datasets

    cls = {
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
    }[source]
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types; the message says enough
        raise UsageError(f"--download of {source} into {root} failed: {exc}") from None


def arrange_splits(source: Source, args: argparse.Namespace) -> None:
    """Carve val out of train if asked; check split names make valid keys."""
    if args.val_fraction:
        if "train" not in source.splits:
            raise UsageError(f"--val-fraction needs a 'train' split; {source.name} has {', '.join(source.splits)}")
        if "val" in source.splits:
            if "test" in source.splits:
                raise UsageError(f"{source.name} already has val and test splits: drop --val-fraction")
            # Tiny ImageNet's labelled val/ is the usual held-out test set once val comes from train.
            source.splits["test"] = source.splits.pop("val")
            source.notes.append(
                "the source's own val split is written as 'test' (--val-fraction carves 'val' from train)"
            )
        train, val = carve_val(source.splits["train"], args.val_fraction, args.seed)
        if not len(val) or not len(train):
            raise UsageError(f"--val-fraction {args.val_fraction} leaves an empty split")
        source.splits["train"], source.splits["val"] = train, val
        source.notes.append(f"val: {args.val_fraction:g} of each train class, seed {args.seed}")
    for name in source.splits:
        if not SPLIT_RE.match(name):
            raise UsageError(
                f"split name {name!r} must use only letters, digits, '_' and '-' (it becomes part of keys)"
            )
    for name in [n for n, s in source.splits.items() if not len(s)]:
        source.notes.append(f"split '{name}' is empty: not written")
        del source.splits[name]


# --- the pack command -----------------------------------------------------------------------------


def stats_split(splits: Iterable[str]) -> str:
    names = list(splits)
    return "train" if "train" in names else sorted(names)[0]


def pack(args: argparse.Namespace) -> DatasetIndex:
    """Pack into --out; a remote --out is packed into a local staging folder, then uploaded (index last)."""
    if not is_remote(args.out):
        return pack_into(args, Path(args.out), args.out)
    check_remote_out(args.out, args.overwrite)
    staging = Path(tempfile.mkdtemp(prefix="resnet-dist-shard-"))
    try:
        index = pack_into(args, staging, args.out)
        upload(staging, args.out, args.overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return index


def check_remote_out(out: str, overwrite: bool) -> None:
    """Before any work: the bucket must exist, and one holding an index.json needs --overwrite, as locally."""
    from resnet_dist import remote

    remote.check_bucket(out)
    if exists(out, INDEX_NAME) and not overwrite:
        raise UsageError(f"{out} already holds shards ({INDEX_NAME}): pass --overwrite to replace them")


def upload(staging: Path, out: str, overwrite: bool) -> None:
    """Each finished file of `staging`, index.json last: a reader never finds an index whose shards are not
    all there yet. With --overwrite the old index goes first and the old shards after it, as locally."""
    if overwrite:
        remove_file(out, INDEX_NAME)
        for name in list_files(out):
            if is_output(name):
                remove_file(out, name)
    names = sorted(p.name for p in staging.iterdir() if p.is_file() and p.name != INDEX_NAME)
    with Progress(TextColumn("upload"), BarColumn(), MofNCompleteColumn(), console=console, transient=True) as bar:
        task = bar.add_task("upload", total=len(names) + 1)
        for name in [*names, INDEX_NAME]:
            write_file(out, name, staging / name)
            bar.advance(task)


def pack_into(args: argparse.Namespace, out: Path, shown: str) -> DatasetIndex:
    source = load_source(args)
    arrange_splits(source, args)
    prepare_out_dir(out, args.overwrite)
    try:
        index, seconds = write_all(args, source, out)
        try:
            write_index(out, index)
        except OSError as exc:
            raise write_error(out, exc) from None
    except BaseException:
        remove_outputs(out)  # no index points at them: a rerun must not be asked for --overwrite
        raise
    summarize(index, shown, seconds)
    return index


def write_all(args: argparse.Namespace, source: Source, out: Path) -> tuple[DatasetIndex, float]:
    """The index of the shards written into `out`, and the seconds it took."""
    started = time.perf_counter()
    pool = None
    if args.workers > 1:
        # spawn: workers import only this module's needs, whatever the parent has loaded.
        pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=ignore_sigint)
    try:
        channels = args.channels or source.channels
        if channels is None:
            channels = decide_channels(probe_files(source, pool, args.strict))
        # None: every image keeps its own size (ImageFolder, ImageNet); the index says if they vary.
        size = (args.image_size, args.image_size) if args.image_size else source.image_size
        index = write_splits(source, args, out, pool, size, channels)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return index, time.perf_counter() - started


@dataclass
class Totals:
    """What the chunks of every split add up to, for index.json."""

    stats: PixelStats = field(default_factory=PixelStats)
    stats_images: int = 0
    dims: list[np.ndarray] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)
    gray_jpegs: int = 0

    def add(self, result: ChunkResult) -> None:
        self.stats.merge(result.stats)
        self.stats_images += result.stats_images
        self.dims.append(np.asarray(result.dims, dtype=np.int64).reshape(-1, 2))
        self.conversions.update(result.conversions)
        self.gray_jpegs += result.gray_jpegs


def size_stats(dims: np.ndarray) -> dict[str, dict[str, int]]:
    """min / median / max of the heights, widths, shorter and longer sides of (height, width) rows.

    The median is the lower middle value, so it is always a side some image has.
    """
    columns = {"height": dims[:, 0], "width": dims[:, 1], "shorter_side": dims.min(1), "longer_side": dims.max(1)}
    out = {}
    for name, values in columns.items():
        values = np.sort(values)
        out[name] = {"min": int(values[0]), "median": int(values[(len(values) - 1) // 2]), "max": int(values[-1])}
    return out


def stats_until(source: Source, args, name: str, stats_name: str, count: int) -> int:
    """How many shuffled positions of split `name` feed mean/std: a prefix of a seeded shuffle is a seeded
    random sample."""
    if name != stats_name:
        return 0
    cap = args.stats_sample
    if cap is None:
        cap = 0 if source.splits[name].files is None else DEFAULT_STATS_SAMPLE
    return count if cap == 0 else min(cap, count)


def write_splits(source: Source, args, out: Path, pool, size: tuple[int, int] | None, channels: int) -> DatasetIndex:
    stats_name = stats_split(source.splits)
    if stats_name != "train":
        source.notes.append(f"no train split: mean/std are over '{stats_name}'")
    if args.limit:
        source.notes.append(f"--limit {args.limit}: at most {args.limit} samples per split")
    totals = Totals()
    splits: dict[str, SplitInfo] = {}
    progress = Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        for name in sorted(source.splits, key=lambda n: (n != "train", n)):
            split = source.splits[name]
            data = split.take(shuffled_order(len(split), args.seed, name, args.limit))
            quality = args.quality or DEFAULT_JPEG_QUALITY
            until = stats_until(source, args, name, stats_name, len(data))
            plan = Plan(size, channels, args.format, quality, bool(args.image_size), args.max_size, until)
            info = write_split(source, args, out, pool, name, data, plan, progress, totals)
            if info.num_samples:
                splits[name] = info
            else:
                source.notes.append(f"split '{name}': every sample was skipped")
    if stats_name not in splits:
        raise DataError(f"no samples could be written for '{stats_name}': see the skipped inputs above")
    if not totals.stats.count:
        raise DataError(f"every '{stats_name}' image sampled for mean/std was skipped: pass a larger --stats-sample")
    if totals.gray_jpegs and channels == 3:
        source.notes.append(
            f"{totals.gray_jpegs} grayscale JPEG(s) copied as they are: they decode to RGB like the rest"
        )
    stats_of = splits[stats_name].num_samples
    return build_index(source, args, size, channels, totals, {"images": totals.stats_images, "of": stats_of}, splits)


def write_split(
    source, args, out: Path, pool, name: str, data: Split, plan: Plan, progress, totals: Totals
) -> SplitInfo:
    bar = progress.add_task(name, total=len(data))
    writer = ShardWriter(out, name, args.shard_size)
    try:
        tasks = (Task(c, plan, name, first) for first, c in zip(range(0, len(data), CHUNK), chunks(data)))
        for result in imap(pool, encode_chunk, tasks):
            if result.skipped and args.strict:
                raise DataError(f"{result.skipped[0].path}: {result.skipped[0].reason} (--strict)")
            source.skipped += [{"path": k.path, "reason": k.reason} for k in result.skipped]
            view, start = memoryview(result.blob), 0
            for nbytes, key, origin in zip(result.sizes, result.keys, result.origins):
                writer.add(view[start : start + nbytes], key, origin)
                start += nbytes
            totals.add(result)
            progress.advance(bar, len(result.sizes) + len(result.skipped))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def build_index(source: Source, args, size, channels: int, totals: Totals, sample: dict, splits) -> DatasetIndex:
    mean, std = totals.stats.mean_std()
    dims = np.concatenate(totals.dims)
    sizes = size_stats(dims)
    if (
        size is None
        and sizes["height"]["min"] == sizes["height"]["max"]
        and sizes["width"]["min"] == sizes["width"]["max"]
    ):
        size = (sizes["height"]["min"], sizes["width"]["min"])  # every image turned out the same size
    return DatasetIndex(
        source=source.name,
        classes=source.classes,
        image_size=size,
        channels=channels,
        format=args.format,
        mean=[round(m, 6) for m in mean],
        std=[round(s, 6) for s in std],
        splits=splits,
        extra_labels=source.extra_labels,
        skipped=source.skipped,
        notes=source.notes,
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "command"},
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        tool=f"resnet-dist {__version__}",
        sizes=sizes,
        max_size=args.max_size,
        conversions=dict(sorted(totals.conversions.items())),
        stats_sample={**sample, "seed": args.seed},
    )


def summarize(index: DatasetIndex, out: str | Path, seconds: float) -> None:
    table = Table(title=f"{index.source} -> {out}", title_justify="left")
    for col in ("split", "samples", "shards", "MB"):
        table.add_column(col, justify="left" if col == "split" else "right")
    total = 0
    for name, split in index.splits.items():
        total += split.num_samples
        table.add_row(
            name, f"{split.num_samples:,}", str(len(split.shards)), f"{sum(s.bytes for s in split.shards) / 1e6:.1f}"
        )
    console.print(table)
    if index.image_size is not None:
        geometry = f"{index.image_size[0]}x{index.image_size[1]}x{index.channels}"
    else:
        short = index.sizes["shorter_side"]
        geometry = (
            f"sizes vary (shorter side {short['min']}..{short['max']}, median {short['median']}), {index.channels}"
        )
        geometry += " channels"
    fmt = lambda xs: "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"  # noqa: E731
    sample = index.stats_sample
    over = "" if sample["images"] == sample["of"] else f" (from {sample['images']:,} of {sample['of']:,} images)"
    console.print(
        f"{geometry} {index.format}, {index.num_classes} classes; mean {fmt(index.mean)} std {fmt(index.std)}{over}"
    )
    if index.conversions:
        console.print("converted: " + ", ".join(f"{n:,} {kind}" for kind, n in index.conversions.items()))
    console.print(f"{total:,} samples in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} samples/s)")
    if index.skipped:
        first = index.skipped[0]
        console.print(
            f"[yellow]skipped {len(index.skipped)} input(s)[/], e.g. {first['path']}: {first['reason']} "
            "(all listed in index.json)"
        )
    for note in index.notes:
        console.print(f"note: {note}")


# --- verify ---------------------------------------------------------------------------------------


def check_sample(key: str, members: dict, index: DatasetIndex) -> tuple[list[str], tuple[int, int] | None]:
    """Problems with one sample, and its image's (height, width) when it decodes."""
    problems = []
    images = [s for s in members if s in IMAGE_EXTS]
    if len(images) != 1:
        return [f"{key}: expected one image member, found {sorted(members)}"], None
    try:  # the label as the loader reads it: index.json's label rule (our shards: the integer in KEY.cls)
        sample_label(members, index.label, class_ids(index))
    except ValueError as exc:
        problems.append(f"{key}: {exc}")
    for name, classes in index.extra_labels.items():
        suffix, text = f"{name}.cls", members.get(f"{name}.cls")
        if text is None:
            problems.append(f"{key}: no {suffix} member")
        elif not bytes(text).strip().isdigit() or int(text) >= len(classes):
            problems.append(f"{key}: {suffix} {bytes(text)[:20]!r} is not a label in 0..{len(classes) - 1}")
    name = f"{key}.{images[0]}"
    try:
        raw = decode_file(bytes(members[images[0]]))
        im = raw.convert("L" if index.channels == 1 else "RGB")
    except Exception as exc:
        return problems + [f"{name}: does not decode ({exc})"], None
    if len(im.getbands()) != index.channels:
        problems.append(f"{name}: decodes to {len(im.getbands())} channels, index says {index.channels}")
    return problems + check_geometry(name, raw, index), (im.height, im.width)


def check_geometry(name: str, im: Image.Image, index: DatasetIndex) -> list[str]:
    if index.image_size is not None:
        h, w = index.image_size
        return [] if im.size == (w, h) else [f"{name}: {im.width}x{im.height}, index says {w}x{h}"]
    problems = []
    if index.max_size is not None and min(im.size) > index.max_size:
        problems.append(f"{name}: {im.width}x{im.height} has a shorter side above max_size {index.max_size}")
    # Format 2 writers store only baseline RGB/L JPEGs (everything else is converted).
    if im.format == "JPEG" and index.format_version >= 2:
        if im.mode not in ("RGB", "L"):
            problems.append(f"{name}: a {im.mode} JPEG (the packer converts those)")
        if im.info.get("progressive") or im.info.get("progression"):
            problems.append(f"{name}: a progressive JPEG (the packer converts those)")
    return problems


def readable_groups(data: bytes) -> tuple[list[Group], str | None]:
    """The shard's samples up to the first damage in its tar structure, and that damage."""
    groups: list[Group] = []
    try:
        groups.extend(g for g in tar_groups(data) if g.is_sample)
    except ValueError as exc:
        return groups, str(exc)
    return groups, None


def shard_table(tables: str, shard: ShardInfo) -> tuple[SampleTable | None, list[str]]:
    """The shard's per-sample table if it has one that can be trusted, and why not if it cannot."""
    if shard.samples is None:
        return None, []
    try:
        return load_table(tables, shard), []
    except DataError as exc:
        return None, [f"{shard.file}: {exc}"]


def shard_samples(data: bytes, shard: ShardInfo, table: SampleTable | None, changed: bool) -> tuple[list, list[str]]:
    """(the key groups to check, problems): a changed shard with a table is read sample by sample, each
    sample checked against its own digest and named if it changed; otherwise the tar is walked."""
    if changed and table is not None:
        damaged = damaged_samples(data, table)
        problems = damaged[:MAX_NAMED_DAMAGED] + [f"{shard.file}: {len(damaged)} of {len(table.keys)} samples damaged"]
        if len(damaged) > MAX_NAMED_DAMAGED:
            problems.insert(MAX_NAMED_DAMAGED, f"{shard.file}: ... and {len(damaged) - MAX_NAMED_DAMAGED} more")
        groups = [intact_group(data, table, k) for k in range(len(table.keys))]
        return [g for g in groups if g is not None], problems
    groups, error = readable_groups(data)
    problems = [] if error is None else [f"{shard.file}: unreadable tar after {len(groups)} samples ({error})"]
    if len(groups) != shard.num_samples:
        problems.append(f"{shard.file}: {len(groups)} samples, index says {shard.num_samples}")
    if table is not None and not changed:
        # An intact shard's table must describe it exactly, or a later damage would be misjudged.
        made = sample_table(data, shard.file, shard.sha256, table.origins) if error is None else None
        if made is None or made.to_json() != table.to_json():
            problems.append(f"{shard.file}: its per-sample table {shard.samples} does not describe it")
    return groups, problems


def verify_shard(where: tuple[str, str], shard: ShardInfo, index: DatasetIndex, seen: set, dims: list) -> list[str]:
    """Problems of one shard; `where` is (where the tars are, where index.json and the tables are)."""
    try:
        data = read_bytes(where[0], shard.file)
    except DataError as exc:
        return [f"{shard.file}: missing or unreadable ({exc})"]
    problems = []
    if len(data) != shard.bytes:
        problems.append(f"{shard.file}: {len(data)} bytes, index says {shard.bytes}")
    changed = hashlib.sha256(data).hexdigest() != shard.sha256
    if changed:
        problems.append(f"{shard.file}: sha256 differs from the index (the file changed or is damaged)")
    table, found = shard_table(where[1], shard)
    groups, more = shard_samples(data, shard, table, changed)
    problems += found + more
    sample_problems = []
    for group in groups:
        if group.key in seen:
            sample_problems.append(f"{group.key}: key appears more than once")
        seen.add(group.key)
        found, size = check_sample(group.key, group.payloads(data), index)
        sample_problems += found
        if size is not None:
            dims.append(size)
    # A damaged shard can fail every sample: name a few, count the rest.
    problems += [f"{shard.file}: {p}" for p in sample_problems[:5]]
    if len(sample_problems) > 5:
        problems.append(f"{shard.file}: ... and {len(sample_problems) - 5} more sample problems")
    return problems


def verify(base: str | Path) -> list[str]:
    """Every problem of the dataset whose index.json is at `base` (a folder or URL), one line each."""
    base = str(base)
    index = read_index(base)
    where = (shards_at(base, index), base)
    problems: list[str] = []
    seen: set[str] = set()
    dims: list[tuple[int, int]] = []
    table = Table(title=f"verify {base}", title_justify="left")
    for col in ("split", "samples", "shards", "problems"):
        table.add_column(col, justify="left" if col == "split" else "right")
    with Progress(
        TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), console=console, transient=True
    ) as progress:
        for name, split in index.splits.items():
            task = progress.add_task(name, total=len(split.shards))
            found = []
            for shard in split.shards:
                found += verify_shard(where, shard, index, seen, dims)
                progress.advance(task)
            problems += found
            table.add_row(
                name, f"{split.num_samples:,}", str(len(split.shards)), str(len(found)) if found else "[green]0[/]"
            )
    console.print(table)
    # Only a complete read can check the recorded distribution; otherwise the problems above say why.
    if index.sizes is not None and not problems and index.sizes != size_stats(np.array(dims).reshape(-1, 2)):
        problems.append(f"sizes in {INDEX_NAME} differ from the images' own: {size_stats(np.array(dims))}")
    return problems


# --- command line ---------------------------------------------------------------------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def add_image_options(p: argparse.ArgumentParser) -> None:
    """The options that decide each stored image's size, channels and statistics."""
    p.add_argument(
        "--image-size",
        type=_int_at_least(1),
        help="resize (shorter side) + center-crop every image to N x N (default: each image keeps its own size); "
        "synthetic: image size (default 32)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="convert to 1 (L) or 3 (RGB) channels (default: the source's; imagefolder: 3 unless all grayscale)",
    )
    p.add_argument(
        "--max-size",
        type=_int_at_least(1),
        help=f"{' and '.join(RESIZABLE)}: shrink images whose shorter side is larger than N to N (Lanczos), "
        "keeping the aspect ratio; smaller images keep their size",
    )
    p.add_argument(
        "--stats-sample",
        type=_int_at_least(0),
        help=f"compute mean/std from N random train images, 0 = all (default: {DEFAULT_STATS_SAMPLE:,} for "
        "image-file sources, all for the others)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m resnet_dist.shard",
        description="Pack an image dataset into WebDataset shards + index.json. "
        "`python -m resnet_dist.shard verify DIR` re-checks a packed folder; "
        "`python -m resnet_dist.shard index DIR_OR_URL` indexes shards another tool wrote.",
    )
    p.add_argument("source", choices=SOURCES, help="source layout (see docs/shards.md)")
    p.add_argument("--root", type=Path, help="where the source lives (not for synthetic)")
    p.add_argument(
        "--out",
        help="output folder or object-store URL (s3://, gs://, az://, hf://; default: shards/<source>)",
    )
    p.add_argument(
        "--format",
        choices=("png", "jpeg"),
        help="encoding for images this tool encodes (default png, lossless; imagenet: jpeg, as its files are)",
    )
    p.add_argument(
        "--quality",
        type=_int_at_least(1),
        help=f"JPEG quality 1-95 of images encoded as JPEG: --format jpeg, and JPEG files that must be re-encoded "
        f"(--max-size, CMYK, progressive) (default {DEFAULT_JPEG_QUALITY})",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the write-time shuffle and of --val-fraction (default 0)"
    )
    p.add_argument(
        "--val-fraction", type=_fraction, help="carve a class-stratified val split of this fraction out of train"
    )
    p.add_argument(
        "--shard-size",
        type=_int_at_least(1),
        default=DEFAULT_SHARD_SIZE,
        help=f"samples per shard (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument(
        "--limit", type=_int_at_least(1), help="at most N samples per split (after the shuffle), for quick runs"
    )
    p.add_argument(
        "--workers",
        type=_int_at_least(1),
        default=min(os.cpu_count() or 1, 8),
        help="encoding processes (default: CPU count, at most 8); output is identical for any value",
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--strict", action="store_true", help="fail on an undecodable image instead of skipping it")
    p.add_argument("--download", action="store_true", help=f"fetch with torchvision first ({', '.join(DOWNLOADABLE)})")
    add_image_options(p)
    p.add_argument("--num-classes", type=_int_at_least(1), help="synthetic: classes (default 10)")
    p.add_argument(
        "--num-samples", type=_int_at_least(1), help="synthetic: train samples (default 1000; test gets a fifth)"
    )
    return p


def check_args(args: argparse.Namespace) -> None:
    """Option combinations argparse cannot express; one line each."""
    synthetic = args.source == "synthetic"
    if args.format is None:
        args.format = "jpeg" if args.source == "imagenet" else "png"
    if synthetic and args.root is not None:
        raise UsageError("synthetic takes no --root: it generates its images")
    if not synthetic and args.root is None:
        raise UsageError(f"{args.source} needs --root PATH (see docs/shards.md for its layout)")
    for flag, value in (("--num-classes", args.num_classes), ("--num-samples", args.num_samples)):
        if value is not None and not synthetic:
            raise UsageError(f"{flag} applies to synthetic only")
    if args.download and args.source not in DOWNLOADABLE:
        raise UsageError(f"--download supports {', '.join(DOWNLOADABLE)}, not {args.source}")
    if args.quality is not None and (args.quality > 95 or (args.format != "jpeg" and args.source not in FILE_SOURCES)):
        raise UsageError("--quality takes 1..95 and only applies with --format jpeg or to image files")
    if args.max_size is not None:
        if args.source not in RESIZABLE:
            raise UsageError(f"--max-size applies to {' and '.join(RESIZABLE)} only")
        if args.image_size is not None:
            raise UsageError("--max-size and --image-size exclude each other: pick one")
    if args.out is None:
        args.out = str(Path("shards") / args.source)
    check_location(args.out, "--out")
    if is_url(args.out):
        raise UsageError(f"--out {args.out}: cannot write to an http(s) URL (a folder or an object store: s3://...)")
    if not is_remote(args.out):
        args.out = local_path(args.out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        vp = OneLineParser(
            prog="python -m resnet_dist.shard verify", description="Re-read every shard of a packed folder."
        )
        vp.add_argument("dir", help="folder holding index.json, or its URL (s3://, gs://, hf://, ...)")
        folder = check_location(vp.parse_args(argv[1:]).dir, "verify")
        problems = verify(folder)
        # One line per problem, unwrapped (a rich console would wrap long ones at its width).
        sys.stderr.writelines(f"error: {p}\n" for p in problems)
        if problems:
            console.print(f"[red]{len(problems)} problem(s)[/]")
            return 1
        console.print("[green]ok[/]: every shard matches the index")
        return 0
    if argv[:1] == ["index"]:
        return index_main(argv[1:])
    args = build_parser().parse_args(argv)
    check_args(args)
    pack(args)
    return 0


def index_main(argv: list[str]) -> int:
    """`shard index`: make WebDataset shards written by other tools trainable (resnet_dist.foreign)."""
    from resnet_dist import foreign  # it builds on this module: imported here, not at the top (a cycle)

    ip = OneLineParser(
        prog="python -m resnet_dist.shard index",
        description="Scan WebDataset shards written by another tool (webdataset, timm, img2dataset) and write "
        "index.json (and a per-sample table per shard) so that they train.",
    )
    foreign.add_index_options(ip)
    args = ip.parse_args(argv)
    foreign.check_index_args(args)
    start = time.time()
    index, path = foreign.index_shards(args)
    summarize(index, path.parent, time.time() - start)
    if index.shard_base:
        console.print(f"shards stay at {index.shard_base}; train with --data {path.parent}")
    return 0


if __name__ == "__main__":
    run_cli(main)
