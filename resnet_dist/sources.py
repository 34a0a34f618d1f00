"""One reader per source layout, each read from its real on-disk form as distributed.

A reader returns a `Source`: class names plus, per split, either a uint8 array of decoded images
(CIFAR pickles, IDX files, synthetic) or a list of encoded image files (Tiny ImageNet,
ImageFolder). Files are not read here: the shard writer reads them in its workers, after the
global shuffle, so a million-image folder never sits in memory. `iter_samples` turns a split (or
any slice of it) into `Sample`s, the unit the writer encodes.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from resnet_dist.errors import DataError, UsageError

# What torchvision's ImageFolder accepts as an image, so the same folders give the same samples.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# torchvision's MNIST.classes, so reports read the same as people's existing code.
MNIST_CLASSES = [
    "0 - zero",
    "1 - one",
    "2 - two",
    "3 - three",
    "4 - four",
    "5 - five",
    "6 - six",
    "7 - seven",
    "8 - eight",
    "9 - nine",
]


@dataclass(frozen=True)
class Sample:
    # Where it came from, for messages and the shard's per-sample table: the source file's path relative
    # to --root ("train/cat/a.jpg"), or the dataset's own id for array layouts ("data_batch_3[17]").
    name: str
    label: int
    coarse: int | None = None
    array: np.ndarray | None = None  # uint8 HxW or HxWxC, or ...
    data: bytes | None = None  # ... the encoded file's bytes,
    ext: str | None = None  # with its file extension (a hint: the writer trusts the content)
    error: str | None = None  # set when the file could not even be read


@dataclass(frozen=True)
class Split:
    """One split's samples, in source order. Exactly one of `images` / `files` is set."""

    labels: np.ndarray  # int64, N
    coarse: np.ndarray | None = None  # int64, N (CIFAR-100 superclasses)
    images: np.ndarray | None = None  # uint8, N x H x W (x C)
    files: tuple[str, ...] | None = None  # paths relative to `root`
    root: Path | None = None
    # Array sources: each sample's id in the dataset as distributed ("data_batch_3[17]"), kept through
    # shuffles and slices so a packed sample can be traced to it.
    ids: tuple[str, ...] | None = None
    prefix: str = ""  # file sources: `root` relative to --root ("tiny-imagenet-200/"), so names are from --root

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray | list[int]) -> Split:
        """A new split of the samples at `idx`, in that order (for shuffling, slicing, val carving)."""
        idx = np.asarray(idx, dtype=np.int64)
        return Split(
            labels=self.labels[idx],
            coarse=None if self.coarse is None else self.coarse[idx],
            images=None if self.images is None else self.images[idx],
            files=None if self.files is None else tuple(self.files[i] for i in idx),
            root=self.root,
            ids=None if self.ids is None else tuple(self.ids[i] for i in idx),
            prefix=self.prefix,
        )


@dataclass
class Source:
    name: str
    classes: list[str]
    splits: dict[str, Split]
    extra_labels: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    # Known geometry; None means "look at the files" (ImageFolder).
    image_size: tuple[int, int] | None = None
    channels: int | None = None


def iter_samples(split: Split) -> Iterator[Sample]:
    coarse = [None] * len(split) if split.coarse is None else split.coarse.tolist()
    labels = split.labels.tolist()
    if split.images is not None:
        ids = split.ids or tuple(f"[{i}]" for i in range(len(split)))
        for i, (label, c) in enumerate(zip(labels, coarse)):
            yield Sample(ids[i], label, c, array=split.images[i])
        return
    assert split.files is not None and split.root is not None
    for rel, label, c in zip(split.files, labels, coarse):
        try:
            data = (split.root / rel).read_bytes()
        except OSError as exc:
            # An unreadable file is a skip like an undecodable one: the writer reports it.
            yield Sample(split.prefix + rel, label, c, error=f"cannot read: {exc.strerror or exc}")
            continue
        yield Sample(split.prefix + rel, label, c, data=data, ext=Path(rel).suffix.lower().lstrip("."))


