"""`shard index` on WebDataset shards that other tools wrote, in their real layouts: webdataset's ShardWriter,
GNU tar in timm's imagenet-1k-wds layout (with its _info.json, served over HTTP as the Hub would), and
img2dataset's 00000.tar. Each indexes into --out (the shards stay read-only and untouched) and trains
over a real 2-process `accelerate launch`, evaluating every sample of its eval split exactly once."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import ROOT, ok, read_json, run_env, shard, train
from PIL import Image

from resnet_dist.bench.photos import photo_jpegs
from resnet_dist.foreign import Quota, assign_splits, parse_split_args, raw_label, split_of_name
from resnet_dist.index import shards_at
from resnet_dist.storage import read_index
from resnet_dist.tars import parse_table, sample_label

TINY = ["--epochs", "1", "--width", "8", "--batch-size", "8", "--lr", "0.05", "--num-workers", "1"]
TINY += ["--log-every", "5", "--wandb-mode", "disabled", "--train-crop", "rrc", "--res", "32", "--cpu-bf16", "off"]
CLASSES = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble", "retina", "china", "flower"]


def photos(n: int, seed: int) -> list[tuple[bytes, int]]:
    """n natural JPEGs (crops of real photographs) of 40-100 px sides, labelled by their photograph."""
    return photo_jpegs(n, seed=seed, sides=(40, 100))


def read_only(folder: Path) -> dict[str, tuple[int, int]]:
    """Make the shard folder read-only, as a shared or mounted dataset is; its files' (size, mtime) to compare."""
    for p in folder.iterdir():
        p.chmod(0o444)
    folder.chmod(0o555)
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture
def restore_modes(tmp_path):
    yield
    for p in tmp_path.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def webdataset_shards(folder: Path) -> Path:
    """ShardWriter's own naming (train-000000.tar ...), grayscale PNGs in .png, integer labels in .cls."""
    folder.mkdir()
    for split, n, seed in (("train", 48, 1), ("val", 19, 2)):
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=20, verbose=0) as sink:
            for i, (jpeg, label) in enumerate(photos(n, seed)):
                png = io.BytesIO()
                Image.open(io.BytesIO(jpeg)).convert("L").save(png, "PNG")
                sink.write({"__key__": f"{split}{i:05d}", "png": png.getvalue(), "cls": label})
    return folder


def timm_shards(folder: Path) -> Path:
    """timm/imagenet-1k-wds's layout, written by GNU tar: imagenet1k-{train,validation}-NNNN.tar holding
    KEY.jpg, KEY.cls and KEY.json, and _info.json as timm's reader_wds reads it."""
    folder.mkdir()
    staging = folder.parent / "staging"
    staging.mkdir()
    splits = {}
    for split, n, per_shard, seed in (("train", 48, 20, 3), ("validation", 21, 21, 4)):
        samples = photos(n, seed)
        files, lengths = [], []
        for s, start in enumerate(range(0, n, per_shard)):
            names = []
            for i, (jpeg, label) in enumerate(samples[start : start + per_shard], start):
                key = f"n{label:08d}_{split}_{i}"
                (staging / f"{key}.jpg").write_bytes(jpeg)
                (staging / f"{key}.cls").write_text(str(label))
                (staging / f"{key}.json").write_text(json.dumps({"filename": f"{key}.JPEG", "label": label}))
                names += [f"{key}.jpg", f"{key}.cls", f"{key}.json"]
            files.append(f"imagenet1k-{split}-{s:04d}.tar")
            lengths.append(len(names) // 3)
            (staging / "list").write_text("\n".join(names) + "\n")
            cmd = ["tar", "--create", "--format=gnu", "-f", str(folder / files[-1]), "-C", str(staging), "-T", "list"]
            subprocess.run(cmd, check=True, cwd=staging)
        splits[split] = {"name": split, "num_samples": n, "filenames": files, "shard_lengths": lengths}
    (folder / "_info.json").write_text(json.dumps({"name": "imagenet-1k", "splits": splits}, indent=2))
    return folder


def img2dataset_shards(folder: Path) -> Path:
    """img2dataset's output: 00000.tar ... (written, as img2dataset does, by webdataset's TarWriter) with
    9-digit keys, KEY.jpg + KEY.txt (here the class name) + KEY.json (its metadata), and a .parquet and
    _stats.json per shard beside them."""
    folder.mkdir()
    samples = photos(60, seed=5)
    for s, start in enumerate(range(0, 60, 20)):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i, (jpeg, label) in enumerate(samples[start : start + 20]):
                key = f"{s:05d}{i:04d}"
                w, h = Image.open(io.BytesIO(jpeg)).size
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": w,
                    "height": h,
                    "original_width": w,
                    "original_height": h,
                }
                sink.write({"__key__": key, "jpg": jpeg, "txt": CLASSES[label], "json": meta})
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": 20, "successes": 20}))
    return folder


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """Serve a folder on 127.0.0.1 (port 0): start(folder) -> its URL."""
    servers = []

    def start(folder: Path) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def check_index(out: Path, shards: str, splits: dict[str, int]) -> dict:
    """index.json in --out: the split sizes, the shards' location, one readable sidecar per shard."""
    index = read_index(str(out))
    assert {k: v.num_samples for k, v in index.splits.items()} == splits
    assert shards_at(str(out), index) == shards and index.shard_base == shards
    for split in index.splits.values():
        for s in split.shards:
            table = parse_table(read_json(out / s.samples), s.samples)
            assert len(table.keys) == s.num_samples and table.shard_sha256 == s.sha256
    return read_json(out / "index.json")


