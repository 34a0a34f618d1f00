"""index.json in code: the one contract between the shard writer and the trainer.

docs/shard-format.md is the prose version. Both halves go through `parse_index`, so a field the
writer forgets or a trainer-side assumption the writer breaks fails here, with one line, instead of
deep inside a data loader worker.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnet_dist.errors import DataError
from resnet_dist.filesafe import fsync_dir

# Version 2: `image_size` may be null (sizes vary), plus `sizes`, `max_size`, `conversions` and
# `stats_sample`. Version 3 (this writer): each shard may name its per-sample table (`samples`, a sidecar
# beside index.json: resnet_dist.tars), `shard_base` says where the tars are when not beside index.json
# (foreign shards indexed by `shard index`), `label` says which member holds the label. Older indexes read.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
INDEX_NAME = "index.json"
IMAGE_FORMATS = ("png", "jpeg", "webp", "mixed")
LABEL_MEMBERS = ("cls", "json", "txt")
DEFAULT_LABEL = {"member": "cls", "field": None, "by": "index"}
SIZE_FIELDS = ("height", "width", "shorter_side", "longer_side")


@dataclass(frozen=True)
class ShardInfo:
    file: str  # a bare file name inside the dataset folder
    num_samples: int
    sha256: str  # of the whole tar file
    bytes: int
    samples: str | None = None  # its per-sample table, a file beside index.json (resnet_dist.tars)


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    shards: tuple[ShardInfo, ...]


@dataclass
class DatasetIndex:
    source: str
    classes: list[str]
    image_size: tuple[int, int] | None  # (height, width); None: sizes vary (see `sizes`)
    channels: int
    format: str
    mean: list[float]
    std: list[float]
    splits: dict[str, SplitInfo]
    extra_labels: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    args: dict = field(default_factory=dict)
    created: str = ""
    tool: str = ""
    # {"height"|"width"|"shorter_side"|"longer_side": {"min", "median", "max"}} over every packed image.
    sizes: dict[str, dict[str, int]] | None = None
    max_size: int | None = None  # --max-size: no stored image has a shorter side above it
    conversions: dict[str, int] = field(default_factory=dict)  # images not copied byte-for-byte, by reason
    stats_sample: dict[str, int] | None = None  # {"images", "of", "seed"}: what mean/std were computed from
    # Where the tars are, when not beside index.json: an absolute path or URL (foreign shards).
    shard_base: str | None = None
    # Which member holds a sample's label: {"member": cls|json|txt, "field": json key or None,
    # "by": "index" (an integer) or "name" (a class name, looked up in `classes`)}.
    label: dict = field(default_factory=lambda: dict(DEFAULT_LABEL))
    # As read; what to_json writes is always FORMAT_VERSION. Version 1 writers copied CMYK JPEGs as they were.
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        obj: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "image_size": None if self.image_size is None else list(self.image_size),
            "channels": self.channels,
            "format": self.format,
            "mean": list(self.mean),
            "std": list(self.std),
            "splits": {
                name: {
                    "num_samples": split.num_samples,
                    "shards": [_shard_json(s) for s in split.shards],
                }
                for name, split in self.splits.items()
            },
        }
        # Present only when shards carry KEY.coarse.cls (the contract says so).
        if self.extra_labels:
            obj["extra_labels"] = {k: list(v) for k, v in self.extra_labels.items()}
        obj.update(
            sizes=None if self.sizes is None else {k: dict(v) for k, v in self.sizes.items()},
            max_size=self.max_size,
            conversions=dict(self.conversions),
            stats_sample=None if self.stats_sample is None else dict(self.stats_sample),
            shard_base=self.shard_base,
            label=dict(self.label),
            skipped=list(self.skipped),
            notes=list(self.notes),
            args=dict(self.args),
            created=self.created,
            tool=self.tool,
        )
        return obj


def _shard_json(s: ShardInfo) -> dict:
    obj = {"file": s.file, "num_samples": s.num_samples, "sha256": s.sha256, "bytes": s.bytes}
    if s.samples is not None:
        obj["samples"] = s.samples
    return obj


# --- validation: small checkers that raise DataError naming `where` and the field -----------------


def _bad(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}")


def _get(obj: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in obj:
        if default is not ...:
            return default
        raise _bad(where, f"missing field '{key}'")
    value = obj[key]
    # bool is an int subclass; a count of True is a bug, not a count.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _bad(where, f"field '{key}' must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise _bad(where, f"field '{key}' must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _str_list(obj: dict, key: str, where: str, default: Any = ...) -> list[str]:
    value = _get(obj, key, list, where, default)
    if not all(isinstance(v, str) for v in value):
        raise _bad(where, f"field '{key}' must be a list of strings")
    return list(value)


def _float_list(obj: dict, key: str, where: str) -> list[float]:
    value = _get(obj, key, list, where)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _bad(where, f"field '{key}' must be a list of numbers")
    return [float(v) for v in value]


def _positive_int(obj: dict, key: str, where: str) -> int:
    value = _get(obj, key, int, where)
    if value <= 0:
        raise _bad(where, f"field '{key}' must be > 0, got {value}")
    return value


def _check_file_name(name: str, where: str) -> None:
    # The trainer joins this to the dataset folder: a path here could point anywhere.
    if not name or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise _bad(where, f"shard file name {name!r} must be a plain file name")


def _parse_shard(obj: Any, where: str) -> ShardInfo:
    if not isinstance(obj, dict):
        raise _bad(where, "each shard must be an object")
    file = _get(obj, "file", str, where)
    _check_file_name(file, where)
    samples = _get(obj, "samples", (str, type(None)), where, None)
    if samples is not None:
        _check_file_name(samples, where)
    sha = _get(obj, "sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _bad(where, f"shard {file}: sha256 must be 64 lowercase hex digits")
    return ShardInfo(
        file=file,
        num_samples=_positive_int(obj, "num_samples", f"{where} shard {file}"),
        sha256=sha,
        bytes=_positive_int(obj, "bytes", f"{where} shard {file}"),
        samples=samples,
    )


def _parse_split(name: str, obj: Any, where: str) -> SplitInfo:
    where = f"{where} split '{name}'"
    if not isinstance(obj, dict):
        raise _bad(where, "must be an object")
    count = _positive_int(obj, "num_samples", where)
    shards = tuple(_parse_shard(s, where) for s in _get(obj, "shards", list, where))
    if not shards:
        raise _bad(where, "has no shards")
    total = sum(s.num_samples for s in shards)
    if total != count:
        raise _bad(where, f"num_samples is {count} but its shards hold {total}")
    return SplitInfo(num_samples=count, shards=shards)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_size(obj: dict, version: int, where: str) -> tuple[int, int] | None:
    if version >= 2 and _get(obj, "image_size", (list, type(None)), where) is None:
        return None  # sizes vary: each image keeps its own
    size = _get(obj, "image_size", list, where)
    if len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
        raise _bad(where, f"image_size must be [height, width] of positive integers, got {size!r}")
    return size[0], size[1]


def _parse_sizes(obj: dict, image_size: tuple[int, int] | None, where: str) -> dict[str, dict[str, int]] | None:
    sizes = _get(obj, "sizes", (dict, type(None)), where, None)
    if sizes is None:
        return None
    if sorted(sizes) != sorted(SIZE_FIELDS):
        raise _bad(where, f"sizes must have exactly {', '.join(SIZE_FIELDS)}, got {sorted(sizes)}")
    out = {}
    for name in SIZE_FIELDS:
        stat = sizes[name]
        ok = isinstance(stat, dict) and sorted(stat) == ["max", "median", "min"]
        if not ok or not all(_is_int(v) for v in stat.values()) or not 0 < stat["min"] <= stat["median"] <= stat["max"]:
            raise _bad(where, f"sizes.{name} must be {{min, median, max}} with 0 < min <= median <= max, got {stat!r}")
        out[name] = {k: stat[k] for k in ("min", "median", "max")}
    if image_size is not None:
        # A fixed image_size is a claim about every image: the distribution must be that one point.
        for name, side in (("height", image_size[0]), ("width", image_size[1])):
            if not out[name]["min"] == out[name]["max"] == side:
                raise _bad(
                    where, f"sizes.{name} spans {out[name]['min']}..{out[name]['max']} but image_size says {side}"
                )
    elif out["height"]["min"] == out["height"]["max"] and out["width"]["min"] == out["width"]["max"]:
        raise _bad(where, "image_size is null but sizes say every image is the same size")
    return out


def _v2_fields(obj: dict, image_size: tuple[int, int] | None, where: str) -> dict[str, Any]:
    """sizes, max_size, conversions, stats_sample: optional (version 1 has none), checked when present."""
    max_size = _get(obj, "max_size", (int, type(None)), where, None)
    if max_size is not None and max_size <= 0:
        raise _bad(where, f"max_size must be > 0 or null, got {max_size}")
    sizes = _parse_sizes(obj, image_size, where)
    if max_size is not None and sizes is not None and sizes["shorter_side"]["max"] > max_size:
        raise _bad(where, f"sizes.shorter_side.max {sizes['shorter_side']['max']} exceeds max_size {max_size}")
    conversions = _get(obj, "conversions", dict, where, {})
    if not all(_is_int(v) and v > 0 for v in conversions.values()):
        raise _bad(where, f"conversions must map each kind to a count > 0, got {conversions!r}")
    sample = _get(obj, "stats_sample", (dict, type(None)), where, None)
    if sample is not None:
        ok = sorted(sample) == ["images", "of", "seed"] and all(_is_int(v) for v in sample.values())
        if not ok or not 0 < sample["images"] <= sample["of"]:
            raise _bad(where, f"stats_sample must be {{images, of, seed}} with 0 < images <= of, got {sample!r}")
        sample = dict(sample)
    return {"sizes": sizes, "max_size": max_size, "conversions": dict(conversions), "stats_sample": sample}


def _v3_fields(obj: dict, where: str) -> dict[str, Any]:
    """shard_base and label: optional (older versions have neither), checked when present."""
    base = _get(obj, "shard_base", (str, type(None)), where, None)
    if base is not None and not base:
        raise _bad(where, "shard_base must be a path or URL, or null")
    label = _get(obj, "label", dict, where, DEFAULT_LABEL)
    if sorted(label) != ["by", "field", "member"]:
        raise _bad(where, f"label must have exactly by, field, member, got {sorted(label)}")
    if label["member"] not in LABEL_MEMBERS or label["by"] not in ("index", "name"):
        raise _bad(where, f"label.member must be one of {', '.join(LABEL_MEMBERS)} and label.by index or name")
    if (label["member"] == "json") != isinstance(label["field"], str):
        raise _bad(where, "label.field names the json key for member json, and is null otherwise")
    return {"shard_base": base, "label": dict(label)}


def parse_index(obj: dict, where: str) -> DatasetIndex:
    """Validate a decoded index.json; DataError with one line naming `where` on any problem."""
    if not isinstance(obj, dict):
        raise _bad(where, "index must be a JSON object")
    version = _get(obj, "format_version", int, where)
    if version not in READABLE_VERSIONS:
        raise _bad(where, f"format_version {version} is not supported (expected one of {READABLE_VERSIONS})")
    classes = _str_list(obj, "classes", where)
    if not classes:
        raise _bad(where, "classes is empty")
    if "num_classes" in obj and _get(obj, "num_classes", int, where) != len(classes):
        raise _bad(where, f"num_classes is {obj['num_classes']} but there are {len(classes)} class names")
    size = _image_size(obj, version, where)
    channels = _get(obj, "channels", int, where)
    if channels not in (1, 3):
        raise _bad(where, f"channels must be 1 or 3, got {channels}")
    fmt = _get(obj, "format", str, where)
    if fmt not in IMAGE_FORMATS:
        raise _bad(where, f"format must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    mean, std = _float_list(obj, "mean", where), _float_list(obj, "std", where)
    if not len(mean) == len(std) == channels:
        raise _bad(where, f"mean and std must have {channels} values each, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise _bad(where, f"std must be > 0, got {std}")
    raw_splits = _get(obj, "splits", dict, where)
    if not raw_splits:
        raise _bad(where, "has no splits")
    splits = {name: _parse_split(name, value, where) for name, value in raw_splits.items()}
    files = [s.file for split in splits.values() for s in split.shards]
    if len(set(files)) != len(files):
        raise _bad(where, "a shard file is listed twice")
    extra = _get(obj, "extra_labels", dict, where, {})
    for key, names in extra.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
            raise _bad(where, f"extra_labels '{key}' must be a non-empty list of strings")
    skipped = _get(obj, "skipped", list, where, [])
    if not all(isinstance(s, dict) for s in skipped):
        raise _bad(where, "skipped must be a list of objects")
    return DatasetIndex(
        source=_get(obj, "source", str, where),
        classes=classes,
        image_size=size,
        channels=channels,
        format=fmt,
        mean=mean,
        std=std,
        splits=splits,
        extra_labels={k: list(v) for k, v in extra.items()},
        skipped=list(skipped),
        notes=_str_list(obj, "notes", where, []),
        args=dict(_get(obj, "args", dict, where, {})),
        created=_get(obj, "created", str, where, ""),
        tool=_get(obj, "tool", str, where, ""),
        **_v2_fields(obj, size, where),
        **_v3_fields(obj, where),
        format_version=version,
    )


def load_index(folder: Path) -> DatasetIndex:
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{path} not found: build the dataset with `python -m resnet_dist.shard`")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    return parse_index(obj, str(path))


def write_index(folder: Path, index: DatasetIndex) -> Path:
    """Write index.json atomically: readers see the old index or the whole new one, never half."""
    folder = Path(folder)
    text = json.dumps(index.to_json(), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".index.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the index from other users of the shards
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / INDEX_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(folder, best_effort=True)
    return folder / INDEX_NAME


def shards_at(base: str, index: DatasetIndex) -> str:
    """Where the index's tars are: its `shard_base` (foreign shards indexed elsewhere), else beside it."""
    return index.shard_base or base


def class_ids(index: DatasetIndex) -> dict[str, int]:
    return {name: i for i, name in enumerate(index.classes)}