def array_ids(name: str, count: int) -> tuple[str, ...]:
    """Ids of the images of one array file: "test_batch[0]", "test_batch[1]", ... (their index in it)."""
    return tuple(f"{name}[{i}]" for i in range(count))


def prefix_of(folder: Path, root: Path) -> str:
    """`folder` relative to --root as a name prefix: "" when it is --root, else "tiny-imagenet-200/"."""
    rel = os.path.relpath(folder, root)
    return "" if rel == "." else Path(rel).as_posix() + "/"


def from_root(source: Source, folder: Path, root: Path) -> Source:
    """Name the files of splits found under `folder` from --root, as the user can find them."""
    prefix = prefix_of(folder, root)
    source.splits = {name: replace(split, prefix=prefix) for name, split in source.splits.items()}
    return source


# --- CIFAR ----------------------------------------------------------------------------------------


def _str_keys(obj: dict) -> dict:
    """CIFAR pickles are Python 2 pickles: keys come back as str or bytes depending on `encoding`."""
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _names(values: list) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def load_cifar_pickle(path: Path, encoding: str = "latin1") -> dict:
    """Load one CIFAR batch with str keys, whichever way it was unpickled."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding=encoding)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CIFAR pickle ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict in a CIFAR pickle, got {type(obj).__name__}")
    return _str_keys(obj)


def cifar_images(batch: dict, where: str) -> np.ndarray:
    """N x 3072 rows holding the R, G, B planes of 32x32 images -> N x 32 x 32 x 3."""
    data = np.asarray(batch.get("data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: 'data' must be a uint8 N x 3072 array, got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _labels(batch: dict, key: str, count: int, num_classes: int, where: str) -> np.ndarray:
    if key not in batch:
        raise DataError(f"{where}: missing '{key}'")
    labels = np.asarray(batch[key], dtype=np.int64)
    if labels.shape != (count,):
        raise DataError(f"{where}: {len(labels)} '{key}' for {count} images")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where}: '{key}' outside 0..{num_classes - 1}")
    return labels


def _find_dir(root: Path, name: str, marker: str) -> Path | None:
    """Accept the dataset folder itself or its parent (torchvision's `root`)."""
    for candidate in (root / name, root):
        if (candidate / marker).is_file():
            return candidate
    return None


def read_cifar10(root: Path) -> Source:
    folder = _find_dir(root, "cifar-10-batches-py", "batches.meta")
    expected = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    if folder is None or not all((folder / n).is_file() for n in expected):
        raise UsageError(
            f"cifar10: {root} is not the CIFAR-10 python version: expected "
            "cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta (or pass --download)"
        )
    classes = _names(load_cifar_pickle(folder / "batches.meta").get("label_names", []))
    if len(classes) != 10:
        raise DataError(f"{folder / 'batches.meta'}: expected 10 label_names, got {len(classes)}")

    def split(names: list[str]) -> Split:
        images, labels = [], []
        for n in names:
            batch = load_cifar_pickle(folder / n)
            images.append(cifar_images(batch, str(folder / n)))
            labels.append(_labels(batch, "labels", len(images[-1]), 10, str(folder / n)))
        ids = tuple(f"{n}[{i}]" for n, batch in zip(names, images) for i in range(len(batch)))
        return Split(labels=np.concatenate(labels), images=np.concatenate(images), ids=ids)

    return Source(
        name="cifar10",
        classes=classes,
        splits={"train": split(expected[:5]), "test": split(["test_batch"])},
        image_size=(32, 32),
        channels=3,
    )


def read_cifar100(root: Path) -> Source:
    folder = _find_dir(root, "cifar-100-python", "meta")
    if folder is None or not all((folder / n).is_file() for n in ("train", "test", "meta")):
        raise UsageError(
            f"cifar100: {root} is not the CIFAR-100 python version: expected "
            "cifar-100-python/ with train, test, meta (or pass --download)"
        )
    meta = load_cifar_pickle(folder / "meta")
    fine = _names(meta.get("fine_label_names", []))
    coarse = _names(meta.get("coarse_label_names", []))
    if len(fine) != 100 or len(coarse) != 20:
        raise DataError(f"{folder / 'meta'}: expected 100 fine and 20 coarse label names")

    def split(name: str) -> Split:
        where = str(folder / name)
        batch = load_cifar_pickle(folder / name)
        images = cifar_images(batch, where)
        return Split(
            labels=_labels(batch, "fine_labels", len(images), 100, where),
            coarse=_labels(batch, "coarse_labels", len(images), 20, where),
            images=images,
            ids=array_ids(name, len(images)),
        )

    return Source(
        name="cifar100",
        classes=fine,
        splits={"train": split("train"), "test": split("test")},
        extra_labels={"coarse": coarse},
        image_size=(32, 32),
        channels=3,
    )


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------------

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array; the header gives the dims, big-endian."""
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise DataError(f"{path}: IDX header promises {size} bytes of data, file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Path | None:
    # torchvision's raw/ holds both; the plain file is the faster read.
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_source(name: str, classes: list[str], root: Path, subdir: str) -> Source:
    stems = [s for pair in IDX_FILES.values() for s in pair]
    folder = next(
        (f for f in (root, root / subdir / "raw", root / "raw") if all(_idx_path(f, s) for s in stems)),
        None,
    )
    if folder is None:
        raise UsageError(
            f"{name}: {root} lacks the IDX files: expected {', '.join(stems)} (each optionally .gz) "
            f"in ROOT or ROOT/{subdir}/raw (or pass --download)"
        )
    splits = {}
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images_path, labels_path = _idx_path(folder, images_stem), _idx_path(folder, labels_stem)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3:
            raise DataError(f"{images_path}: expected N x H x W images, got {images.ndim} dims")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{labels_path}: {labels.shape} labels for {len(images)} images")
        if labels.size and labels.max() >= len(classes):
            raise DataError(f"{labels_path}: labels outside 0..{len(classes) - 1}")
        ids = array_ids(images_path.name.removesuffix(".gz"), len(images))
        splits[split] = Split(labels=labels.astype(np.int64), images=images, ids=ids)
    return Source(
        name=name,
        classes=list(classes),
        splits=splits,
        image_size=tuple(splits["train"].images.shape[1:3]),
        channels=1,
    )


def read_mnist(root: Path) -> Source:
    return _read_idx_source("mnist", MNIST_CLASSES, root, "MNIST")


def read_fashion_mnist(root: Path) -> Source:
    return _read_idx_source("fashion-mnist", FASHION_MNIST_CLASSES, root, "FashionMNIST")


# --- Tiny ImageNet --------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _image_files(folder: Path, base: Path) -> list[str]:
    """Image files under `folder`, recursively, sorted, relative to `base` (hidden files ignored)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, f), base))
    return found


