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

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
IMAGE_FORMATS = ("png", "jpeg")


@dataclass(frozen=True)
class ShardInfo:
    file: str  # a bare file name inside the dataset folder
    num_samples: int
    sha256: str  # of the whole tar file
    bytes: int


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    shards: tuple[ShardInfo, ...]


@dataclass
class DatasetIndex:
    source: str
    classes: list[str]
    image_size: tuple[int, int]  # (height, width)
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        obj: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "channels": self.channels,
            "format": self.format,
            "mean": list(self.mean),
            "std": list(self.std),
            "splits": {
                name: {
                    "num_samples": split.num_samples,
                    "shards": [
                        {"file": s.file, "num_samples": s.num_samples, "sha256": s.sha256, "bytes": s.bytes}
                        for s in split.shards
                    ],
                }
                for name, split in self.splits.items()
            },
        }
        # Present only when shards carry KEY.coarse.cls (the contract says so).
        if self.extra_labels:
            obj["extra_labels"] = {k: list(v) for k, v in self.extra_labels.items()}
        obj.update(
            skipped=list(self.skipped),
            notes=list(self.notes),
            args=dict(self.args),
            created=self.created,
            tool=self.tool,
        )
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
    sha = _get(obj, "sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _bad(where, f"shard {file}: sha256 must be 64 lowercase hex digits")
    return ShardInfo(
        file=file,
        num_samples=_positive_int(obj, "num_samples", f"{where} shard {file}"),
        sha256=sha,
        bytes=_positive_int(obj, "bytes", f"{where} shard {file}"),
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


def parse_index(obj: dict, where: str) -> DatasetIndex:
    """Validate a decoded index.json; DataError with one line naming `where` on any problem."""
    if not isinstance(obj, dict):
        raise _bad(where, "index must be a JSON object")
    version = _get(obj, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise _bad(where, f"format_version {version} is not supported (expected {FORMAT_VERSION})")
    classes = _str_list(obj, "classes", where)
    if not classes:
        raise _bad(where, "classes is empty")
    if "num_classes" in obj and _get(obj, "num_classes", int, where) != len(classes):
        raise _bad(where, f"num_classes is {obj['num_classes']} but there are {len(classes)} class names")
    size = _get(obj, "image_size", list, where)
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise _bad(where, f"image_size must be [height, width] of positive integers, got {size!r}")
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
        image_size=(size[0], size[1]),
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