def train_and_evaluate(out: Path, run: Path, eval_split: str, eval_count: int) -> dict:
    ok(train("--data", str(out), "--out", str(run), *TINY))
    summary = read_json(run / "summary.json")
    assert summary["world_size"] == 2 and summary["lost_train_samples"] == 0, summary
    assert summary["eval_counts"] == {eval_split: eval_count}, summary
    assert summary["lost_eval_samples"] == {eval_split: 0}, summary
    return summary


@pytest.mark.slow
def test_webdataset_shardwriter_shards_index_and_train(tmp_path, restore_modes):
    folder = webdataset_shards(tmp_path / "wds")
    before = read_only(folder)
    ok(shard("index", str(folder), "--out", str(tmp_path / "index"), "--stats-sample", "30"))
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()} == before
    obj = check_index(tmp_path / "index", str(folder), {"train": 48, "val": 19})
    assert obj["label"] == {"member": "cls", "field": None, "by": "index"} and obj["channels"] == 1
    assert obj["format"] == "png" and obj["image_size"] is None and 20 <= obj["stats_sample"]["images"] <= 30
    assert obj["classes"] == [str(i) for i in range(len(obj["classes"]))]
    train_and_evaluate(tmp_path / "index", tmp_path / "run", "val", 19)


@pytest.mark.slow
def test_timm_layout_over_http_indexes_with_its_info_json_and_trains(tmp_path, restore_modes, http_server):
    folder = timm_shards(tmp_path / "timm")
    read_only(folder)
    url = http_server(folder)
    pattern = f"{url}/imagenet1k-{{train-{{0000..0002}},validation-0000}}.tar"
    refused = shard("index", pattern)
    assert refused.returncode == 2 and refused.stderr == f"error: {pattern} is remote: give --out DIR\n"
    ok(shard("index", pattern, "--out", str(tmp_path / "index")))
    obj = check_index(tmp_path / "index", url, {"train": 48, "val": 21})
    assert obj["label"] == {"member": "cls", "field": None, "by": "index"} and obj["channels"] == 3
    assert any("_info.json" in note for note in obj["notes"]) and obj["format"] == "jpeg"
    train_and_evaluate(tmp_path / "index", tmp_path / "run", "val", 21)


@pytest.mark.slow
def test_img2dataset_shards_with_class_names_in_txt_index_and_train(tmp_path, restore_modes):
    folder = img2dataset_shards(tmp_path / "img2dataset")
    before = read_only(folder)
    split = ["--split", "train=0000[01].tar", "--split", "test=00002.tar"]
    ok(shard("index", f"file://{folder}", "--out", str(tmp_path / "index"), *split))
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()} == before
    obj = check_index(tmp_path / "index", str(folder), {"train": 40, "test": 20})
    assert obj["label"] == {"member": "txt", "field": None, "by": "name"}
    assert set(obj["classes"]) <= set(CLASSES) and obj["classes"] == sorted(obj["classes"])
    train_and_evaluate(tmp_path / "index", tmp_path / "run", "test", 20)
    # The evaluate CLI finds the tars through the index's shard_base too, and reads the txt labels alike.
    cmd = [sys.executable, "-m", "resnet_dist.evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "last")]
    cmd += ["--data", str(tmp_path / "index"), "--split", "test", "--num-workers", "0", "--out", str(tmp_path / "e")]
    ok(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=run_env(), timeout=300))
    assert read_json(tmp_path / "e" / "eval.json")["count"] == 20


# --- without training ---------------------------------------------------------------------------------------


def test_labels_from_a_json_field_with_class_names_from_another(tmp_path):
    folder = img2dataset_shards(tmp_path / "i2d")
    # Rewrite the json with an integer label and a class name field, as many converters write them.
    for tar in sorted(folder.glob("*.tar")):
        samples = list(wds.WebDataset(str(tar), shardshuffle=False))
        with wds.TarWriter(str(tar)) as sink:
            for s in samples:
                label = CLASSES.index(s["txt"].decode())
                meta = {"target": label, "class_name": s["txt"].decode()}
                sink.write({"__key__": s["__key__"], "jpg": s["jpg"], "json": meta})
    args = ["--label-key", "target", "--class-key", "class_name", "--split", "train", "--stats-sample", "5"]
    ok(shard("index", str(folder), *args))  # writable and local: index.json beside the shards
    obj = read_json(folder / "index.json")
    assert obj["shard_base"] is None and obj["label"] == {"member": "json", "field": "target", "by": "index"}
    seen = {label for _, label in photos(60, seed=5)}
    assert [obj["classes"][i] for i in sorted(seen)] == [CLASSES[i] for i in sorted(seen)]
    again = shard("index", str(folder), "--split", "train")
    message = f"error: {folder / 'index.json'} exists: pass --overwrite to replace it\n"
    assert again.returncode == 2 and again.stderr == message


