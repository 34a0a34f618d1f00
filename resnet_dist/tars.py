"""WebDataset tars, read in memory: members, samples grouped by key, and each sample's byte range.

The loader (resnet_dist.data), the packer's per-sample table (resnet_dist.shard) and `shard index`
for foreign shards all read tars through here, so they agree on what a sample is: consecutive
members sharing a key (the path up to the basename's first dot, webdataset's rule), of which only
groups holding an image member count. That rule is what index.json's per-shard `num_samples` counts.

Why not webdataset's tar iterator: it goes through Python's tarfile, whose per-member header parsing
(TarInfo.frombuf, nti, nts) was half of a loader worker's time on 28 px PNG shards, where a sample is
two 512-byte headers around ~500 bytes of payload. Measured (docs/performance.md, section 1): 9.5 us
per sample here against 51 us for webdataset's iterator on a Fashion-MNIST shard. A shard is already
whole in memory, so a header is 512 bytes of a memoryview and a member's payload is a slice, and
members of samples outside the piece are skipped without copying.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")
BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # what tarfile.isreg() calls a file (sparse "S" files are refused)
SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: no payload
META = re.compile(r"__[^/]*__($|/)")  # webdataset skips these names


def _text(field) -> str:
    return bytes(field).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field) -> int:
    """A numeric header field as tarfile reads it: octal text, or GNU base-256 if the top bit is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    return int(bytes(field).split(b"\0", 1)[0].strip() or b"0", 8)  # ValueError on damage


