"""python -m resnet_dist.shard end to end: fabricated sources in, shards read back independently.

Shards are read back with the standard library's tarfile and PIL (and once with plain webdataset
and plain `tar`), never with the writer's own reader, so a writer bug cannot hide behind a
matching reader bug.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import fabricate  # noqa: E402

from resnet_dist import shard  # noqa: E402
from resnet_dist.errors import DataError  # noqa: E402
from resnet_dist.index import load_index  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


# --- helpers --------------------------------------------------------------------------------------


def pack(*argv: str | Path) -> int:
    args = [str(a) for a in argv]
    if "--workers" not in args:
        args += ["--workers", "1"]
    return shard.main(args)


def cli(*argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnet_dist.shard", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def read_split(out: Path, split: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample, in shard order, via tarfile: independent of shard.py."""
    index = load_index(out)
    samples = []
    for info in index.splits[split].shards:
        with tarfile.open(out / info.file) as tar:
            grouped: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, _, suffix = member.name.partition(".")
                grouped.setdefault(key, {})[suffix] = tar.extractfile(member).read()
        assert len(grouped) == info.num_samples
        samples += list(grouped.items())
    return samples


def image_of(members: dict[str, bytes]) -> tuple[str, bytes]:
    (ext,) = [k for k in members if k in ("png", "jpg")]
    return ext, members[ext]


