"""Per-sample integrity: which samples of a changed shard are still exactly what was packed.

A shard whose size or sha256 differs from index.json used to lose all its samples. With its
per-sample table (the sidecar resnet_dist.tars.SampleTable, beside index.json) each sample's own byte
range is checked against its own digest: the samples whose bytes are unchanged are read as usual,
and only the changed ones are lost, each named by shard, key and origin. The loader
(resnet_dist.data.read_piece) and `python -m resnet_dist.shard verify` both judge samples here.

The whole-shard read gets here only for a shard that already failed its sha256. The train loader
(resnet_dist.data.SeekReader) checks each sample it delivers with intact_group, in place of the sha256.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from resnet_dist.errors import DataError
from resnet_dist.index import ShardInfo
from resnet_dist.storage import read_bytes
from resnet_dist.tars import Group, SampleTable, parse_table, sample_digest, tar_groups

# A badly damaged shard must not turn into thousands of warnings: the first few changed samples of a
# read are named one by one, the rest share one line (verify names every one).
NAMED_PER_PIECE = 5
VERIFY = "python -m resnet_dist.shard verify"


def load_table(base: str, shard: ShardInfo) -> SampleTable:
    """The shard's per-sample table from `base` (where index.json is); DataError if it cannot be trusted."""
    name = shard.samples
    raw = read_bytes(base, name)
    try:
        table = parse_table(json.loads(raw.decode("utf-8")), name)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise DataError(f"{name}: unreadable per-sample table ({exc})") from None
    # A table of another version of the shard would check the wrong bytes: it must be this one's.
    if table.shard_sha256 != shard.sha256 or len(table.keys) != shard.num_samples:
        raise DataError(f"{name}: describes another version of {shard.file} than index.json does")
    return table


def intact_group(data: bytes, table: SampleTable, k: int) -> Group | None:
    """Sample k's key group, with payload offsets into `data`, if its bytes are exactly those packed."""
    start, size = table.offsets[k], table.sizes[k]
    if start + size > len(data):
        return None
    view = memoryview(data)[start : start + size]
    if sample_digest(view) != table.digests[k]:
        return None
    try:
        group = next((g for g in tar_groups(view) if g.is_sample), None)
    except ValueError:  # cannot happen to bytes the writer made; a table from another writer could say so
        return None
    if group is None or group.key != table.keys[k]:
        return None
    group.members = {ext: (start + at, n) for ext, (at, n) in group.members.items()}
    return group


def damage(table: SampleTable, k: int, data_len: int) -> str:
    """Why sample k is not the one packed, naming the shard, its key and where it came from."""
    origin = f" (from {table.origins[k]})" if table.origins[k] else ""
    sample = f"{table.shard}: sample {table.keys[k]}{origin}"
    if table.offsets[k] + table.sizes[k] > data_len:
        return f"{sample} lies past the shard's end (cut short at byte {data_len})"
    return f"{sample} changed since it was packed (its bytes differ from its digest)"


def checked_samples(data: bytes, table: SampleTable, file: str, skip: int, take: int) -> Iterator[dict | str]:
    """Samples skip..skip+take of a changed shard, in order: the sample dict where its bytes are intact,
    else the reason it is lost (a string)."""
    named, cut = 0, None
    for k in range(skip, skip + take):
        group = intact_group(data, table, k)
        if group is not None:
            yield {"__key__": group.key, "__url__": file, **group.payloads(data)}
        elif table.offsets[k] + table.sizes[k] > len(data):
            # Everything past a cut goes with one line: the cut is one cause.
            cut = cut or f"{file}: cut short at byte {len(data)}: samples from {table.keys[k]} on are lost"
            yield cut
        elif named < NAMED_PER_PIECE:
            named += 1
            yield damage(table, k, len(data))
        else:
            yield f"{file}: more samples changed since they were packed (`{VERIFY}` names each)"


def damaged_samples(data: bytes, table: SampleTable) -> list[str]:
    """Every sample of the shard that is not the one packed, each named (verify)."""
    return [damage(table, k, len(data)) for k in range(len(table.keys)) if intact_group(data, table, k) is None]
