"""Per-sample integrity and traceability, on real shards from the real CLI.

A shard that no longer matches its sha256 loses only the samples whose own bytes changed (each sample's
byte range and digest are in the shard's per-sample table, beside index.json); every packed sample
names where it came from. The damage is made for real: bytes flipped in image payloads and tar
headers, a shard cut short.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fabricate import make_cifar10, make_tiny_imagenet
from helpers import ROOT, ok, read_json, run_env, shard, train
from PIL import Image

from resnet_dist import shard as shard_module
from resnet_dist.data import Lost, Piece, read_piece
from resnet_dist.errors import DataError
from resnet_dist.index import load_index
from resnet_dist.storage import read_index
from resnet_dist.tars import sample_table, tar_groups


def table_name(folder: Path, shard_file: str) -> str:
    return next(s.samples for split in load_index(folder).splits.values() for s in split.shards if s.file == shard_file)


def table_of(folder: Path, shard_file: str) -> dict:
    return json.loads((folder / table_name(folder, shard_file)).read_text())


def flip(path: Path, start: int, count: int = 8) -> None:
    raw = bytearray(path.read_bytes())
    raw[start : start + count] = bytes(b ^ 0x5A for b in raw[start : start + count])
    path.write_bytes(bytes(raw))


def damage_images(folder: Path, shard_file: str, samples: list[int]) -> list[str]:
    """Flip bytes inside the image payload (the first member, after its 512-byte header) of each sample;
    the damaged samples' keys."""
    table = table_of(folder, shard_file)
    for k in samples:
        flip(folder / shard_file, table["offsets"][k] + 512 + 24)
    return [table["keys"][k] for k in samples]


def read_all(folder: Path, split: str = "train", i: int = 0, strict: bool = False) -> list:
    info = load_index(folder).splits[split].shards[i]
    return read_piece(str(folder), Piece(info, 0, info.num_samples), strict)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """One 500-sample train shard of 8 px synthetic images."""
    out = tmp_path_factory.mktemp("integrity") / "ds"
    args = ["--num-samples", "500", "--shard-size", "500", "--image-size", "8", "--num-classes", "5"]
    ok(shard("synthetic", "--out", str(out), *args, "--workers", "1"))
    return out


@pytest.fixture
def copy(packed, tmp_path) -> Path:
    shutil.copytree(packed, tmp_path / "ds")
    return tmp_path / "ds"


# --- the writer's table ---------------------------------------------------------------------------


def test_each_shard_has_a_table_that_describes_it_exactly(packed):
    index = load_index(packed)
    for split in index.splits.values():
        for info in split.shards:
            assert info.samples == f"samples-{info.sha256[:16]}.json"
            data = (packed / info.file).read_bytes()
            written = table_of(packed, info.file)
            # The writer records offsets as it writes; reading the finished tar back must agree.
            assert written == sample_table(data, info.file, info.sha256, written["origins"]).to_json()
            assert len(written["keys"]) == info.num_samples


def test_synthetic_origins_name_the_generated_image(packed):
    """Each origin is the image's index in the generated split, whose label is index % classes."""
    info = load_index(packed).splits["train"].shards[0]
    data = (packed / info.file).read_bytes()
    table = table_of(packed, info.file)
    groups = [g for g in tar_groups(data) if g.is_sample]
    ids = [int(o.removeprefix("synthetic-train[").removesuffix("]")) for o in table["origins"]]
    assert sorted(ids) == list(range(500))  # shuffled, each once
    assert [int(g.payloads(data)["cls"]) for g in groups] == [i % 5 for i in ids]


def test_cifar_origins_are_the_batch_file_and_row(tmp_path):
    truth = make_cifar10(tmp_path / "src", per_batch=6, test=8)
    out = tmp_path / "out"
    ok(shard("cifar10", "--root", str(tmp_path / "src"), "--out", str(out), "--workers", "2", "--shard-size", "7"))
    folder = tmp_path / "src" / "cifar-10-batches-py"
    seen = set()
    for info in load_index(out).splits["train"].shards:
        data = (out / info.file).read_bytes()
        groups = [g for g in tar_groups(data) if g.is_sample]
        for group, origin in zip(groups, table_of(out, info.file)["origins"]):
            name, row = origin.removesuffix("]").split("[")
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            pixels = np.asarray(batch["data"][int(row)]).reshape(3, 32, 32).transpose(1, 2, 0)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(group.payloads(data)["png"]))), pixels)
            seen.add(origin)
    assert len(seen) == len(truth.labels["train"]) == 30


