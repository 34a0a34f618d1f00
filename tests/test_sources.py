"""Source readers against fabricated files in each dataset's real on-disk layout."""

from __future__ import annotations

import gzip
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fabricate  # noqa: E402

from resnet_dist import sources  # noqa: E402
from resnet_dist.errors import DataError, UsageError  # noqa: E402

# --- CIFAR ----------------------------------------------------------------------------------------


def test_fabricated_cifar_pickle_is_python2_shaped(tmp_path):
    fabricate.make_cifar10(tmp_path)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"  # protocol 2
    assert b"numpy.core.multiarray" in raw  # the Python 2 era module name
    as_str = pickle.loads(raw, encoding="latin1")
    as_bytes = pickle.loads(raw, encoding="bytes")
    assert set(as_str) == {"batch_label", "labels", "data", "filenames"}
    assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert np.array_equal(as_str["data"], as_bytes[b"data"])


@pytest.mark.parametrize("encoding", ["latin1", "bytes"])
def test_cifar_pickle_reader_gives_str_keys_either_way(tmp_path, encoding):
    fabricate.make_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    batch = sources.load_cifar_pickle(folder / "data_batch_2", encoding=encoding)
    assert {"data", "labels"} <= set(batch)
    meta = sources.load_cifar_pickle(folder / "batches.meta", encoding=encoding)
    assert sources._names(meta["label_names"])[:2] == ["airplane", "automobile"]


def test_cifar_rows_are_rgb_planes():
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[0, 0, 1] = (10, 20, 30)  # row 0, column 1
    row = fabricate.cifar_rows(image)[0]
    assert (row[1], row[1024 + 1], row[2048 + 1]) == (10, 20, 30)
    assert np.array_equal(sources.cifar_images({"data": row[None]}, "x"), image)


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_read_cifar10(tmp_path, point_at_folder):
    truth = fabricate.make_cifar10(tmp_path)
    root = tmp_path / "cifar-10-batches-py" if point_at_folder else tmp_path
    source = sources.read_cifar10(root)
    assert source.classes == truth.classes
    for split in ("train", "test"):
        data = source.splits[split]
        assert np.array_equal(data.images, np.stack(truth.images[split]))
        assert data.labels.tolist() == truth.labels[split]
    assert len(source.splits["train"]) == 30 and source.image_size == (32, 32) and source.channels == 3


def test_read_cifar100_keeps_coarse_labels(tmp_path):
    truth = fabricate.make_cifar100(tmp_path)
    source = sources.read_cifar100(tmp_path)
    assert source.classes == truth.classes and len(source.extra_labels["coarse"]) == 20
    for split in ("train", "test"):
        assert source.splits[split].labels.tolist() == truth.labels[split]
        assert source.splits[split].coarse.tolist() == truth.coarse[split]


def test_cifar_damaged_batch_is_a_data_error(tmp_path):
    fabricate.make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3"):
        sources.read_cifar10(tmp_path)


# --- IDX ------------------------------------------------------------------------------------------


def test_idx_gzipped_and_plain_read_the_same(tmp_path):
    truth = fabricate.make_idx(tmp_path / "gz", gz=True)
    fabricate.make_idx(tmp_path / "plain", gz=False)
    a = sources.read_fashion_mnist(tmp_path / "gz")
    b = sources.read_mnist(tmp_path / "plain")
    for split in ("train", "test"):
        assert np.array_equal(a.splits[split].images, np.stack(truth.images[split]))
        assert np.array_equal(a.splits[split].images, b.splits[split].images)
        assert a.splits[split].labels.tolist() == truth.labels[split] == b.splits[split].labels.tolist()
    assert a.classes[0] == "T-shirt/top" and b.classes[3] == "3 - three"
    assert a.channels == 1 and a.image_size == (28, 28)


def test_idx_torchvision_raw_layout(tmp_path):
    fabricate.make_idx(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert len(sources.read_fashion_mnist(tmp_path).splits["test"]) == 12


def test_idx_truncated_is_a_data_error(tmp_path):
    fabricate.make_idx(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="promises"):
        sources.read_mnist(tmp_path)


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))
    with pytest.raises(DataError, match="magic"):
        sources.read_idx(path)


# --- Tiny ImageNet --------------------------------------------------------------------------------


def test_read_tiny_imagenet(tmp_path):
    truth = fabricate.make_tiny_imagenet(tmp_path)
    source = sources.read_tiny_imagenet(tmp_path)
    assert source.classes == truth.classes == ["goldfish", "European fire salamander", "bullfrog"]
    for split in ("train", "val"):
        data = source.splits[split]
        assert list(data.files) == truth.paths[split]
        assert data.labels.tolist() == truth.labels[split]
    assert "test" not in source.splits
    assert any("test/ has no labels" in n for n in source.notes)
    samples = list(sources.iter_samples(source.splits["val"]))
    assert [s.data for s in samples] == truth.images["val"]
    assert source.channels == 3 and source.image_size == (64, 64)