def test_unreadable_labels_are_listed_and_counted_or_refused_with_strict(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    with wds.TarWriter(str(folder / "data-train-0.tar")) as sink:
        for i, (jpeg, label) in enumerate(photos(12, seed=7)):
            sample = {"__key__": f"k{i}", "jpg": jpeg, "cls": label}
            if i in (3, 8):
                sample["cls"] = "n/a" if i == 3 else "-1"
            sink.write(sample)
        sink.write({"__key__": "k3", "jpg": jpeg, "cls": 1})  # a key seen before
    ok(shard("index", str(folder), "--stats-sample", "0"))
    obj = read_json(folder / "index.json")
    assert obj["splits"]["train"]["num_samples"] == 13  # every image sample counts, as the loader counts it
    assert [s["path"] for s in obj["skipped"]] == ["data-train-0.tar:k3", "data-train-0.tar:k8"]
    assert obj["stats_sample"] == {"images": 13, "of": 13, "seed": 0}
    assert any("training reports them as lost" in n for n in obj["notes"])
    assert any("1 sample key(s) appear more than once, e.g. k3" in n for n in obj["notes"])
    strict = shard("index", str(folder), "--strict", "--overwrite")
    assert strict.returncode == 2 and strict.stderr.startswith("error: data-train-0.tar:k3: label unreadable (")
    assert strict.stderr.count("\n") == 1


def test_split_words_in_file_names():
    assert split_of_name("imagenet1k-train-0000.tar") == "train"
    assert split_of_name("imagenet1k-validation-0012.tar") == "val"
    assert split_of_name("val-000003.tar") == "val"
    assert split_of_name("cc3m_test_00001.tar") == "test"
    assert split_of_name("TRAIN.0.tar") == "train"
    for name in ("00000.tar", "trainset-0.tar", "x-train-test-0.tar"):
        with pytest.raises(Exception, match="--split NAME"):
            split_of_name(name)


def test_split_globs_cover_every_file_once():
    from resnet_dist.foreign import Location

    loc = Location("/x", ["00000.tar", "00001.tar", "00002.tar"], True)
    assert assign_splits(loc, parse_split_args(["train=0000[01].tar", "validation=00002.tar"])) == {
        "00000.tar": "train",
        "00001.tar": "train",
        "00002.tar": "val",
    }
    with pytest.raises(Exception, match="00002.tar: matched by 0 --split patterns"):
        assign_splits(loc, parse_split_args(["train=0000[01].tar"]))
    with pytest.raises(Exception, match="00000.tar: matched by 2"):
        assign_splits(loc, parse_split_args(["train=*.tar", "test=00000.tar"]))


def test_label_values_and_the_loaders_reading_of_them_agree():
    json_rule = {"member": "json", "field": "label", "by": "index"}
    assert raw_label({"json": b'{"label": 7}'}, "json", "label") == 7
    assert sample_label({"json": b'{"label": 7}'}, json_rule, {str(i): i for i in range(8)}) == 7
    assert raw_label({"txt": b" tench \n"}, "txt", None) == "tench"
    assert sample_label({"txt": b" tench \n"}, {"member": "txt", "field": None, "by": "name"}, {"tench": 0}) == 0
    for members, reason in (
        ({"json": b"{"}, "json is not readable text"),
        ({"json": b'{"other": 1}'}, "json has no field 'label'"),
        ({"json": b'{"label": [1, 2]}'}, "not an integer or a name"),
        ({"cls": b"1"}, "no json member"),
    ):
        with pytest.raises(ValueError, match=reason):
            raw_label(members, "json", "label")


def test_natural_images_differ_in_size(tmp_path):
    """The fixtures' premise: the images vary in size, so training goes through the crop path."""
    sizes = {Image.open(io.BytesIO(j)).size for j, _ in photos(10, seed=1)}
    assert len(sizes) > 5 and np.array(list(sizes)).max() <= 100


def test_the_mean_std_sample_is_bounded_and_spread_over_the_train_shards():
    quota = Quota(2, {"a", "b", "c"})
    assert [quota.take(f, 20) for f in ("a", "v", "b", "c")] == [1, 0, 1, 0]  # v: not a train shard
    quota = Quota(30, {"a", "b", "c"})
    assert [quota.take(f, n) for f, n in (("a", 5), ("b", 20), ("c", 20))] == [5, 13, 12]  # a's shortfall passes on
    assert [Quota(0, {"a", "b"}).take(f, 7) for f in ("a", "b")] == [7, 7]  # 0: every image