def test_file_origins_are_paths_from_root(tmp_path):
    """--root is the folder above tiny-imagenet-200/: each origin, joined to --root, is the file packed."""
    make_tiny_imagenet(tmp_path / "src")
    out = tmp_path / "out"
    ok(shard("tiny-imagenet", "--root", str(tmp_path / "src"), "--out", str(out), "--workers", "1"))
    origins = []
    for split in load_index(out).splits.values():
        for info in split.shards:
            data = (out / info.file).read_bytes()
            groups = [g for g in tar_groups(data) if g.is_sample]
            for group, origin in zip(groups, table_of(out, info.file)["origins"]):
                assert (tmp_path / "src" / origin).read_bytes() == group.payloads(data)["jpg"]  # copied as is
                origins.append(origin)
    assert "tiny-imagenet-200/val/images/val_3.JPEG" in origins and len(origins) == 12 + 6


# --- the reader -----------------------------------------------------------------------------------


def test_five_damaged_images_lose_five_samples_and_name_each(packed, copy):
    intact = read_all(packed)
    keys = damage_images(copy, "train-000000.tar", [0, 77, 250, 251, 499])
    got = read_all(copy)
    lost = [i for i, s in enumerate(got) if isinstance(s, Lost)]
    assert [intact[i]["__key__"] for i in lost] == keys  # exactly the damaged ones
    origins = table_of(copy, "train-000000.tar")["origins"]
    for i, key in zip(lost, keys):
        assert f"train-000000.tar: sample {key} (from {origins[i]})" in got[i].reason
    assert [s for s in got if not isinstance(s, Lost)] == [s for i, s in enumerate(intact) if i not in lost]


def test_a_damaged_tar_header_loses_only_the_sample_it_heads(packed, copy):
    table = table_of(copy, "train-000000.tar")
    groups = [g for g in tar_groups((copy / "train-000000.tar").read_bytes()) if g.is_sample]
    flip(copy / "train-000000.tar", groups[40].members["cls"][0] - 512 + 20)  # the label member's header: its name
    flip(copy / "train-000000.tar", table["offsets"][300] + 148)  # the image member's header: its checksum
    got = read_all(copy)
    assert [i for i, s in enumerate(got) if isinstance(s, Lost)] == [40, 300]


def test_a_cut_shard_keeps_the_samples_before_the_cut(packed, copy):
    table = table_of(copy, "train-000000.tar")
    path = copy / "train-000000.tar"
    path.write_bytes(path.read_bytes()[: table["offsets"][123] + 700])  # inside sample 123
    got = read_all(copy)
    assert not any(isinstance(s, Lost) for s in got[:123])
    assert all(isinstance(s, Lost) for s in got[123:])
    assert len({s.reason for s in got[123:]}) == 1 and "cut short" in got[123].reason  # one warning, not 377


def test_strict_names_the_first_damaged_sample(copy):
    keys = damage_images(copy, "train-000000.tar", [10, 20])
    with pytest.raises(DataError, match=f"train-000000.tar: sample {keys[0]} .*sha256 differs"):
        read_all(copy, strict=True)


def test_without_a_table_a_changed_shard_is_lost_whole_as_before(copy):
    """Indexes written before the tables (format 2) keep their behaviour."""
    damage_images(copy, "train-000000.tar", [3])
    obj = json.loads((copy / "index.json").read_text())
    for split in obj["splits"].values():
        for entry in split["shards"]:
            del entry["samples"]
    (copy / "index.json").write_text(json.dumps(obj))
    got = read_all(copy)
    assert all(isinstance(s, Lost) and "sha256 differs" in s.reason for s in got)


