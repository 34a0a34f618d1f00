"""Fabricate small datasets in the exact on-disk layouts they are distributed in.

Each `make_*` writes files and returns what a correct reader must find, so tests compare the shards
against the fabricated truth rather than against the reader's own view.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# --- Python 2 pickles, as cPickle wrote the CIFAR batches -----------------------------------------


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote it: every str and bytes is a Python 2 `str`.

    Python 2 `str` is the (SHORT_)BINSTRING opcode; Python 3 loads it as str with
    encoding='latin1' and as bytes with encoding='bytes'. numpy's globals get their Python 2
    module names (numpy.core.multiarray), as in the real files.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[type] = save_global


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 -> N x 3072 rows of R, G, B planes, as the CIFAR batches store them."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


@dataclass
class Truth:
    """What the fabricated source holds, per split: images (arrays or file bytes) and labels."""

    classes: list[str]
    images: dict[str, list] = field(default_factory=dict)  # np.ndarray or encoded bytes
    labels: dict[str, list[int]] = field(default_factory=dict)
    coarse: dict[str, list[int]] = field(default_factory=dict)
    paths: dict[str, list[str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # path -> the odd kind of file it is, where that matters


def make_cifar10(root: Path, per_batch: int = 6, test: int = 8, seed: int = 0) -> Truth:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    truth = Truth(classes, {"train": [], "test": []}, {"train": [], "test": []})
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in batches:
        n = test if name == "test_batch" else per_batch
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        batch = {
            "batch_label": f"training batch {name[-1]} of 5" if name != "test_batch" else "testing batch 1 of 1",
            "labels": labels,
            "data": cifar_rows(images),
            "filenames": [f"img_{name}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(py2_pickle(batch))
        split = "test" if name == "test_batch" else "train"
        truth.images[split] += list(images)
        truth.labels[split] += labels
    meta = {"num_cases_per_batch": per_batch, "label_names": classes, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    (folder / "readme.html").write_text("<html></html>")
    return truth


def make_cifar100(root: Path, train: int = 30, test: int = 10, seed: int = 0) -> Truth:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"fine_{i:02d}" for i in range(100)]
    coarse = [f"coarse_{i:02d}" for i in range(20)]
    truth = Truth(fine)
    for split, n in (("train", train), ("test", test)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine_labels = [int(x) for x in rng.integers(0, 100, n)]
        coarse_labels = [f // 5 for f in fine_labels]
        batch = {
            "filenames": [f"{split}_{i}.png" for i in range(n)],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine_labels,
            "coarse_labels": coarse_labels,
            "data": cifar_rows(images),
        }
        (folder / split).write_bytes(py2_pickle(batch))
        truth.images[split], truth.labels[split], truth.coarse[split] = list(images), fine_labels, coarse_labels
    (folder / "meta").write_bytes(py2_pickle({"fine_label_names": fine, "coarse_label_names": coarse}))
    return truth


# --- IDX ------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: magic 0x00 0x00 0x08 (unsigned byte) ndim, big-endian dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def make_idx(folder: Path, train: int = 40, test: int = 12, gz: bool = True, seed: int = 0, size=(28, 28)) -> Truth:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = Truth([str(i) for i in range(10)])
    for split, prefix, n in (("train", "train", train), ("test", "t10k", test)):
        images = rng.integers(0, 256, (n, *size), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            if gz:
                # mtime=0: the same truth gives the same .gz bytes
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (folder / stem).write_bytes(data)
        truth.images[split], truth.labels[split] = list(images), [int(x) for x in labels]
    return truth


# --- encoded image files --------------------------------------------------------------------------


def noise_image(rng: np.random.Generator, mode: str, size: tuple[int, int]) -> Image.Image:
    """A random image of `mode` and PIL size (width, height); smooth enough to encode small."""
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        im = rgb.convert("RGBA")
        im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L"))
        return im
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return rgb.convert(mode)


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_tiny_imagenet(
    root: Path, wnids=("n01443537", "n01629819", "n01641577"), per_class: int = 4, val: int = 6, seed: int = 0
) -> Truth:
    """tiny-imagenet-200/ as distributed: a few of its JPEGs are grayscale, as in the real set."""
    rng = np.random.default_rng(seed)
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    # The real wnids.txt is not sorted; labels follow sorted order (torchvision ImageFolder's).
    (folder / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    words = {
        "n01443537": "goldfish, Carassius auratus",
        "n01629819": "European fire salamander, Salamandra salamandra",
        "n01641577": "bullfrog, Rana catesbeiana",
        "n00001740": "entity",
    }
    (folder / "words.txt").write_text("".join(f"{k}\t{v}\n" for k, v in words.items()))
    classes = [words[w].split(",")[0] for w in sorted(wnids)]
    truth = Truth(classes, {"train": [], "val": []}, {"train": [], "val": []}, paths={"train": [], "val": []})
    for label, wnid in enumerate(sorted(wnids)):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for i in range(per_class):
            mode = "L" if i == 1 else "RGB"  # a grayscale JPEG in every class
            data = encode(noise_image(rng, mode, (64, 64)), "JPEG")
            (images / f"{wnid}_{i}.JPEG").write_bytes(data)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t5\t60\t62")
            truth.images["train"].append(data)
            truth.labels["train"].append(label)
            truth.paths["train"].append(f"train/{wnid}/images/{wnid}_{i}.JPEG")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(val):
        wnid = sorted(wnids)[i % len(wnids)]
        data = encode(noise_image(rng, "L" if i == 2 else "RGB", (64, 64)), "JPEG")
        (folder / "val" / "images" / f"val_{i}.JPEG").write_bytes(data)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t32\t44\t62")
        truth.images["val"].append(data)
        truth.labels["val"].append(sorted(wnids).index(wnid))
        truth.paths["val"].append(f"val/images/val_{i}.JPEG")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (folder / "test" / "images").mkdir(parents=True)
    for i in range(3):
        (folder / "test" / "images" / f"test_{i}.JPEG").write_bytes(encode(noise_image(rng, "RGB", (64, 64)), "JPEG"))
    return truth


# (relative path, mode, format) of the messy ImageFolder's decodable images
MESSY_FILES = [
    ("train/cat/a.png", "RGB", "PNG"),
    ("train/cat/nested/deeper/b.png", "L", "PNG"),
    ("train/cat/c.jpg", "RGB", "JPEG"),
    ("train/dog/d.png", "RGBA", "PNG"),
    ("train/dog/e.png", "P", "PNG"),
    ("train/dog/f.jpg", "CMYK", "JPEG"),
    ("train/dog/g.jpeg", "L", "JPEG"),
    ("train/emu/h.bmp", "RGB", "BMP"),
    ("train/emu/i.png", "RGB", "PNG"),
    ("train/emu/j.png", "LA", "PNG"),
    ("val/cat/k.png", "RGB", "PNG"),
    ("val/dog/l.jpg", "RGB", "JPEG"),
    ("val/emu/m.png", "P", "PNG"),
]


def make_imagefolder(root: Path, size=(20, 12), seed: int = 0, odd_size: tuple[int, int] | None = None) -> Truth:
    """A messy ImageFolder: nested dirs, L/RGB/RGBA/P/CMYK/LA, a BMP, a truncated JPEG, a text file.

    `size` is PIL's (width, height): non-square, so height/width mix-ups show. `odd_size` makes
    train/emu/i.png that size instead.
    """
    rng = np.random.default_rng(seed)
    classes = ["cat", "dog", "emu"]
    truth = Truth(classes, paths={})
    for rel, mode, fmt in MESSY_FILES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        this_size = odd_size if (odd_size and rel == "train/emu/i.png") else size
        data = encode(noise_image(rng, mode, this_size), fmt)
        path.write_bytes(data)
        split, cls = rel.split("/")[:2]
        truth.images.setdefault(split, []).append(data)
        truth.labels.setdefault(split, []).append(classes.index(cls))
        truth.paths.setdefault(split, []).append(rel)
    good = encode(noise_image(rng, "RGB", size), "JPEG")
    (root / "train" / "dog" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "train" / "cat" / "notes.txt").write_text("not an image\n")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return truth


# --- ImageNet (ILSVRC-2012 CLS-LOC) ---------------------------------------------------------------

# Real lines of LOC_synset_mapping.txt. ImageNet names two classes "crane" (the bird, the machine).
IMAGENET_WORDS = {
    "n01440764": "tench, Tinca tinca",
    "n01443537": "goldfish, Carassius auratus",
    "n02012849": "crane",
    "n03126707": "crane",
}
# The real file lists all 1000 classes; a subset's train/ has fewer.
IMAGENET_UNUSED_WORDS = {
    "n01484850": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
    "n15075141": "toilet tissue, toilet paper, bathroom tissue",
}
# The odd files real ImageNet has in train/: 22 CMYK JPEGs, grayscale JPEGs, a PNG under a .JPEG name
# (n02105855_2933.JPEG); and a progressive JPEG, which some re-distributions contain.
IMAGENET_ODD = {
    "n01440764_9001.JPEG": "cmyk_jpeg",
    "n01443537_9002.JPEG": "grayscale_jpeg",
    "n02012849_9003.JPEG": "png_named_jpeg",
    "n03126707_9004.JPEG": "progressive_jpeg",
}


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """An RGB image of PIL size (width, height) with smooth structure and mild noise, like a photo: its
    JPEG is small and a resize of it is a meaningful comparison (pure noise is neither)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    freq, phase = rng.uniform(2, 9, 3), rng.uniform(0, 6.3, 3)
    planes = [np.sin(freq[c] * (x + y * (c + 1) / 3) * np.pi + phase[c]) for c in range(3)]
    image = 128 + 90 * np.stack(planes, -1) + rng.normal(0, 3, (h, w, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def imagenet_file(rng: np.random.Generator, kind: str, size: tuple[int, int]) -> bytes:
    im = photo_like(rng, size)
    buf = io.BytesIO()
    if kind == "cmyk_jpeg":
        im.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "grayscale_jpeg":
        im.convert("L").save(buf, "JPEG", quality=90)
    elif kind == "png_named_jpeg":
        im.save(buf, "PNG")
    elif kind == "progressive_jpeg":
        im.save(buf, "JPEG", quality=90, progressive=True)
    else:
        im.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def val_solution_row(image_id: str, wnid: str, rng: np.random.Generator) -> str:
    """A LOC_val_solution.csv row: every box repeats the image's wnid; the real rows end in a space."""
    boxes = " ".join(f"{wnid} {' '.join(str(v) for v in rng.integers(0, 300, 4))}" for _ in range(rng.integers(1, 3)))
    return f"{image_id},{boxes} "


def make_imagenet(
    root: Path,
    kaggle: bool = False,
    val_layout: str = "folders",
    mapping: bool = True,
    per_class: int = 3,
    val_per_class: int = 2,
    sides: tuple[int, int] = (40, 120),
    seed: int = 0,
) -> Truth:
    """ILSVRC-2012 as people have it: ROOT/{train,val,test}/ (val in <wnid>/ folders, as torchvision and
    the valprep.sh script leave it, or flat) with LOC_* files beside them; or, with `kaggle`, Kaggle's
    ROOT/ILSVRC/Data/CLS-LOC/{train,val,test}/ with ROOT/LOC_*. Images of random sizes, sides in `sides`.

    Truth.paths are relative to the folder holding train/; `kinds` maps a path to its odd kind.
    """
    rng = np.random.default_rng(seed)
    data = root.joinpath("ILSVRC", "Data", "CLS-LOC") if kaggle else root
    wnids = sorted(IMAGENET_WORDS)
    truth = Truth([IMAGENET_WORDS[w].split(",")[0] for w in wnids], paths={})

    def add(split: str, rel: str, label: int, kind: str = "jpeg") -> None:
        size = tuple(int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        payload = imagenet_file(rng, kind, size)
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(payload)
        truth.images.setdefault(split, []).append(payload)
        truth.labels.setdefault(split, []).append(label)
        truth.paths.setdefault(split, []).append(rel)
        truth.kinds[rel] = kind

    for label, wnid in enumerate(wnids):
        for i in range(per_class):
            add("train", f"train/{wnid}/{wnid}_{1000 + i}.JPEG", label)
        for name, kind in IMAGENET_ODD.items():
            if name.startswith(wnid):
                add("train", f"train/{wnid}/{name}", label, kind)
    rows = []
    for n in range(val_per_class * len(wnids)):
        image_id, label = f"ILSVRC2012_val_{n + 1:08d}", int(rng.integers(0, len(wnids)))
        add("val", f"val/{wnids[label]}/{image_id}.JPEG" if val_layout == "folders" else f"val/{image_id}.JPEG", label)
        rows.append(val_solution_row(image_id, wnids[label], rng))
    for n in range(2):
        path = data / "test" / f"ILSVRC2012_test_{n + 1:08d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(imagenet_file(rng, "jpeg", (64, 48)))
    loc = root  # beside train/ or, in Kaggle's layout, beside ILSVRC/
    if mapping:
        lines = {**IMAGENET_WORDS, **IMAGENET_UNUSED_WORDS}
        (loc / "LOC_synset_mapping.txt").write_text("".join(f"{w} {t}\n" for w, t in sorted(lines.items())))
    if val_layout == "flat":
        rng.shuffle(rows)  # the real file is not in ImageId order
        (loc / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    if kaggle:
        (loc / "LOC_sample_submission.csv").write_text("ImageId,PredictionString\nILSVRC2012_test_00000001,\n")
        (loc / "LOC_train_solution.csv").write_text(f"ImageId,PredictionString\n{wnids[0]}_1000,{wnids[0]} 1 2 3 4 \n")
    return truth