def pixels(data: bytes, channels: int) -> np.ndarray:
    """Decode as the contract says the trainer does: PIL, then convert to L or RGB."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB"))


def label(members: dict[str, bytes], suffix: str = "cls") -> int:
    return int(members[suffix].decode("ascii"))


def numpy_mean_std(out: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    index = load_index(out)
    images = [pixels(image_of(m)[1], index.channels) for _, m in read_split(out, split)]
    flat = np.concatenate([im.reshape(-1, index.channels) for im in images]).astype(np.float64) / 255
    return flat.mean(0), flat.std(0)


def assert_stats_match_numpy(out: Path, split: str = "train") -> None:
    index = load_index(out)
    mean, std = numpy_mean_std(out, split)
    np.testing.assert_allclose(index.mean, mean, atol=1e-6)
    np.testing.assert_allclose(index.std, std, atol=1e-6)


def assert_array_round_trip(out: Path, truth: fabricate.Truth, channels: int) -> None:
    """Every source image exactly once, identical pixels, right label (and coarse label)."""
    for split, images in truth.images.items():
        got = Counter()
        for _, members in read_split(out, split):
            ext, data = image_of(members)
            assert ext == "png"
            extra = (label(members, "coarse.cls"),) if truth.coarse else ()
            got[(pixels(data, channels).tobytes(), label(members), *extra)] += 1
        want = Counter()
        for i, image in enumerate(images):
            extra = (truth.coarse[split][i],) if truth.coarse else ()
            want[(np.asarray(image).tobytes(), truth.labels[split][i], *extra)] += 1
        assert got == want, split


def shas(out: Path) -> dict[str, str]:
    return {s.file: s.sha256 for split in load_index(out).splits.values() for s in split.shards}


# --- tar framing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,size", [("train_00000001.png", 524), ("a.cls", 1), ("x" * 99, 0), ("val_00001234.coarse.cls", 512)]
)
def test_tar_member_is_what_tarfile_writes(name, size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, shard.TAR_MTIME, 0o644, "", ""
        tar.addfile(info, io.BytesIO(payload))
    mine = shard.tar_member(name, payload)
    assert buf.getvalue() == mine + shard.tar_end(len(mine))


# --- round trips, one per source ------------------------------------------------------------------


def test_cifar10_round_trip_stats_and_verify(tmp_path):
    truth = fabricate.make_cifar10(tmp_path / "src")
    out = tmp_path / "out"
    assert pack("cifar10", "--root", tmp_path / "src", "--out", out, "--shard-size", "7") == 0
    index = load_index(out)
    assert (index.splits["train"].num_samples, index.splits["test"].num_samples) == (30, 8)
    assert [s.num_samples for s in index.splits["train"].shards] == [7, 7, 7, 7, 2]
    assert index.classes == truth.classes and index.image_size == (32, 32) and index.channels == 3
    assert_array_round_trip(out, truth, 3)
    assert_stats_match_numpy(out)
    assert shard.verify(out) == []
    keys = [k for k, _ in read_split(out, "train")]
    assert keys == [f"train_{i:08d}" for i in range(30)]


def test_cifar100_keeps_coarse_label(tmp_path):
    truth = fabricate.make_cifar100(tmp_path / "src")
    out = tmp_path / "out"
    pack("cifar100", "--root", tmp_path / "src" / "cifar-100-python", "--out", out)
    index = load_index(out)
    assert index.num_classes == 100 and len(index.extra_labels["coarse"]) == 20
    assert_array_round_trip(out, truth, 3)
    assert shard.verify(out) == []


@pytest.mark.parametrize("source,gz", [("mnist", True), ("fashion-mnist", False)])
def test_idx_round_trip(tmp_path, source, gz):
    truth = fabricate.make_idx(tmp_path / "src", gz=gz)
    out = tmp_path / "out"
    pack(source, "--root", tmp_path / "src", "--out", out)
    assert load_index(out).channels == 1
    assert_array_round_trip(out, truth, 1)
    assert_stats_match_numpy(out)


def test_tiny_imagenet_copies_jpegs_byte_for_byte(tmp_path):
    truth = fabricate.make_tiny_imagenet(tmp_path / "src")
    out = tmp_path / "out"
    pack("tiny-imagenet", "--root", tmp_path / "src", "--out", out)
    index = load_index(out)
    assert index.channels == 3 and index.image_size == (64, 64) and set(index.splits) == {"train", "val"}
    for split in ("train", "val"):
        got = Counter((image_of(m)[1], label(m)) for _, m in read_split(out, split))
        assert got == Counter(zip(truth.images[split], truth.labels[split]))  # grayscale JPEGs too
    assert any("test/ has no labels" in n for n in index.notes)
    assert_stats_match_numpy(out)
    assert shard.verify(out) == []


def test_tiny_imagenet_val_fraction_turns_its_val_into_test(tmp_path):
    fabricate.make_tiny_imagenet(tmp_path / "src", per_class=10)
    out = tmp_path / "out"
    pack("tiny-imagenet", "--root", tmp_path / "src", "--out", out, "--val-fraction", "0.2")
    index = load_index(out)
    counts = {k: v.num_samples for k, v in index.splits.items()}
    assert counts == {"train": 24, "val": 6, "test": 6}
    assert any("written as 'test'" in n for n in index.notes)


def test_messy_imagefolder(tmp_path):
    truth = fabricate.make_imagefolder(tmp_path / "src")
    out = tmp_path / "out"
    pack("imagefolder", "--root", tmp_path / "src", "--out", out)
    index = load_index(out)
    assert index.classes == ["cat", "dog", "emu"]
    assert index.image_size == (12, 20) and index.channels == 3  # (height, width); RGB wins
    assert [s["path"] for s in index.skipped] == ["train/dog/broken.jpg"]
    assert "truncated" in index.skipped[0]["reason"] or "decode" in index.skipped[0]["reason"]
    for split in ("train", "val"):
        got = read_split(out, split)
        assert len(got) == len(truth.images[split])
        by_payload = {image_of(m)[1]: (image_of(m)[0], label(m)) for _, m in got}
        by_pixels = {pixels(image_of(m)[1], 3).tobytes(): label(m) for _, m in got}
        for rel, data, lab in zip(truth.paths[split], truth.images[split], truth.labels[split]):
            if rel.endswith(".bmp"):  # not PNG/JPEG: re-encoded, losslessly, to PNG
                assert by_pixels[pixels(data, 3).tobytes()] == lab
            elif rel == "train/dog/f.jpg":  # CMYK: converted to an RGB JPEG, lossy stays lossy
                assert data not in by_payload
                (converted,) = [m for _, m in got if "jpg" in m and m["jpg"] not in truth.images[split]]
                assert label(converted) == lab and Image.open(io.BytesIO(converted["jpg"])).mode == "RGB"
                # the same picture through one JPEG round trip (pure noise: only its averages survive)
                got_mean, want_mean = pixels(converted["jpg"], 3).mean((0, 1)), pixels(data, 3).mean((0, 1))
                assert np.abs(got_mean - want_mean).max() < 3, (got_mean, want_mean)
            else:  # PNG, and baseline RGB/L JPEG: the file itself, untouched
                ext, lab_got = by_payload[data]
                assert lab_got == lab and ext == ("jpg" if rel.endswith(("jpg", "jpeg")) else "png")
    assert index.conversions == {"cmyk_jpeg": 1, "other_format": 1}
    assert any(n.startswith("1 grayscale JPEG(s) copied as they are") for n in index.notes)  # g.jpeg
    assert index.stats_sample == {"images": 10, "of": 10, "seed": 0}  # every train image: exact
    assert_stats_match_numpy(out)
    assert shard.verify(out) == []


def test_imagefolder_strict_fails_on_the_truncated_file(tmp_path):
    fabricate.make_imagefolder(tmp_path / "src")
    with pytest.raises(DataError, match=r"train/dog/broken.jpg: .*\(--strict\)"):
        pack("imagefolder", "--root", tmp_path / "src", "--out", tmp_path / "out", "--strict")
    assert not (tmp_path / "out" / "index.json").exists()


def test_imagefolder_differing_sizes(tmp_path):
    truth = fabricate.make_imagefolder(tmp_path / "src", odd_size=(30, 25))
    out = tmp_path / "out"
    pack("imagefolder", "--root", tmp_path / "src", "--out", out)
    index = load_index(out)
    assert index.image_size is None  # each image keeps its own size
    assert index.sizes == {
        "height": {"min": 12, "median": 12, "max": 25},
        "width": {"min": 20, "median": 20, "max": 30},
        "shorter_side": {"min": 12, "median": 12, "max": 25},
        "longer_side": {"min": 20, "median": 20, "max": 30},
    }
    (odd,) = [m for _, m in read_split(out, "train") if pixels(image_of(m)[1], 3).shape[:2] == (25, 30)]
    assert image_of(odd) == ("png", truth.images["train"][truth.paths["train"].index("train/emu/i.png")])
    assert shard.verify(out) == []
    assert_stats_match_numpy(out)
    # --max-size 16: only the 30x25 PNG is above it; it shrinks to 19x16 and, being lossless, stays PNG
    pack("imagefolder", "--root", tmp_path / "src", "--out", out, "--max-size", "16", "--overwrite")
    index = load_index(out)
    assert index.max_size == 16 and index.conversions == {"cmyk_jpeg": 1, "other_format": 1, "resized": 1}
    assert index.sizes["longer_side"] == {"min": 19, "median": 20, "max": 20}
    (odd,) = [m for _, m in read_split(out, "train") if pixels(image_of(m)[1], 3).shape[:2] == (16, 19)]
    assert image_of(odd)[0] == "png" and label(odd) == 2
    assert index.image_size is None and shard.verify(out) == []
    pack(
        "imagefolder", "--root", tmp_path / "src", "--out", out, "--image-size", "10", "--channels", "1", "--overwrite"
    )
    index = load_index(out)
    assert index.image_size == (10, 10) and index.channels == 1
    for _, members in read_split(out, "train"):
        assert pixels(image_of(members)[1], 1).shape == (10, 10)
    assert shard.verify(out) == []
    assert_stats_match_numpy(out)


def test_stats_sample_is_a_seeded_prefix_of_the_shuffle(tmp_path):
    fabricate.make_imagefolder(tmp_path / "src", odd_size=(30, 25))
    out = tmp_path / "out"
    pack("imagefolder", "--root", tmp_path / "src", "--out", out, "--stats-sample", "4", "--seed", "5")
    index = load_index(out)
    # the first 4 shuffled positions, less any that were skipped (the truncated JPEG)
    sampled = [m for k, m in read_split(out, "train") if int(k.split("_")[1]) < 4]
    assert index.stats_sample == {"images": len(sampled), "of": 10, "seed": 5} and len(sampled) >= 3
    flat = np.concatenate([pixels(image_of(m)[1], 3).reshape(-1, 3) for m in sampled]) / 255
    np.testing.assert_allclose(index.mean, flat.mean(0), atol=1e-6)
    np.testing.assert_allclose(index.std, flat.std(0), atol=1e-6)
    pack("imagefolder", "--root", tmp_path / "src", "--out", out, "--stats-sample", "0", "--overwrite")
    assert load_index(out).stats_sample == {"images": 10, "of": 10, "seed": 0}  # 0: all of them
    assert_stats_match_numpy(out)


def test_verify_checks_variable_sizes_against_the_index(tmp_path):
    fabricate.make_imagefolder(tmp_path / "src", odd_size=(30, 25))
    out = tmp_path / "out"
    pack("imagefolder", "--root", tmp_path / "src", "--out", out)
    assert shard.verify(out) == []
    obj = json.loads((out / "index.json").read_text())
    obj["sizes"]["longer_side"]["max"] = 31  # a distribution the images do not have
    (out / "index.json").write_text(json.dumps(obj))
    (problem,) = shard.verify(out)
    assert problem.startswith("sizes in index.json differ from the images' own") and "'max': 30" in problem


def test_tiny_jpegs_are_copied_too(tmp_path):
    """Copied JPEGs outside the stats sample are checked by a 1/8-scale decode: a 1x1 image must pass it."""
    sizes, rng = [(1, 1), (7, 5), (9, 3), (3, 17)], np.random.default_rng(0)
    files = {}
    for i, size in enumerate(sizes):
        files[f"train/a/{i}.jpg"] = fabricate.encode(fabricate.noise_image(rng, "RGB", size), "JPEG")
    for rel, data in files.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(data)
    out = tmp_path / "out"
    pack("imagefolder", "--root", tmp_path / "src", "--out", out, "--stats-sample", "1")
    index = load_index(out)
    assert index.skipped == [] and index.conversions == {} and index.stats_sample["images"] == 1
    assert sorted(image_of(m)[1] for _, m in read_split(out, "train")) == sorted(files.values())
    assert shard.verify(out) == []


def test_all_grayscale_imagefolder_gets_one_channel(tmp_path):
    for i, cls in enumerate(["a", "b", "a"]):
        path = tmp_path / "src" / "train" / cls / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((5, 6), 40 * i, dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    pack("imagefolder", "--root", tmp_path / "src", "--out", out)
    index = load_index(out)
    assert index.channels == 1 and index.image_size == (5, 6) and index.splits["train"].num_samples == 3


def test_synthetic_jpeg(tmp_path):
    out = tmp_path / "out"
    pack(
        "synthetic",
        "--num-classes",
        "3",
        "--num-samples",
        "30",
        "--image-size",
        "8",
        "--format",
        "jpeg",
        "--quality",
        "80",
        "--out",
        out,
    )
    index = load_index(out)
    assert index.format == "jpeg" and index.num_classes == 3
    assert {image_of(m)[0] for _, m in read_split(out, "train")} == {"jpg"}
    assert_stats_match_numpy(out)  # of the decoded JPEGs, not of the pixels before the loss
    assert shard.verify(out) == []


# --- ImageNet: variable sizes, odd files, --max-size -----------------------------------------------


def lower_median_stats(sizes: list[tuple[int, int]]) -> dict:
    """The index's `sizes`, computed here from (height, width) pairs."""
    columns = {
        "height": [h for h, _ in sizes],
        "width": [w for _, w in sizes],
        "shorter_side": [min(s) for s in sizes],
        "longer_side": [max(s) for s in sizes],
    }
    return {k: {"min": min(v), "median": sorted(v)[(len(v) - 1) // 2], "max": max(v)} for k, v in columns.items()}


def decoded_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def match_converted(members: dict, truth: fabricate.Truth, split: str, max_size: int | None = None) -> str:
    """The truth path a converted member came from: same label, same (or shrunk) size, closest pixels."""
    got = decoded_rgb(image_of(members)[1])
    best = None
    for rel, data, lab in zip(truth.paths[split], truth.images[split], truth.labels[split]):
        want = decoded_rgb(data)
        if max_size and min(want.size) > max_size:
            want = want.resize(shard.shrunk(*want.size, max_size), Image.Resampling.LANCZOS)
        if lab == label(members) and want.size == got.size:
            diff = np.abs(np.asarray(got, dtype=int) - np.asarray(want)).mean()
            best = min(best or (diff, rel), (diff, rel))
    # One JPEG round trip of a smooth picture is a few levels off; any other fabricated image, tens.
    assert best is not None and best[0] < 10, best
    return best[1]


@pytest.mark.parametrize("kaggle,val_layout", [(False, "folders"), (True, "flat")])
def test_imagenet_packs_with_right_labels_and_converts_odd_files(tmp_path, kaggle, val_layout):
    truth = fabricate.make_imagenet(tmp_path / "src", kaggle=kaggle, val_layout=val_layout)
    out = tmp_path / "out"
    assert pack("imagenet", "--root", tmp_path / "src", "--out", out) == 0
    index = load_index(out)
    assert index.source == "imagenet" and index.image_size is None and index.format == "jpeg"
    assert index.classes == ["tench", "goldfish", "crane (n02012849)", "crane (n03126707)"]
    assert index.conversions == {"cmyk_jpeg": 1, "png_named_jpeg": 1, "progressive_jpeg": 1}
    assert "1 grayscale JPEG(s) copied as they are: they decode to RGB like the rest" in index.notes
    assert "test/ has no labels: skipped (2 images)" in index.notes
    sizes = []
    for split in ("train", "val"):
        by_bytes = dict(zip(truth.images[split], truth.paths[split]))
        found = []
        for _, members in read_split(out, split):
            ext, data = image_of(members)
            im = Image.open(io.BytesIO(data))
            assert ext == "jpg" and im.format == "JPEG" and im.mode in ("RGB", "L") and "progressive" not in im.info
            rel = by_bytes.get(data) or match_converted(members, truth, split)
            assert (data in by_bytes) == (truth.kinds[rel] in ("jpeg", "grayscale_jpeg")), rel  # passthrough
            assert label(members) == truth.labels[split][truth.paths[split].index(rel)], rel
            found.append(rel)
            sizes.append((im.height, im.width))
        assert sorted(found) == sorted(truth.paths[split])  # every image exactly once
    assert index.sizes == lower_median_stats(sizes)
    assert index.sizes["shorter_side"]["min"] < index.sizes["shorter_side"]["max"]  # they do vary
    assert index.stats_sample == {"images": 16, "of": 16, "seed": 0}
    assert_stats_match_numpy(out)
    assert shard.verify(out) == []


def test_imagenet_max_size_shrinks_only_the_large_images(tmp_path):
    truth = fabricate.make_imagenet(tmp_path / "src", sides=(40, 200), per_class=4)
    out = tmp_path / "out"
    pack("imagenet", "--root", tmp_path / "src", "--out", out, "--max-size", "64", "--quality", "92")
    index = load_index(out)
    large = [
        rel
        for split in truth.paths
        for rel, data in zip(truth.paths[split], truth.images[split])
        if min(Image.open(io.BytesIO(data)).size) > 64
    ]
    assert 5 < len(large) < len(truth.kinds) - 5  # the fabricated sizes straddle the limit
    assert index.max_size == 64 and index.conversions["resized"] == len(large)
    assert index.sizes["shorter_side"]["max"] == 64 and index.sizes["longer_side"]["max"] > 64
    for split in ("train", "val"):
        by_bytes = dict(zip(truth.images[split], truth.paths[split]))
        for _, members in read_split(out, split):
            data = image_of(members)[1]
            if data in by_bytes:  # copied: small enough and a plain baseline JPEG
                assert by_bytes[data] not in large and truth.kinds[by_bytes[data]] in ("jpeg", "grayscale_jpeg")
                continue
            rel = match_converted(members, truth, split, max_size=64)
            source = Image.open(io.BytesIO(truth.images[split][truth.paths[split].index(rel)]))
            stored = Image.open(io.BytesIO(data))
            if rel in large:  # the shorter side brought to 64, the aspect ratio kept
                assert min(stored.size) == 64 and stored.size == shard.shrunk(*source.size, 64)
                assert abs(stored.width / stored.height - source.width / source.height) < 0.02
            else:
                assert stored.size == source.size and truth.kinds[rel] not in ("jpeg", "grayscale_jpeg")
    assert shard.verify(out) == []


def test_imagenet_bad_val_solution_is_one_line(tmp_path):
    fabricate.make_imagenet(tmp_path / "src", val_layout="flat")
    csv = tmp_path / "src" / "LOC_val_solution.csv"
    csv.write_text("".join(line + "\n" for line in csv.read_text().splitlines() if "_00000004," not in line))
    result = cli("imagenet", "--root", tmp_path / "src", "--out", tmp_path / "out", "--workers", "1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {csv}: no row for val/ILSVRC2012_val_00000004.JPEG (1 of 8")
    assert not (tmp_path / "out" / "index.json").exists()


# --- splitting, order, determinism ----------------------------------------------------------------


def test_val_split_is_stratified_and_disjoint(tmp_path):
    out = tmp_path / "out"
    pack(
        "synthetic",
        "--num-classes",
        "5",
        "--num-samples",
        "200",
        "--image-size",
        "4",
        "--channels",
        "1",
        "--val-fraction",
        "0.25",
        "--out",
        out,
    )
    index = load_index(out)
    assert index.splits["train"].num_samples == 150 and index.splits["val"].num_samples == 50
    val = read_split(out, "val")
    assert Counter(label(m) for _, m in val) == {c: 10 for c in range(5)}
    source = shard.read_synthetic(5, 4, 200, 1).splits["train"]
    everything = Counter(pixels(image_of(m)[1], 1).tobytes() for _, m in read_split(out, "train") + val)
    assert everything == Counter(image.tobytes() for image in source.images)


def test_carve_val_rounds_per_class():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 10)
    split = shard.Split(labels=labels, images=np.zeros((20, 2, 2), dtype=np.uint8))
    train, val = shard.carve_val(split, 0.3, seed=1)
    assert Counter(val.labels.tolist()) == {0: 2, 1: 1, 2: 3}
    assert len(train) + len(val) == 20
    again = shard.carve_val(split, 0.3, seed=1)[1]
    assert np.array_equal(again.labels, val.labels)


def test_samples_are_shuffled_across_classes(tmp_path):
    out = tmp_path / "out"
    pack(
        "synthetic",
        "--num-classes",
        "2",
        "--num-samples",
        "200",
        "--image-size",
        "4",
        "--shard-size",
        "50",
        "--out",
        out,
    )
    for info in load_index(out).splits["train"].shards:
        with tarfile.open(out / info.file) as tar:
            labels = {int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")}
        assert labels == {0, 1}  # a class-sorted source still gives mixed shards


def test_same_seed_same_bytes_other_seed_other_order(tmp_path):
    fabricate.make_cifar10(tmp_path / "src")
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        pack("cifar10", "--root", tmp_path / "src", "--out", tmp_path / name, "--seed", seed)
    assert shas(tmp_path / "a") == shas(tmp_path / "b")
    assert shas(tmp_path / "a") != shas(tmp_path / "c")


def test_workers_give_identical_shards(tmp_path):
    fabricate.make_imagefolder(tmp_path / "src")
    for workers in ("1", "2"):
        pack(
            "synthetic",
            "--num-samples",
            "700",
            "--image-size",
            "6",
            "--shard-size",
            "300",
            "--out",
            tmp_path / f"s{workers}",
            "--workers",
            workers,
        )
        pack("imagefolder", "--root", tmp_path / "src", "--out", tmp_path / f"i{workers}", "--workers", workers)
    assert shas(tmp_path / "s1") == shas(tmp_path / "s2")
    assert shas(tmp_path / "i1") == shas(tmp_path / "i2")
    assert load_index(tmp_path / "i2").skipped == load_index(tmp_path / "i1").skipped


def test_limit(tmp_path):
    out = tmp_path / "out"
    pack("synthetic", "--num-samples", "100", "--image-size", "4", "--limit", "15", "--out", out)
    assert {k: v.num_samples for k, v in load_index(out).splits.items()} == {"train": 15, "test": 15}


# --- output folder safety -------------------------------------------------------------------------


def test_existing_shards_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    pack("synthetic", "--num-samples", "40", "--image-size", "4", "--shard-size", "5", "--out", out)
    before = shas(out)
    result = cli("synthetic", "--num-samples", "40", "--image-size", "4", "--out", out, "--workers", "1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {out} already holds shards")
    assert result.stderr.endswith(": pass --overwrite to replace them\n"), result.stderr
    assert shas(out) == before
    (out / "notes.txt").write_text("mine")
    pack("synthetic", "--num-samples", "40", "--image-size", "4", "--out", out, "--overwrite")
    names = sorted(p.name for p in out.iterdir())
    tables = sorted(s.samples for split in load_index(out).splits.values() for s in split.shards)
    assert names == sorted(["index.json", "notes.txt", "test-000000.tar", "train-000000.tar", *tables])  # none stale


def test_interrupted_write_leaves_no_index(tmp_path, monkeypatch):
    out = tmp_path / "out"
    pack("synthetic", "--num-samples", "40", "--image-size", "4", "--out", out)
    calls = []
    real_finish = shard.ShardWriter._finish

    def ctrl_c_on_third_shard(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_finish(self)

    monkeypatch.setattr(shard.ShardWriter, "_finish", ctrl_c_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        pack("synthetic", "--num-samples", "40", "--image-size", "4", "--shard-size", "5", "--out", out, "--overwrite")
    # No index, no temporary file, and no finished shard either: with nothing left, the same command run
    # again finishes without asking for --overwrite.
    assert sorted(p.name for p in out.iterdir()) == []
    pack("synthetic", "--num-samples", "40", "--image-size", "4", "--shard-size", "5", "--out", out)


# --- verify ---------------------------------------------------------------------------------------


def test_verify_catches_a_single_flipped_byte(tmp_path):
    out = tmp_path / "out"
    pack("synthetic", "--num-samples", "50", "--image-size", "8", "--shard-size", "20", "--out", out)
    assert cli("verify", out).returncode == 0
    path = out / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    problems = shard.verify(out)
    assert problems and all("train-000001.tar" in p for p in problems)
    assert any("sha256" in p for p in problems)
    result = cli("verify", out)
    assert result.returncode == 1
    lines = result.stderr.splitlines()  # the whole of stderr: one line per problem, nothing else
    assert lines and all(line.startswith("error: train-000001.tar") for line in lines), result.stderr


def test_verify_names_each_problem(tmp_path):
    out = tmp_path / "out"
    pack(
        "synthetic",
        "--num-classes",
        "3",
        "--num-samples",
        "30",
        "--image-size",
        "8",
        "--shard-size",
        "10",
        "--out",
        out,
    )
    (out / "train-000002.tar").unlink()
    obj = json.loads((out / "index.json").read_text())
    obj["classes"] = obj["classes"][:1]  # labels 1 and 2 now out of range
    obj["num_classes"] = 1
    (out / "index.json").write_text(json.dumps(obj))
    problems = shard.verify(out)
    assert any(p.startswith("train-000002.tar: missing") for p in problems)
    assert any("cls label 2 outside 0..0" in p for p in problems)


def test_verify_without_index_exits_2(tmp_path):
    result = cli("verify", tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and "index.json: not found" in result.stderr


# --- bad input on the command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    "source", ["cifar10", "cifar100", "mnist", "fashion-mnist", "tiny-imagenet", "imagefolder", "imagenet"]
)
def test_bad_root_is_one_line_and_exit_2(tmp_path, source):
    result = cli(source, "--root", tmp_path / "nope", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "expected" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["gif-folder", "--root", "x"], "argument source: invalid choice: 'gif-folder'"),
        (["synthetic", "--format", "gif"], "argument --format: invalid choice: 'gif'"),
        (["cifar10"], "cifar10 needs --root PATH"),
        (["synthetic", "--root", "x"], "synthetic takes no --root"),
        (["synthetic", "--quality", "50"], "--quality takes 1..95 and only applies with --format jpeg"),
        (["synthetic", "--val-fraction", "1.5"], "argument --val-fraction: must be between 0 and 1"),
        (["cifar10", "--root", "x", "--num-classes", "3"], "--num-classes applies to synthetic only"),
    ],
)
def test_bad_options_exit_2(argv, message):
    result = cli(*argv)
    assert result.returncode == 2, result.stderr
    # the whole of stderr: one error line, no usage block, no traceback
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {message}"), result.stderr


# --- standard tools read the shards ---------------------------------------------------------------


def test_plain_tar_and_plain_webdataset_read_the_shards(tmp_path):
    import webdataset as wds

    fabricate.make_cifar100(tmp_path / "src")
    out = tmp_path / "out"
    pack("cifar100", "--root", tmp_path / "src", "--out", out, "--shard-size", "25")
    listing = subprocess.run(
        ["tar", "tvf", out / "train-000000.tar"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert len(listing) == 25 * 3
    assert listing[0].split()[:2] == ["-rw-r--r--", "0/0"] and listing[0].endswith("train_00000000.png")
    urls = [str(out / s.file) for s in load_index(out).splits["train"].shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 30
    first = samples[0]
    assert first["png"].size == (32, 32) and first["png"].mode == "RGB"
    assert isinstance(first["cls"], int) and isinstance(first["coarse.cls"], int)


# --- the real thing -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not FASHION.is_dir(), reason="needs /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)"
)
def test_real_fashion_mnist(tmp_path):
    out = tmp_path / "fashion-mnist"
    assert pack("fashion-mnist", "--root", FASHION, "--out", out, "--workers", str(min(os.cpu_count() or 1, 2))) == 0
    index = load_index(out)
    assert index.splits["train"].num_samples == 60000 and index.splits["test"].num_samples == 10000
    assert index.image_size == (28, 28) and index.channels == 1 and index.classes[0] == "T-shirt/top"
    assert round(index.mean[0], 3) == 0.286 and round(index.std[0], 3) == 0.353
    labels = Counter(label(m) for _, m in read_split(out, "test"))
    assert labels == {c: 1000 for c in range(10)}
    shutil.rmtree(out)


def test_ctrl_c_with_workers_exits_130_and_leaves_no_index(tmp_path):
    """A real SIGINT to the process group, as Ctrl-C sends it, while pool workers are encoding."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resnet_dist.shard",
            "synthetic",
            "--num-samples",
            "40000",
            "--image-size",
            "16",
            "--shard-size",
            "500",
            "--workers",
            "2",
            "--out",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a terminal's Ctrl-C reaches processes whose SIGINT is not ignored (pytest's may be)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not (out / "train-000000.tar").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("Ctrl-C left the packer hanging")
    assert proc.returncode == 130 and err.strip() == "interrupted"
    names = sorted(p.name for p in out.iterdir())
    assert "index.json" not in names and not any(n.endswith(".tmp") for n in names)


def test_overwrite_knows_every_file_the_packer_writes_and_nothing_else():
    """--overwrite removes these (tables and their temporaries included) and leaves a user's files alone."""
    ours = ["index.json", "train-000001.tar", ".train-000001.tar.tmp", "samples-0123456789abcdef.json"]
    ours.append(".samples-0123456789abcdef.json.k2j4x9.tmp")  # a table being written (write_json_atomic's name)
    theirs = ["notes.txt", "train-1.tar", "samples-xyz.json", ".index.json.swp", "train-000001.tar.samples.json"]
    assert [shard.is_output(n) for n in ours] == [True] * len(ours)
    assert [shard.is_output(n) for n in theirs] == [False] * len(theirs)
