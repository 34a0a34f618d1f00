"""`python -m resnet_dist.shard index DIR_OR_URL`: index.json for WebDataset shards another tool wrote.

Shards written by webdataset's ShardWriter, by plain `tar` in timm's layout (imagenet1k-train-0000.tar
with .jpg/.cls/.json and an `_info.json`) or by img2dataset (00000.tar with .jpg/.txt/.json) hold no
index of ours. This reads every shard once: its sha256, size and per-sample table (tars.sample_table, the
same reader the loader uses, so the counts agree), each image's header (sizes, channels, format), each
sample's label by one rule (index.json's `label`), and decodes a bounded seeded sample of train images for
mean/std. The shards themselves are never written: when their folder is read-only or remote, index.json
and the sidecars go to --out and index.json's `shard_base` says where the tars are.

A sample is a key group with an image member (tars.py), whatever its label: the loader counts it so. A
sample whose label cannot be read is therefore kept in the counts, listed in index.json's `skipped` and
lost (reported, not trained on) at train time; --strict refuses the shards instead.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import re
import urllib.parse
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from resnet_dist import __version__
from resnet_dist.crops import image_size
from resnet_dist.errors import DataError, UsageError
from resnet_dist.filesafe import write_json_atomic
from resnet_dist.index import INDEX_NAME, DatasetIndex, ShardInfo, SplitInfo, parse_index, write_index
from resnet_dist.shard import DEFAULT_STATS_SAMPLE, GRAY_MODES, SPLIT_RE, PixelStats, console, size_stats
from resnet_dist.storage import list_files, read_bytes
from resnet_dist.tars import IMAGE_EXTS, sample_label, sample_table, sidecar_name, tar_groups

# File-name words that name a split (timm's "validation" is the trainer's "val").
SPLIT_WORDS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
SPLIT_TOKEN = re.compile(r"(?:^|[-_.])(train|validation|valid|val|test)(?=[-_.]|$)", re.IGNORECASE)
INFO_NAMES = ("_info.json", "info.json")  # the names timm's reader_wds tries, in its order
FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
AUTO_JSON_FIELD = "label"  # --label auto: the json field tried when a sample has no .cls


# --- where the shards are --------------------------------------------------------------------------


@dataclass
class Location:
    base: str  # an absolute folder or a URL prefix, without a trailing slash
    names: list[str]  # the tar files, bare names inside base
    local: bool
    info: dict | None = None  # timm's _info.json, if there is one
    info_name: str | None = None


def _local_path(source: str) -> str | None:
    """The local path a source names (a plain path or file://), None for any other URL."""
    if source.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(source).path)
    return None if "://" in source else source


def _expand(source: str) -> tuple[str, list[str]]:
    """A brace pattern (`.../name-{0000..0099}.tar`) as (folder, names): one folder, as index.json names files."""
    heads, names = set(), []
    for item in braceexpand(source):
        head, _, name = item.rpartition("/")
        heads.add(head)
        names.append(name)
    if len(heads) != 1 or not all(names):
        raise UsageError(f"{source}: a brace pattern must expand to files of one folder")
    return heads.pop(), names


def locate(source: str) -> Location:
    """The shards `source` names: a folder, file://, a brace pattern, or any URL storage can list."""
    brace = "{" in source  # webdataset's shard-list notation: {0000..0099} ranges and {a,b} lists
    head, names = _expand(source) if brace else (source.rstrip("/") or "/", None)
    path = _local_path(head)
    if path is not None:
        head = str(Path(path).resolve())
        if not Path(head).is_dir():
            raise DataError(f"{source}: no such folder")
    listing = names if names is not None else list_files(head)
    tars = sorted(n for n in listing if n.endswith(".tar"))
    if not tars:
        raise DataError(f"{source}: no .tar files there")
    loc = Location(head, tars, path is not None)
    for name in INFO_NAMES:
        if names is not None and not loc.local:
            raw = _try_read(head, name)  # a pattern over http: the info file may or may not be there
        else:
            raw = read_bytes(head, name) if (Path(head) / name).is_file() or name in listing else None
        if raw is not None:
            loc.info, loc.info_name = _parse_info(raw, f"{head}/{name}"), name
            break
    return loc


def _try_read(base: str, name: str) -> bytes | None:
    try:
        return read_bytes(base, name)
    except DataError:
        return None