def test_a_table_of_another_shard_version_is_not_trusted(copy):
    table = table_of(copy, "train-000000.tar")
    table["shard_sha256"] = "0" * 64
    (copy / table_name(copy, "train-000000.tar")).write_text(json.dumps(table))
    damage_images(copy, "train-000000.tar", [3])
    got = read_all(copy)
    assert all(isinstance(s, Lost) and "another version" in s.reason for s in got)


def test_over_http_the_table_comes_from_beside_index_json(copy):
    """The loader fetches the table by the same storage layer as the shard: a real server on 127.0.0.1."""
    keys = damage_images(copy, "train-000000.tar", [7])
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(copy)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        info = read_index(base).splits["train"].shards[0]
        got = read_piece(base, Piece(info, 0, info.num_samples), False)
    finally:
        server.shutdown()
        server.server_close()
    assert [s.reason.split(" (from")[0] for s in got if isinstance(s, Lost)] == [f"train-000000.tar: sample {keys[0]}"]


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# --- verify ---------------------------------------------------------------------------------------


def test_verify_names_and_counts_each_damaged_sample(copy):
    keys = damage_images(copy, "train-000000.tar", [5, 6, 400])
    origins = dict(zip(*(table_of(copy, "train-000000.tar")[f] for f in ("keys", "origins"))))
    problems = shard_module.verify(copy)
    named = [p for p in problems if "changed since it was packed" in p]
    assert named == [
        f"train-000000.tar: sample {k} (from {origins[k]}) changed since it was packed{DIGEST}" for k in keys
    ]
    assert "train-000000.tar: 3 of 500 samples damaged" in problems
    result = subprocess.run(
        [sys.executable, "-m", "resnet_dist.shard", "verify", str(copy)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=run_env(),
        timeout=120,
    )
    assert result.returncode == 1 and all(line.startswith("error: ") for line in result.stderr.splitlines())


DIGEST = " (its bytes differ from its digest)"


def test_verify_catches_a_table_that_does_not_describe_its_shard(copy):
    table = table_of(copy, "train-000000.tar")
    table["origins"][0], table["offsets"][1] = "elsewhere", table["offsets"][1] + 512
    (copy / table_name(copy, "train-000000.tar")).write_text(json.dumps(table))
    assert shard_module.verify(copy) == [
        f"train-000000.tar: its per-sample table {table_name(copy, 'train-000000.tar')} does not describe it"
    ]


# --- a real 2-process training run and evaluate ------------------------------------------------------


@pytest.mark.slow
def test_training_and_evaluate_count_exactly_the_damaged_samples(tmp_path):
    """512 train samples, 2 processes x 16: one epoch reads every one, so each damaged sample is lost once."""
    data = tmp_path / "ds"
    args = ["--num-samples", "512", "--shard-size", "128", "--image-size", "8", "--num-classes", "4"]
    ok(shard("synthetic", "--out", str(data), *args, "--workers", "1"))
    damage_images(data, "train-000001.tar", [0, 64, 127])
    damage_images(data, "train-000003.tar", [5, 6])
    damage_images(data, "test-000000.tar", [1, 90])
    out = tmp_path / "run"
    tiny = ["--width", "8", "--batch-size", "16", "--epochs", "1", "--num-workers", "1", "--wandb-mode", "disabled"]
    result = ok(train("--data", str(data), "--out", str(out), *tiny))
    summary = read_json(out / "summary.json")
    assert summary["lost_train_samples"] == 5
    assert summary["lost_eval_samples"] == {"test": 2}
    assert sum("changed since it was packed" in p for p in summary["data_problems"]) == 7  # each named once
    assert sum(line.startswith("warning:") and "changed since" in line for line in result.stdout.splitlines()) == 7
    evaluate = subprocess.run(
        [sys.executable, "-m", "resnet_dist.evaluate", "--checkpoint", str(out), "--data", str(data)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=run_env(OMP_NUM_THREADS="1"),
        timeout=300,
    )
    ok(evaluate)
    report = read_json(out / "eval-test" / "eval.json")
    assert report["lost"] == 2 and report["expected_count"] == 102