def _tiny_class_names(wnids: list[str], words_path: Path) -> list[str]:
    words = {}
    if words_path.is_file():
        for line in _read_lines(words_path):
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    names = [words.get(w) or w for w in wnids]
    # Some WordNet names repeat across wnids; a report must still tell the classes apart.
    return [f"{n} ({w})" if names.count(n) > 1 else n for n, w in zip(names, wnids)]


def read_tiny_imagenet(root: Path) -> Source:
    folder = _find_dir(root, "tiny-imagenet-200", "wnids.txt")
    if folder is None or not (folder / "train").is_dir() or not (folder / "val" / "val_annotations.txt").is_file():
        raise UsageError(
            f"tiny-imagenet: {root} is not Tiny ImageNet: expected tiny-imagenet-200/ with wnids.txt, "
            "words.txt, train/<wnid>/images/*.JPEG, val/images/ and val/val_annotations.txt"
        )
    # Sorted, as torchvision's ImageFolder over train/ would number them.
    wnids = sorted(set(_read_lines(folder / "wnids.txt")))
    label_of = {w: i for i, w in enumerate(wnids)}
    source = Source(
        name="tiny-imagenet",
        classes=_tiny_class_names(wnids, folder / "words.txt"),
        splits={},
        image_size=(64, 64),
        channels=3,  # a few of its JPEGs are grayscale: they decode to RGB like the rest
    )

    files, labels = [], []
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise DataError(f"{folder / 'train'}: wnid {wnid} from wnids.txt has no {wnid}/images/ folder")
        for rel in _image_files(images, folder):
            files.append(rel)
            labels.append(label_of[wnid])
    source.splits["train"] = Split(labels=np.array(labels, dtype=np.int64), files=tuple(files), root=folder)

    # val/ is not ImageFolder-shaped: one images/ folder, labels in val_annotations.txt.
    annotations = folder / "val" / "val_annotations.txt"
    listed: dict[str, int] = {}
    for n, line in enumerate(_read_lines(annotations), 1):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in label_of:
            raise DataError(f"{annotations}:{n}: expected '<file>\\t<wnid>\\t...' with a wnid from wnids.txt")
        listed[parts[0]] = label_of[parts[1]]
    present = set(_image_files(folder / "val" / "images", folder / "val" / "images"))
    val_files = sorted(f for f in listed if f in present)
    for f in sorted(set(listed) - present):
        source.skipped.append({"path": f"val/images/{f}", "reason": "listed in val_annotations.txt but missing"})
    for f in sorted(present - set(listed)):
        source.skipped.append({"path": f"val/images/{f}", "reason": "not in val_annotations.txt"})
    source.splits["val"] = Split(
        labels=np.array([listed[f] for f in val_files], dtype=np.int64),
        files=tuple(f"val/images/{f}" for f in val_files),
        root=folder,
    )

    test_dir = folder / "test"
    if test_dir.is_dir():
        count = len(_image_files(test_dir, test_dir))
        source.notes.append(f"test/ has no labels: skipped ({count} images)")
    return from_root(source, folder, root)