def _parse_info(raw: bytes, where: str) -> dict[str, tuple[str, int]]:
    """timm's _info.json -> {shard file: (split, sample count)}. Its layout, as timm's reader_wds reads it:
    {"name", "splits": {SPLIT: {"name", "num_samples", "filenames": [...], "shard_lengths": [...]}}}."""
    try:
        splits = json.loads(raw.decode("utf-8"))["splits"]
        out = {}
        for split, entry in splits.items():
            files, lengths = entry["filenames"], entry["shard_lengths"]
            if len(files) != len(lengths) or not all(isinstance(n, int) for n in lengths):
                raise ValueError("filenames and shard_lengths differ")
            out.update({f.rsplit("/", 1)[-1]: (SPLIT_WORDS.get(split, split), n) for f, n in zip(files, lengths)})
        return out
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not timm's _info.json layout ({type(exc).__name__}: {exc})") from None


# --- splits ----------------------------------------------------------------------------------------


def split_of_name(name: str) -> str:
    """The split a file name says: a -train-, -val-/-validation- or -test- word; UsageError if none or two."""
    found = {SPLIT_WORDS[m.lower()] for m in SPLIT_TOKEN.findall(name.removesuffix(".tar"))}
    if len(found) != 1:
        what = "no split word" if not found else f"two split words ({', '.join(sorted(found))})"
        raise UsageError(
            f"{name}: {what} in its name (expected -train-, -val-/-validation- or -test-); "
            "name the split with --split NAME or --split NAME=GLOB"
        )
    return found.pop()


def parse_split_args(values: list[str] | None) -> list[tuple[str, str | None]]:
    """--split NAME (every file) or --split NAME=GLOB, repeated: [(split, glob or None)]."""
    out = []
    for value in values or []:
        name, eq, glob = value.partition("=")
        name = SPLIT_WORDS.get(name, name)
        if not SPLIT_RE.match(name) or (eq and not glob):
            raise UsageError(f"--split {value}: expected NAME or NAME=GLOB (NAME of letters, digits, - and _)")
        out.append((name, glob if eq else None))
    if len(out) > 1 and any(glob is None for _, glob in out):
        raise UsageError("--split NAME puts every shard in one split: give it once, or use NAME=GLOB for each split")
    return out


def assign_splits(loc: Location, forced: list[tuple[str, str | None]]) -> dict[str, str]:
    """{tar name: split}, from --split, else timm's _info.json, else the file names."""
    out = {}
    for name in loc.names:
        if forced:
            hits = [split for split, glob in forced if glob is None or fnmatch.fnmatchcase(name, glob)]
            if len(hits) != 1:
                raise UsageError(f"{name}: matched by {len(hits)} --split patterns, must be matched by exactly one")
            out[name] = hits[0]
        elif loc.info is not None:
            if name not in loc.info:
                raise DataError(f"{name}: not listed in {loc.info_name}; name its split with --split NAME=GLOB")
            out[name] = loc.info[name][0]
        else:
            out[name] = split_of_name(name)
    return out


# --- labels ----------------------------------------------------------------------------------------


def label_member(args: argparse.Namespace, members: dict) -> tuple[str, str | None]:
    """(member, json field) of the label rule; --label auto looks at the first sample: .cls, else a
    json with a `label` field, else .txt."""
    if args.label != "auto":
        return args.label, (args.label_key or AUTO_JSON_FIELD) if args.label == "json" else None
    if args.label_key:
        return "json", args.label_key
    if "cls" in members:
        return "cls", None
    if "json" in members:
        try:
            if AUTO_JSON_FIELD in json.loads(bytes(members["json"])):
                return "json", AUTO_JSON_FIELD
        except (ValueError, TypeError):
            pass
    if "txt" in members:
        return "txt", None
    raise DataError(
        f"{members['__key__']}: the first sample has no .cls, json with a `label` field or .txt member (has "
        f"{sorted(k for k in members if k != '__key__')}): name the label with --label or --label-key"
    )


def raw_label(members: dict, member: str, key: str | None) -> object:
    """The label value as stored (an int, or a string) or ValueError; sample_label decides its meaning."""
    payload = members.get(member)
    if payload is None:
        raise ValueError(f"no {member} member")
    try:
        text = bytes(payload).decode("utf-8").strip()
        if member != "json":
            return text
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{member} is not readable text ({exc})") from None
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"json has no field {key!r}")
    if not isinstance(obj[key], (int, str)):
        raise ValueError(f"json field {key!r} is not an integer or a name: {str(obj[key])[:40]!r}")
    return obj[key]


def is_index(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
        isinstance(value, str) and value.isdigit()
    )


def class_key_name(members: dict, key: str) -> str | None:
    """The class name a json field gives (--class-key), or None where the sample has none."""
    try:
        value = json.loads(bytes(members["json"]))[key]
    except (KeyError, ValueError, TypeError):
        return None
    return str(value) if isinstance(value, (str, int)) else None