def test_tiny_imagenet_val_mismatches_are_skipped(tmp_path):
    fabricate.make_tiny_imagenet(tmp_path)
    folder = tmp_path / "tiny-imagenet-200"
    (folder / "val" / "images" / "val_0.JPEG").unlink()
    (folder / "val" / "images" / "stray.JPEG").write_bytes(b"x")
    source = sources.read_tiny_imagenet(folder)
    reasons = {s["path"]: s["reason"] for s in source.skipped}
    assert reasons == {
        "val/images/val_0.JPEG": "listed in val_annotations.txt but missing",
        "val/images/stray.JPEG": "not in val_annotations.txt",
    }
    assert len(source.splits["val"]) == 5


def test_tiny_imagenet_unknown_wnid(tmp_path):
    fabricate.make_tiny_imagenet(tmp_path)
    path = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    path.write_text(path.read_text() + "val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="val_annotations.txt:7"):
        sources.read_tiny_imagenet(tmp_path)


# --- ImageFolder ----------------------------------------------------------------------------------


def test_read_messy_imagefolder(tmp_path):
    truth = fabricate.make_imagefolder(tmp_path)
    source = sources.read_imagefolder(tmp_path)
    assert source.classes == ["cat", "dog", "emu"]
    assert set(source.splits) == {"train", "val"}
    train = source.splits["train"]
    # nested files found; the truncated JPEG is listed (the writer finds it does not decode)
    assert sorted(train.files) == sorted(truth.paths["train"] + ["train/dog/broken.jpg"])
    labels = dict(zip(train.files, train.labels.tolist()))
    assert labels["train/cat/nested/deeper/b.png"] == 0 and labels["train/emu/h.bmp"] == 2
    assert any("train/cat/notes.txt" in n for n in source.notes)  # text file ignored, said once
    assert source.image_size is None and source.channels is None  # decided from the files


def test_imagefolder_without_split_level(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"ROOT/<split>/<class>/<image>.*holds images directly"):
        sources.read_imagefolder(tmp_path)


# --- ImageNet -------------------------------------------------------------------------------------

IMAGENET_NAMES = ["tench", "goldfish", "crane (n02012849)", "crane (n03126707)"]  # the two cranes told apart


@pytest.mark.parametrize(
    "kaggle,val_layout,point_at",
    [
        (False, "folders", "root"),
        (False, "flat", "root"),
        (True, "flat", "root"),  # ROOT/ILSVRC/Data/CLS-LOC/..., ROOT/LOC_*
        (True, "flat", "data"),  # --root at CLS-LOC itself: the LOC_* files are three levels up
        (True, "folders", "root"),
    ],
)
def test_read_imagenet_layouts(tmp_path, kaggle, val_layout, point_at):
    truth = fabricate.make_imagenet(tmp_path, kaggle=kaggle, val_layout=val_layout)
    data = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else tmp_path
    source = sources.read_imagenet(data if point_at == "data" else tmp_path)
    assert source.classes == IMAGENET_NAMES and source.channels == 3 and source.image_size is None
    assert set(source.splits) == {"train", "val"}
    for split in ("train", "val"):
        got = source.splits[split]
        assert got.root == data
        assert dict(zip(got.files, got.labels.tolist())) == dict(zip(truth.paths[split], truth.labels[split]))
    assert any(n == "test/ has no labels: skipped (2 images)" for n in source.notes)
    samples = list(sources.iter_samples(source.splits["train"]))
    assert sorted(s.data for s in samples) == sorted(truth.images["train"])


def test_imagenet_without_mapping_names_classes_by_wnid(tmp_path):
    fabricate.make_imagenet(tmp_path, mapping=False)
    assert sources.read_imagenet(tmp_path).classes == ["n01440764", "n01443537", "n02012849", "n03126707"]


def test_imagenet_val_solution_labels_by_the_first_wnid(tmp_path):
    truth = fabricate.make_imagenet(tmp_path, val_layout="flat")
    csv = tmp_path / "LOC_val_solution.csv"
    rows = csv.read_text().splitlines()
    assert rows[0] == "ImageId,PredictionString" and rows[1].endswith(" ")
    # A row whose boxes name two wnids (none do in the real file): the first one is the label.
    image_id = "ILSVRC2012_val_00000001"
    rows = [r for r in rows if not r.startswith(image_id)] + [f"{image_id},n03126707 1 2 3 4 n01440764 5 6 7 8 "]
    csv.write_text("\n".join(rows) + "\n")
    val = sources.read_imagenet(tmp_path).splits["val"]
    labels = dict(zip(val.files, val.labels.tolist()))
    assert labels[f"val/{image_id}.JPEG"] == 3
    assert len(labels) == len(truth.paths["val"])


def test_imagenet_val_solution_row_without_image_is_skipped(tmp_path):
    fabricate.make_imagenet(tmp_path, val_layout="flat")
    (tmp_path / "val" / "ILSVRC2012_val_00000003.JPEG").unlink()
    source = sources.read_imagenet(tmp_path)
    assert source.skipped == [
        {"path": "val/ILSVRC2012_val_00000003.JPEG", "reason": "listed in LOC_val_solution.csv but missing"}
    ]
    assert len(source.splits["val"]) == 7


@pytest.mark.parametrize(
    "damage,error,message",
    [
        (
            "unlisted val image",
            DataError,
            r"LOC_val_solution.csv: no row for val/ILSVRC2012_val_00000009.JPEG \(1 of 9",
        ),
        ("unknown wnid in csv", DataError, r"LOC_val_solution.csv:\d+: wnid n09999999 is not a class in train/"),
        ("unknown wnid folder", DataError, r"val/n09999999: wnid n09999999 is not a class in train/"),
        ("no csv", UsageError, r"imagenet: .*/val holds images directly: it needs LOC_val_solution.csv in "),
        ("bad header", DataError, r"LOC_val_solution.csv: expected the header 'ImageId,PredictionString'"),
        ("bad mapping line", DataError, r"LOC_synset_mapping.txt:3: expected '<wnid> <names>'"),
        ("mapping lacks a wnid", DataError, r"LOC_synset_mapping.txt: no line for 1 train wnid\(s\), e.g. n01443537"),
        ("not a wnid folder", UsageError, r"train must hold one <wnid>/ folder per class .* found cats"),
        ("mixed val", UsageError, r"holds both <wnid>/ folders and loose images"),
    ],
)
def test_imagenet_bad_input(tmp_path, damage, error, message):
    flat = damage in ("unlisted val image", "unknown wnid in csv", "no csv", "bad header")
    fabricate.make_imagenet(tmp_path, val_layout="flat" if flat else "folders")
    csv, mapping = tmp_path / "LOC_val_solution.csv", tmp_path / "LOC_synset_mapping.txt"
    if damage == "unlisted val image":
        (tmp_path / "val" / "ILSVRC2012_val_00000009.JPEG").write_bytes(
            (tmp_path / "val").iterdir().__next__().read_bytes()
        )
    elif damage == "unknown wnid in csv":
        csv.write_text(csv.read_text() + "ILSVRC2012_val_00000099,n09999999 1 2 3 4 \n")
    elif damage == "unknown wnid folder":
        (tmp_path / "val" / "n09999999").mkdir()
    elif damage == "no csv":
        csv.unlink()
    elif damage == "bad header":
        csv.write_text("id,label\n" + csv.read_text().split("\n", 1)[1])
    elif damage == "bad mapping line":
        lines = mapping.read_text().splitlines()
        mapping.write_text("\n".join(lines[:2] + ["n01443537"] + lines[3:]) + "\n")
    elif damage == "mapping lacks a wnid":
        mapping.write_text("".join(f"{line}\n" for line in mapping.read_text().splitlines() if "n01443537" not in line))
    elif damage == "not a wnid folder":
        (tmp_path / "train" / "cats").mkdir()
    elif damage == "mixed val":
        (tmp_path / "val" / "stray.JPEG").write_bytes(b"x")
    with pytest.raises(error, match=message) as err:
        sources.read_imagenet(tmp_path)
    assert "\n" not in str(err.value)


# --- synthetic ------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_class_dependent():
    a = sources.read_synthetic(4, 16, 40, 3)
    b = sources.read_synthetic(4, 16, 40, 3)
    assert np.array_equal(a.splits["train"].images, b.splits["train"].images)
    assert len(a.splits["test"]) == 8 and a.splits["train"].images.shape == (40, 16, 16, 3)
    images, labels = a.splits["train"].images.astype(float), a.splits["train"].labels
    means = np.stack([images[labels == c].mean(0) for c in range(4)])
    assert np.abs(means[0] - means[1]).mean() > 10  # the class signal is visible
    gray = sources.read_synthetic(3, 8, 9, 1)
    assert gray.splits["train"].images.shape == (9, 8, 8)


# --- wrong roots ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(sources.READERS))
def test_wrong_root_names_the_expected_layout(tmp_path, name):
    (tmp_path / "some_file.txt").write_text("x")
    with pytest.raises(UsageError) as err:
        sources.READERS[name](tmp_path / ("missing" if name == "imagefolder" else ""))
    message = str(err.value)
    assert message.startswith(name) and "expected" in message and "\n" not in message


def test_split_take_keeps_files_and_labels_together(tmp_path):
    fabricate.make_tiny_imagenet(tmp_path)
    train = sources.read_tiny_imagenet(tmp_path).splits["train"]
    sub = train.take([5, 0])
    assert sub.files == (train.files[5], train.files[0])
    assert sub.labels.tolist() == [train.labels[5], train.labels[0]]