# --- ImageFolder ----------------------------------------------------------------------------------


def read_imagefolder(root: Path) -> Source:
    layout = "expected ROOT/<split>/<class>/<image> (e.g. ROOT/train/cat/1.jpg)"
    if not root.is_dir():
        raise UsageError(f"imagefolder: {root} is not a folder: {layout}")
    split_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for d in split_dirs:
        loose = [f.name for f in d.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)]
        if loose:
            raise UsageError(f"imagefolder: {layout}; {d} holds images directly ({loose[0]})")
    class_dirs = {
        d.name: sorted(c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")) for d in split_dirs
    }
    classes = sorted({c for names in class_dirs.values() for c in names})
    if not classes:
        raise UsageError(f"imagefolder: {root} has no class folders: {layout}")
    # One class list across splits: the same folder name gets the same label in every split.
    label_of = {c: i for i, c in enumerate(classes)}
    source = Source(name="imagefolder", classes=classes, splits={})
    ignored = []
    for d in split_dirs:
        files, labels = [], []
        for c in class_dirs[d.name]:
            for rel in _image_files(d / c, root):
                files.append(rel)
                labels.append(label_of[c])
            ignored += _non_images(d / c, root)
        if files:
            source.splits[d.name] = Split(labels=np.array(labels, dtype=np.int64), files=tuple(files), root=root)
    if not source.splits:
        raise UsageError(f"imagefolder: no image files under {root}: {layout}")
    if ignored:
        source.notes.append(f"ignored {len(ignored)} file(s) without an image extension, e.g. {ignored[0]}")
    return source


def _non_images(folder: Path, base: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and not f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, f), base))
    return found


# --- ImageNet (ILSVRC-2012 CLS-LOC) --------------------------------------------------------------

WNID_RE = re.compile(r"^n\d{8}$")
KAGGLE_DATA = ("ILSVRC", "Data", "CLS-LOC")  # Kaggle's layout; its LOC_* files sit beside ILSVRC/
IMAGENET_LAYOUT = (
    "expected ROOT/train/<wnid>/*.JPEG and ROOT/val/ (in <wnid>/ folders, or flat with LOC_val_solution.csv), "
    "or Kaggle's ROOT/ILSVRC/Data/CLS-LOC/{train,val} with ROOT/LOC_val_solution.csv"
)
VAL_SOLUTION_HEADER = "ImageId,PredictionString"


