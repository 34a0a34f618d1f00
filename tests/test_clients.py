"""Standard clients read our shards: webdataset's WebDataset and Hugging Face datasets' webdataset builder.

Shards come from the real CLI; the truth each client is held to comes from the source, not from our
reader: every sample's origin (its per-sample table) names the generated image or the IDX row it came
from, and that row's label is what the client must read.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import webdataset as wds
from helpers import FASHION, fashion_subset, ok, shard
from PIL import Image

from resnet_dist.index import load_index
from resnet_dist.sources import read_idx

CLASSES = 4


def truth(folder: Path, split: str, label_of) -> tuple[list[str], list[int]]:
    """(keys, labels) of a split in shard order, the labels looked up from each sample's origin."""
    keys, labels = [], []
    for info in load_index(folder).splits[split].shards:
        table = json.loads((folder / info.samples).read_text())
        keys += table["keys"]
        labels += [label_of(origin) for origin in table["origins"]]
    return keys, labels


def urls(folder: Path, split: str) -> list[str]:
    return [str(folder / info.file) for info in load_index(folder).splits[split].shards]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clients") / "synthetic"
    args = ["--num-samples", "300", "--shard-size", "70", "--image-size", "8", "--num-classes", str(CLASSES)]
    ok(shard("synthetic", "--out", str(out), *args, "--workers", "1"))
    return out


def synthetic_label(origin: str) -> int:
    """synthetic-SPLIT[i] is generated with label i % classes (sources.read_synthetic)."""
    return int(origin.rsplit("[", 1)[1].rstrip("]")) % CLASSES


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    return fashion_subset(tmp_path_factory.mktemp("clients") / "fashion", 1500, "--shard-size", "400")


def fashion_label(origin: str) -> int:
    """train-images-idx3-ubyte[i] -> row i of the matching labels file."""
    name, row = origin.rstrip("]").split("[")
    labels = name.replace("images-idx3", "labels-idx1")
    if labels not in LABELS:
        LABELS[labels] = read_idx(FASHION / f"{labels}.gz")
    return int(LABELS[labels][int(row)])


LABELS: dict[str, np.ndarray] = {}


def read_with_webdataset(folder: Path, split: str) -> tuple[list[str], list[int], Image.Image]:
    samples = list(wds.WebDataset(urls(folder, split), shardshuffle=False))
    image = Image.open(io.BytesIO(samples[0]["png"]))
    return [s["__key__"] for s in samples], [int(s["cls"]) for s in samples], image


def read_with_datasets(files, cache: Path) -> datasets.DatasetDict:
    return datasets.load_dataset("webdataset", data_files=files, cache_dir=str(cache))


@pytest.mark.parametrize("split", ["train", "test"])
def test_webdataset_reads_synthetic_shards(synthetic, split):
    keys, labels, image = read_with_webdataset(synthetic, split)
    assert (keys, labels) == truth(synthetic, split, synthetic_label)
    assert len(keys) == load_index(synthetic).splits[split].num_samples
    assert image.size == (8, 8)


def test_webdataset_reads_fashion_mnist_shards(fashion):
    keys, labels, image = read_with_webdataset(fashion, "train")
    assert (keys, labels) == truth(fashion, "train", fashion_label) and len(keys) == 1500
    assert image.size == (28, 28) and image.mode == "L"


def test_hf_datasets_reads_synthetic_shards(synthetic, tmp_path):
    loaded = read_with_datasets({s: urls(synthetic, s) for s in ("train", "test")}, tmp_path)
    for split in ("train", "test"):
        keys, labels = truth(synthetic, split, synthetic_label)
        assert loaded[split]["__key__"] == keys and loaded[split]["cls"] == labels
        assert loaded[split].num_rows == load_index(synthetic).splits[split].num_samples
    assert loaded["train"][0]["png"].size == (8, 8)


def test_hf_datasets_reads_fashion_mnist_shards(fashion, tmp_path):
    loaded = read_with_datasets({"train": urls(fashion, "train")}, tmp_path)["train"]
    keys, labels = truth(fashion, "train", fashion_label)
    assert loaded["__key__"] == keys and loaded["cls"] == labels
    assert loaded[0]["png"].mode == "L"


def test_hf_datasets_reads_the_shard_folder_itself(synthetic, tmp_path):
    """`data_dir=` hands the builder every file whose name holds a split name: per-sample tables are named by
    content (samples-HEX.json), never by split, so the folder as it is loads, with every sample."""
    loaded = datasets.load_dataset("webdataset", data_dir=str(synthetic), cache_dir=str(tmp_path / "dir"))
    index = load_index(synthetic)
    assert {s: loaded[s].num_rows for s in loaded} == {s: index.splits[s].num_samples for s in ("train", "test")}