# --- one shard ---------------------------------------------------------------------------------------


@dataclass
class Scan:
    """What one pass over the shards found."""

    member: str | None = None
    json_field: str | None = None
    shards: dict[str, list[ShardInfo]] = field(default_factory=dict)  # split -> shards
    labels: list[tuple[str, str, object]] = field(default_factory=list)  # (file, key, raw value or ValueError)
    names: Counter = field(default_factory=Counter)  # (raw label, --class-key name) pairs
    dims: list[tuple[int, int]] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    color: int = 0  # images not in a gray mode
    problems: list[dict] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # sample key -> first shard holding it
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)
    stats: PixelStats = field(default_factory=PixelStats)
    stats_images: int = 0
    empty: list[str] = field(default_factory=list)


def image_header(data: bytes, where: str) -> tuple[tuple[int, int], str, str]:
    """((height, width), PIL format, PIL mode) from the header alone; DataError if unreadable."""
    size = image_size(data, where)  # the loader's own reading of the size, which its crop plans use
    try:
        with Image.open(io.BytesIO(data)) as img:
            return size, img.format or "?", img.mode
    except Exception as exc:  # PIL raises many types for damaged data
        raise DataError(f"{where}: image header unreadable ({exc})") from None


def add_pixels(scan: Scan, data: bytes, where: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for damaged data
        raise DataError(f"{where}: image does not decode ({exc})") from None
    scan.stats.add(pixels, 3)
    scan.stats_images += 1


def scan_sample(scan: Scan, args, file: str, members: dict, pick: bool) -> None:
    key = members["__key__"]
    where = f"{file}:{key}"
    image = members[next(e for e in IMAGE_EXTS if e in members)]  # the one the loader reads (data.sample_parts)
    if scan.member is None:
        scan.member, scan.json_field = label_member(args, members)
    try:
        scan.labels.append((file, key, raw_label(members, scan.member, scan.json_field)))
    except ValueError as exc:
        scan.labels.append((file, key, exc))
    if args.class_key and not isinstance(scan.labels[-1][2], ValueError):
        scan.names[(str(scan.labels[-1][2]), class_key_name(members, args.class_key))] += 1
    try:
        size, fmt, mode = image_header(image, where)
        if pick:
            add_pixels(scan, image, where)
    except DataError as exc:
        problem(scan, args, file, key, str(exc).split(": ", 1)[1])
        return
    scan.dims.append(size)
    scan.formats[FORMATS.get(fmt, "mixed")] += 1
    scan.color += mode not in GRAY_MODES
    if key in scan.keys:
        scan.duplicates.append((key, scan.keys[key], file))
    else:
        scan.keys[key] = file


def problem(scan: Scan, args, file: str, key: str, reason: str) -> None:
    """A sample the loader will count but cannot train on: --strict stops, else it is listed."""
    if args.strict:
        raise DataError(f"{file}:{key}: {reason} (--strict)")
    scan.problems.append({"path": f"{file}:{key}", "reason": reason})


@dataclass
class Quota:
    """How many images of each train shard feed mean/std: what is still wanted, spread evenly over the train
    shards still to come, a short shard's shortfall passing on (only short shards at the end leave it under)."""

    wanted: int  # 0: every image
    files: set[str]
    done: int = 0  # train shards seen

    def __post_init__(self):
        self.every = self.wanted == 0

    def take(self, file: str, count: int) -> int:
        if file not in self.files:
            return 0
        self.done += 1
        if self.every:
            return count
        share = min(count, -(-self.wanted // (len(self.files) - self.done + 1)))
        self.wanted -= share
        return share


def scan_shard(scan: Scan, args, loc: Location, file: str, split: str, quota: Quota, out: Path) -> None:
    data = read_bytes(loc.base, file)
    sha = hashlib.sha256(data).hexdigest()
    try:
        groups = [g for g in tar_groups(data) if g.is_sample]
        table = sample_table(data, file, sha)
    except ValueError as exc:
        raise DataError(f"{file}: damaged tar ({exc})") from None
    if not groups:
        scan.empty.append(file)
        return
    take = quota.take(file, len(groups))
    picks = set(np.random.default_rng([args.seed, zlib.crc32(file.encode())]).choice(len(groups), take, False).tolist())
    for i, group in enumerate(groups):
        scan_sample(scan, args, file, {"__key__": group.key, **group.payloads(data)}, i in picks)
    expected = loc.info.get(file) if loc.info else None
    if expected is not None and expected[1] != len(groups):
        raise DataError(f"{file}: {len(groups)} image samples, {loc.info_name} says {expected[1]}")
    write_sidecar(out / sidecar_name(sha), table.to_json())
    info = ShardInfo(file, len(groups), sha, len(data), sidecar_name(sha))
    scan.shards.setdefault(split, []).append(info)


def write_sidecar(path: Path, obj: dict) -> None:
    write_json_atomic(path, obj, compact=True, shared=True)
    os.chmod(path, 0o644)  # mkstemp's 0600 would hide it from other users of the index


# --- classes and the index ----------------------------------------------------------------------------


def read_classes(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--classes {path}: cannot read ({exc})") from None
    if not names or len(set(names)) != len(names):
        raise UsageError(f"--classes {path}: expected one distinct class name a line")
    return names


def label_rule(scan: Scan, args) -> tuple[dict, list[str], list[str]]:
    """(label rule, classes, notes): .cls holds an integer (webdataset's convention); a .txt or json label is
    read by index when most values are integers, else as a class name. Most, not all: one stray "n/a" must
    not turn 0..999 into a thousand class names; it is listed as unreadable instead."""
    values = [v for _, _, v in scan.labels if not isinstance(v, ValueError)]
    ints = [v for v in values if is_index(v)]
    by = "index" if scan.member == "cls" or 2 * len(ints) > len(values) else "name"
    values = ints if by == "index" else values
    rule = {"member": scan.member, "field": scan.json_field if scan.member == "json" else None, "by": by}
    if args.classes is not None:
        return rule, read_classes(args.classes), []
    if by == "name":
        names = sorted({str(v) for v in values})
        return rule, names, [f"classes are the {len(names)} distinct label names, sorted"]
    count = max(int(v) for v in values) + 1 if values else 1
    if not args.class_key:
        return rule, [str(i) for i in range(count)], [f"no class names given: classes are 0..{count - 1}"]
    named: dict[int, set[str]] = {}
    for (value, name), _ in scan.names.items():
        if name is not None:
            named.setdefault(int(value), set()).add(name)
    clash = next((i for i, n in sorted(named.items()) if len(n) > 1), None)
    if clash is not None:
        raise DataError(f"--class-key {args.class_key}: label {clash} has several names ({sorted(named[clash])[:3]})")
    classes = [named[i].pop() if i in named else str(i) for i in range(count)]
    missing = count - len(named)
    notes = [f"{missing} class(es) had no {args.class_key} name: named by their number"] if missing else []
    return rule, classes, notes


def check_labels(scan: Scan, args, rule: dict, classes: list[str]) -> None:
    """Every label through tars.sample_label, exactly as the loader will read it: the ones it would refuse
    are listed (or --strict stops), so index.json says up front which samples training will lose."""
    ids = {name: i for i, name in enumerate(classes)}
    for file, key, value in scan.labels:
        if not isinstance(value, ValueError):
            stored = json.dumps({rule["field"]: value}) if rule["member"] == "json" else str(value)
            try:
                sample_label({rule["member"]: stored.encode()}, rule, ids)
                continue
            except ValueError as exc:
                value = exc
        problem(scan, args, file, key, f"label unreadable ({value})")


def index_notes(scan: Scan, loc: Location) -> list[str]:
    notes = []
    lost = len({p["path"] for p in scan.problems})
    if lost:
        notes.append(
            f"{lost} sample(s) listed in skipped are counted in num_samples (the loader counts every image "
            "sample) but cannot be trained on: training reports them as lost samples"
        )
    if scan.duplicates:
        key, first, again = scan.duplicates[0]
        notes.append(
            f"{len(scan.duplicates)} sample key(s) appear more than once, e.g. {key} in {first} and {again}; "
            "each occurrence is its own sample"
        )
    if scan.empty:
        notes.append(f"{len(scan.empty)} shard(s) hold no image sample and are left out, e.g. {scan.empty[0]}")
    if loc.info_name:
        notes.append(f"splits and per-shard counts from {loc.info_name} (timm), checked against the shards")
    return notes


def build_index(scan: Scan, args, loc: Location, out: Path, stats_of: int) -> DatasetIndex:
    rule, classes, notes = label_rule(scan, args)
    check_labels(scan, args, rule, classes)
    if not scan.dims or not scan.stats.count:
        raise DataError(f"{args.source}: no readable image in any shard, or none decoded for mean/std")
    dims = np.array(scan.dims).reshape(-1, 2)
    sizes = size_stats(dims)
    fixed = sizes["height"]["min"] == sizes["height"]["max"] and sizes["width"]["min"] == sizes["width"]["max"]
    channels = 3 if scan.color else 1  # all gray: one channel; any colour image: RGB, as the packer decides
    mean, std = scan.stats.mean_std()
    formats = [f for f in scan.formats if scan.formats[f]]
    splits = {
        name: SplitInfo(sum(s.num_samples for s in shards), tuple(shards)) for name, shards in scan.shards.items()
    }
    here = loc.local and Path(loc.base) == out.resolve()
    return DatasetIndex(
        source="webdataset",
        classes=classes,
        image_size=(int(dims[0, 0]), int(dims[0, 1])) if fixed else None,
        channels=channels,
        format=formats[0] if len(formats) == 1 else "mixed",
        mean=mean[:channels],
        std=std[:channels],
        splits=splits,
        skipped=scan.problems,
        notes=notes + index_notes(scan, loc),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "command"},
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        tool=f"resnet-dist {__version__} (shard index)",
        sizes=sizes,
        stats_sample={"images": scan.stats_images, "of": stats_of, "seed": args.seed},
        shard_base=None if here else loc.base,
        label=rule,
    )


def output_folder(args, loc: Location) -> Path:
    """--out, else the shards' own folder when it is local and writable; index.json there only with --overwrite."""
    if args.out is None:
        if not loc.local or not os.access(loc.base, os.W_OK):
            raise UsageError(f"{args.source} is {'remote' if not loc.local else 'read-only'}: give --out DIR")
        out = Path(loc.base)
    else:
        out = Path(args.out)
    if (out / INDEX_NAME).exists() and not args.overwrite:
        raise UsageError(f"{out / INDEX_NAME} exists: pass --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"{out} is not writable: give --out DIR")
    return out


def index_shards(args: argparse.Namespace) -> tuple[DatasetIndex, Path]:
    """Scan the shards `args.source` names and write index.json (and a sidecar per shard) to the output folder."""
    forced = parse_split_args(args.split)
    loc = locate(args.source)
    splits = assign_splits(loc, forced)
    out = output_folder(args, loc)
    stats_files = [f for f in loc.names if splits[f] == "train"] or list(loc.names)
    wanted = DEFAULT_STATS_SAMPLE if args.stats_sample is None else args.stats_sample
    quota = Quota(wanted, set(stats_files))
    scan = Scan()
    columns = (TextColumn("index"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("shards", total=len(loc.names))
        for file in loc.names:
            scan_shard(scan, args, loc, file, splits[file], quota, out)
            progress.advance(task)
    stats_of = sum(s.num_samples for shards in scan.shards.values() for s in shards if s.file in quota.files)
    index = build_index(scan, args, loc, out, stats_of)
    parse_index(index.to_json(), "index being written")  # the contract, checked before anything trusts it
    return index, write_index(out, index)


def add_index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="folder, file:// URL, brace pattern (https://host/x-train-{0000..0099}.tar) or URL")
    p.add_argument("--out", help="local folder for index.json and sidecars (default: the shards' folder)")
    p.add_argument(
        "--label",
        choices=("auto", "cls", "json", "txt"),
        default="auto",
        help="member holding the label (default auto: .cls, else a json `label` field, else .txt)",
    )
    p.add_argument("--label-key", help="json field holding the label (implies --label json; default label)")
    p.add_argument("--classes", type=Path, help="file of class names, one a line (id order for integer labels)")
    p.add_argument("--class-key", help="json field naming each sample's class (with integer labels)")
    p.add_argument(
        "--split",
        action="append",
        metavar="NAME[=GLOB]",
        help="put every shard in split NAME, or (repeated) the shards matching GLOB (default: from _info.json "
        "or the file names' -train-/-val-/-validation-/-test-)",
    )
    p.add_argument(
        "--stats-sample",
        type=_count,
        help=f"mean/std from N seeded random train images, 0 = all (default {DEFAULT_STATS_SAMPLE:,})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the mean/std sample (default 0)")
    p.add_argument("--strict", action="store_true", help="fail on a sample whose label or image header is unreadable")
    p.add_argument("--overwrite", action="store_true", help="replace an index.json already in the output folder")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def check_index_args(args: argparse.Namespace) -> None:
    if args.out is not None and "://" in args.out:
        # Path() would fold "s3://b/x" into a local folder "s3:/b/x": refused, never taken for a folder.
        raise UsageError(f"--out {args.out}: must be a local folder (index.json of foreign shards is written locally)")
    if args.label_key and args.label not in ("auto", "json"):
        raise UsageError(f"--label-key names a json field: it goes with --label json, not {args.label}")
    if args.classes is not None and args.class_key:
        raise UsageError("--classes and --class-key exclude each other: pick one source of class names")
    if args.classes is not None:
        read_classes(args.classes)  # a bad file is a usage error before any shard is read