def _imagenet_folders(root: Path) -> tuple[Path, list[Path]]:
    """(the folder holding train/ and val/, the folders that may hold the LOC_* files)."""
    data = next((d for d in (root, root.joinpath(*KAGGLE_DATA)) if (d / "train").is_dir()), None)
    if data is None:
        raise UsageError(f"imagenet: {root} is not ILSVRC-2012: {IMAGENET_LAYOUT}")
    look = [data]
    if data.parts[-3:] == KAGGLE_DATA:
        look.append(data.parents[2])
    return data, look


def _first_file(folders: list[Path], name: str) -> Path | None:
    return next((f / name for f in folders if (f / name).is_file()), None)


def _subfolders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _imagenet_class_names(wnids: list[str], mapping: Path | None) -> list[str]:
    """The first name of each wnid in LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca" -> "tench")."""
    if mapping is None:
        return list(wnids)
    words = {}
    for n, line in enumerate(_read_lines(mapping), 1):
        wnid, _, text = line.partition(" ")
        if not WNID_RE.match(wnid) or not text.strip():
            raise DataError(f"{mapping}:{n}: expected '<wnid> <names>', e.g. 'n01440764 tench, Tinca tinca'")
        words[wnid] = text.split(",")[0].strip()
    missing = [w for w in wnids if w not in words]
    if missing:
        raise DataError(f"{mapping}: no line for {len(missing)} train wnid(s), e.g. {missing[0]}")
    names = [words[w] for w in wnids]
    counts = Counter(names)
    # ImageNet names two classes "crane" (bird, machine) and two "maillot": reports must tell them apart.
    return [f"{name} ({w})" if counts[name] > 1 else name for name, w in zip(names, wnids)]


def _read_val_solution(path: Path, label_of: dict[str, int]) -> dict[str, int]:
    """ImageId -> label from LOC_val_solution.csv: the first wnid of each row's PredictionString."""
    lines = _read_lines(path)
    if not lines or lines[0].lstrip("\ufeff").strip() != VAL_SOLUTION_HEADER:
        raise DataError(f"{path}: expected the header '{VAL_SOLUTION_HEADER}'")
    labels: dict[str, int] = {}
    for n, line in enumerate(lines[1:], 2):
        image_id, _, prediction = line.partition(",")
        words = prediction.split()
        if not image_id or not words or not WNID_RE.match(words[0]):
            raise DataError(f"{path}:{n}: expected 'ImageId,<wnid> x_min y_min x_max y_max ...'")
        if words[0] not in label_of:
            raise DataError(f"{path}:{n}: wnid {words[0]} is not a class in train/")
        if image_id in labels:
            raise DataError(f"{path}:{n}: {image_id} is listed twice")
        labels[image_id] = label_of[words[0]]
    return labels


def _imagenet_val_folders(data: Path, label_of: dict[str, int]) -> Split:
    files, labels = [], []
    for wnid in _subfolders(data / "val"):
        if wnid not in label_of:
            raise DataError(f"{data / 'val' / wnid}: wnid {wnid} is not a class in train/")
        found = _image_files(data / "val" / wnid, data)
        files += found
        labels += [label_of[wnid]] * len(found)
    return Split(labels=np.array(labels, dtype=np.int64), files=tuple(files), root=data)


def _imagenet_val_flat(data: Path, look: list[Path], label_of: dict[str, int], source: Source) -> Split:
    csv = _first_file(look, "LOC_val_solution.csv")
    if csv is None:
        where = " or ".join(str(f) for f in look)
        raise UsageError(f"imagenet: {data / 'val'} holds images directly: it needs LOC_val_solution.csv in {where}")
    listed = _read_val_solution(csv, label_of)
    present = {Path(f).stem: f for f in _image_files(data / "val", data)}
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        # Not a skip: a solution file that does not cover the images is the wrong file for them.
        raise DataError(
            f"{csv}: no row for {present[unlisted[0]]} ({len(unlisted)} of {len(present)} val images have none)"
        )
    for image_id in sorted(set(listed) - set(present)):
        source.skipped.append({"path": f"val/{image_id}.JPEG", "reason": "listed in LOC_val_solution.csv but missing"})
    ids = sorted(present)
    return Split(
        labels=np.array([listed[i] for i in ids], dtype=np.int64), files=tuple(present[i] for i in ids), root=data
    )