def _pax(payload) -> dict[str, str]:
    """Records `LENGTH key=value\\n` of a pax extended header."""
    fields, pos, payload = {}, 0, bytes(payload)
    while pos < len(payload) and payload[pos]:
        length = int(payload[pos : payload.index(b" ", pos)])
        if not pos < pos + length <= len(payload):  # a length of 0 would never advance: a hang, not an error
            raise ValueError(f"damaged pax record length {length}")
        key, _, value = payload[payload.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


def tar_entries(data: bytes) -> Iterator[tuple[str, int, int, int]]:
    """(name, header offset, payload offset, payload size) of each regular file of an in-memory tar.

    The header offset is where the member's first header block starts, GNU long-name and pax headers
    included, so [header offset, end of padded payload) is the member's whole byte range.
    Reads what tarfile reads: ustar (with its name prefix), GNU (././@LongLink names) and pax headers
    (`path` and `size` override the next member's), skips directories, links and other non-files, and
    stops at the first zero block. Unlike tarfile, which silently ends the archive at a header whose
    checksum is wrong, a damaged header or a member cut short raises ValueError.
    """
    view = memoryview(data)
    # Every block's byte sum in one numpy pass: a header's checksum is then one subtraction, not a
    # 512-step Python sum (3 us per header, more than the rest of its parsing).
    sums = np.frombuffer(view[: len(data) // BLOCK * BLOCK], np.uint8).reshape(-1, BLOCK).sum(axis=1, dtype=np.int64)
    offset, name, size, first = 0, None, None, None  # name, size, first: from preceding long-name/pax headers
    while offset + BLOCK <= len(data):
        header, total = view[offset : offset + BLOCK], int(sums[offset // BLOCK])
        if not total:
            return  # end-of-archive marker
        unsigned = total - sum(header[148:156]) + 8 * 32  # the checksum field counts as 8 spaces
        stored = _number(header[148:156])
        if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in header):  # signed sum: old tars
            raise ValueError(f"tar header at byte {offset}: checksum mismatch")
        kind, start = bytes(header[156:157]), offset + BLOCK
        first = offset if first is None else first
        length = 0 if kind in SKIPPED else size if size is not None and kind in REGULAR else _number(header[124:136])
        if start + length > len(data):
            raise ValueError(f"tar member at byte {offset} is cut short")
        offset = start + -(-length // BLOCK) * BLOCK
        payload = view[start : start + length]
        if kind == b"L":
            name = _text(payload)
        elif kind in (b"x", b"X"):
            pax = _pax(payload)
            name, size = pax.get("path", name), int(pax["size"]) if "size" in pax else size
        elif kind == b"S":
            raise ValueError(f"tar member at byte {start - BLOCK}: GNU sparse files are not supported")
        elif kind not in (b"K", b"g"):  # K: a long link target, g: global pax fields (neither names a file)
            if kind in REGULAR:
                if name is None:
                    name, prefix = _text(header[0:100]), _text(header[345:500])
                    name = f"{prefix}/{name}" if prefix else name
                if not (kind == b"\0" and name.endswith("/")):  # old tars mark directories by the slash
                    yield name, first, start, length
            name, size, first = None, None, None


def tar_members(data: bytes) -> Iterator[tuple[str, int, int]]:
    """(name, payload offset, payload size) of each regular file of an in-memory tar, in order."""
    for name, _, start, size in tar_entries(data):
        yield name, start, size


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """webdataset's sample key and extension: the path up to the basename's first dot, and the rest."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name[:dot], name[dot + 1 :]) if dot > slash else (None, None)


@dataclass
class Group:
    """Consecutive members sharing a key: their payloads by lower-cased extension, and the byte range
    [start, end) from the first member's first header to the end of the last member's padding."""

    key: str
    start: int
    end: int
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (payload offset, size)

    @property
    def is_sample(self) -> bool:
        return any(ext in IMAGE_EXTS for ext in self.members)

    def payloads(self, data: bytes) -> dict[str, bytes]:
        return {ext: data[start : start + size] for ext, (start, size) in self.members.items()}


def tar_groups(data: bytes) -> Iterator[Group]:
    """Every key group of an in-memory tar, in order, webdataset's metadata members (__x__) left out.

    Raises ValueError on a damaged tar or a repeated extension within a group (webdataset's rule).
    """
    group = None
    for name, first, start, size in tar_entries(data):
        if name.startswith("__") and (name.endswith("__") and "/" not in name or META.match(name)):
            continue  # webdataset's metadata members
        base, ext = base_plus_ext(name)
        if base is None:
            continue
        if group is None or base != group.key:
            if group is not None:
                yield group
            group = Group(base, first, 0)
        ext = ext.lower()
        if ext in group.members:
            raise ValueError(f"{name}: duplicate file name in tar file {ext}")
        group.members[ext] = (start, size)
        group.end = start + -(-size // BLOCK) * BLOCK
    if group is not None:
        yield group


class _Piece(Protocol):
    skip: int
    take: int

    @property
    def file(self) -> str: ...


def tar_samples(data: bytes, piece: _Piece) -> Iterator[dict]:
    """Samples skip..skip+take of a tar held in memory, as dicts {"__key__", "__url__", ext: bytes}.

    Only groups with an image member are samples (the count index.json records); the members of
    samples before `skip` are counted, not copied. Raises ValueError as tar_groups does.
    """
    count = 0
    for group in tar_groups(data):
        if not group.is_sample:
            continue
        count += 1
        if count > piece.skip + piece.take:
            return
        if count > piece.skip:
            yield {"__key__": group.key, "__url__": piece.file, **group.payloads(data)}


# --- per-sample table -----------------------------------------------------------------------------
# A shard's samples, each with its byte range and a digest of those bytes, kept in a sidecar file
# beside index.json ("samples-SHA.json"). A reader whose shard fails its whole-file sha256 checks
# each sample's own bytes and loses only those that changed; the offsets let the train loader seek
# straight to the samples it delivers (resnet_dist.data.SeekReader). Why a sidecar and not
# index.json: at ImageNet scale (1.28 M samples) the table is ~120 MB of JSON (~400 MB of Python
# objects) that every process would parse at start; a sidecar is read only with its shard
# (docs/shard-format.md). Why blake2b-64 per sample: random damage is what it must catch, and 16 hex
# digits keep the sidecar at ~80-95 bytes a sample, origins included.

# Named by the shard's content, not its file name: a name holding a split word ("train-000000...") is
# taken for a data file of that split by Hugging Face datasets' `data_dir=` loading, which then fails
# reading the table as a tar; 16 hex digits can never spell train/val/test.
SIDECAR_RE = re.compile(r"^samples-[0-9a-f]{16}\.json$")
SIDECAR_FORMAT = "resnet-dist-samples"
DIGEST = "blake2b-64"


def sidecar_name(shard_sha256: str) -> str:
    return f"samples-{shard_sha256[:16]}.json"


def sample_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass
class SampleTable:
    """One shard's samples in tar order: key, byte range [offset, offset + size), digest, origin."""

    shard: str
    shard_sha256: str
    keys: list[str]
    offsets: list[int]
    sizes: list[int]
    digests: list[str]
    origins: list[str | None]  # where each sample came from (a path relative to --root, a dataset id)

    def to_json(self) -> dict:
        return {
            "format": SIDECAR_FORMAT,
            "version": 1,
            "shard": self.shard,
            "shard_sha256": self.shard_sha256,
            "digest": DIGEST,
            "keys": self.keys,
            "offsets": self.offsets,
            "sizes": self.sizes,
            "digests": self.digests,
            "origins": self.origins,
        }


def sample_table(data: bytes, shard: str, shard_sha256: str, origins: list[str | None] | None = None) -> SampleTable:
    """The table of an intact shard held in memory; origins, if given, in sample order."""
    groups = [g for g in tar_groups(data) if g.is_sample]
    if origins is not None and len(origins) != len(groups):
        raise ValueError(f"{shard}: {len(groups)} samples but {len(origins)} origins")
    return SampleTable(
        shard=shard,
        shard_sha256=shard_sha256,
        keys=[g.key for g in groups],
        offsets=[g.start for g in groups],
        sizes=[g.end - g.start for g in groups],
        digests=[sample_digest(data[g.start : g.end]) for g in groups],
        origins=list(origins) if origins is not None else [None] * len(groups),
    )


def parse_table(obj: object, where: str) -> SampleTable:
    """A decoded sidecar, checked for shape; ValueError naming `where` if it is not one."""
    fields = ("keys", "offsets", "sizes", "digests", "origins")
    if not isinstance(obj, dict) or obj.get("format") != SIDECAR_FORMAT or obj.get("version") != 1:
        raise ValueError(f"{where}: not a {SIDECAR_FORMAT} version 1 file")
    if obj.get("digest") != DIGEST or not all(isinstance(obj.get(f), list) for f in fields):
        raise ValueError(f"{where}: expected digest {DIGEST} and lists {', '.join(fields)}")
    n = len(obj["keys"])
    if any(len(obj[f]) != n for f in fields):
        raise ValueError(f"{where}: its lists differ in length")
    # Type sets, not a Python loop per value: the train loader loads the table of every shard in every
    # worker (resnet_dist.data.SeekReader), so this check runs over the whole dataset once per worker.
    numbers = obj["offsets"] + obj["sizes"]
    ints = set(map(type, numbers)) <= {int} and (not numbers or min(numbers) >= 0)  # type(True) is bool
    if not ints or not set(map(type, obj["keys"] + obj["digests"])) <= {str}:
        raise ValueError(f"{where}: offsets and sizes must be integers >= 0, keys and digests strings")
    return SampleTable(
        shard=str(obj.get("shard", "")),
        shard_sha256=str(obj.get("shard_sha256", "")),
        **{f: list(obj[f]) for f in fields},
    )


# --- labels ---------------------------------------------------------------------------------------


def sample_label(members: dict, rule: dict, class_ids: dict[str, int]) -> int:
    """A sample's label by index.json's `label` rule: {"member": cls|json|txt, "field", "by": index|name}.

    `class_ids` maps class names to ids (for "by": "name"). ValueError with a short reason if the member
    is missing, unreadable, or names no known class; the caller says which sample.
    """
    member = rule["member"]
    raw = members.get(member)
    if raw is None:
        raise ValueError(f"no {member} member")
    try:
        value: object = bytes(raw).decode("utf-8").strip()
        if member == "json":
            obj = json.loads(value)
            if not isinstance(obj, dict) or rule["field"] not in obj:
                raise ValueError(f"json has no field {rule['field']!r}")
            value = obj[rule["field"]]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{member} is not readable text ({exc})") from None
    if rule["by"] == "name":
        if str(value) not in class_ids:
            raise ValueError(f"{member} names no known class: {str(value)[:40]!r}")
        return class_ids[str(value)]
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise ValueError(f"{member} label is not a non-negative integer: {str(value)[:40]!r}")
    label = int(value)
    if label >= len(class_ids):
        raise ValueError(f"{member} label {label} outside 0..{len(class_ids) - 1}")
    return label