def read_imagenet(root: Path) -> Source:
    data, look = _imagenet_folders(root)
    wnids = _subfolders(data / "train")
    odd = [w for w in wnids if not WNID_RE.match(w)]
    if odd or not wnids:
        raise UsageError(
            f"imagenet: {data / 'train'} must hold one <wnid>/ folder per class (e.g. n01440764/), "
            f"found {odd[0] if odd else 'none'}"
        )
    # Sorted wnids: the standard ILSVRC-2012 class indices, and torchvision ImageFolder's order.
    label_of = {w: i for i, w in enumerate(wnids)}
    source = Source(
        name="imagenet",
        classes=_imagenet_class_names(wnids, _first_file(look, "LOC_synset_mapping.txt")),
        splits={},
        channels=3,  # its grayscale and CMYK JPEGs become RGB like the rest
    )
    files, labels = [], []
    for wnid in wnids:
        found = _image_files(data / "train" / wnid, data)
        files += found
        labels += [label_of[wnid]] * len(found)
    source.splits["train"] = Split(labels=np.array(labels, dtype=np.int64), files=tuple(files), root=data)
    val = data / "val"
    if not val.is_dir():
        source.notes.append("no val/ folder: train only")
    elif _subfolders(val):
        if any(f.is_file() and not f.name.startswith(".") for f in val.iterdir()):
            raise UsageError(f"imagenet: {val} holds both <wnid>/ folders and loose images: use one layout")
        source.splits["val"] = _imagenet_val_folders(data, label_of)
    elif _image_files(val, val):
        source.splits["val"] = _imagenet_val_flat(data, look, label_of, source)
    else:
        source.notes.append("val/ is empty: train only")
    if (data / "test").is_dir():
        count = len(_image_files(data / "test", data))
        source.notes.append(f"test/ has no labels: skipped ({count} images)")
    return from_root(source, data, root)


# --- synthetic ------------------------------------------------------------------------------------


def synthetic_images(labels: np.ndarray, size: int, channels: int, num_classes: int, seed: int) -> np.ndarray:
    """Deterministic images whose class shows as a per-class colour pattern under noise.

    The pattern is a fixed random low-resolution image per class, upsampled: a small CNN learns it
    in an epoch or two, yet it is not a single pixel a linear model reads off.
    """
    patterns = np.random.default_rng(12345).random((num_classes, 4, 4, channels))
    reps = -(-size // 4)
    patterns = np.repeat(np.repeat(patterns, reps, axis=1), reps, axis=2)[:, :size, :size]
    noise = np.random.default_rng(seed).random((len(labels), size, size, channels))
    images = 0.6 * patterns[labels] + 0.4 * noise
    images = np.rint(images * 255).astype(np.uint8)
    return images[..., 0] if channels == 1 else images


def read_synthetic(num_classes: int, image_size: int, num_samples: int, channels: int) -> Source:
    if num_classes < 1 or image_size < 1 or num_samples < 1 or channels not in (1, 3):
        raise UsageError("synthetic: --num-classes, --image-size, --num-samples must be >= 1 and --channels 1 or 3")
    splits = {}
    # test is a fifth of train, as in CIFAR (50k/10k); balanced labels, cycled.
    for offset, (name, count) in enumerate((("train", num_samples), ("test", max(1, num_samples // 5)))):
        labels = np.arange(count, dtype=np.int64) % num_classes
        images = synthetic_images(labels, image_size, channels, num_classes, seed=1000 + offset)
        splits[name] = Split(labels=labels, images=images, ids=array_ids(f"synthetic-{name}", count))
    return Source(
        name="synthetic",
        classes=[f"class_{i}" for i in range(num_classes)],
        splits=splits,
        image_size=(image_size, image_size),
        channels=channels,
    )


READERS: dict[str, Callable[[Path], Source]] = {
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "mnist": read_mnist,
    "fashion-mnist": read_fashion_mnist,
    "tiny-imagenet": read_tiny_imagenet,
    "imagefolder": read_imagefolder,
    "imagenet": read_imagenet,
}
SOURCES = (*READERS, "synthetic")
