"""Training on images of any size: real shards packed by `imagefolder`, real `accelerate launch` runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, TRAIN, read_json, run_env, shard, train
from PIL import Image
from safetensors.torch import load_file

from resnet_dist.bench.photos import photo_jpegs, write_imagefolder
from resnet_dist.sources import read_fashion_mnist

pytestmark = pytest.mark.slow
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--width", "8", "--batch-size", "8", "--lr", "0.05", "--num-workers", "1", "--log-every", "5"]
TINY += ["--wandb-mode", "disabled", "--train-crop", "rrc"]


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Photographs cropped to 150-600 px sides, packed as they are: sizes vary; 37 val and 29 test
    samples, which no batch size or process count divides evenly."""
    root = tmp_path_factory.mktemp("photos")
    write_imagefolder(photo_jpegs(120, seed=1), root / "tree", "train")
    write_imagefolder(photo_jpegs(37, seed=2), root / "tree", "val")
    write_imagefolder(photo_jpegs(29, seed=3), root / "tree", "test")
    ok(shard("imagefolder", "--root", str(root / "tree"), "--out", str(root / "shards"), "--shard-size", "25"))
    assert read_json(root / "shards" / "index.json")["image_size"] is None
    return root / "shards"


def test_two_processes_on_variable_sizes_evaluate_every_sample_once(photos, tmp_path):
    out = tmp_path / "run"
    # fp32 as evaluate runs; SyncBN, so that every rank evaluates with the same BatchNorm statistics (plain DDP
    # leaves each rank its own from its last forward pass, and the checkpoint holds rank 0's)
    run = ["--epochs", "1", "--res", "32", "--eval-res", "48", "--cpu-bf16", "off", "--sync-bn", *TINY]
    ok(train("--data", str(photos), "--out", str(out), *run))
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["steps_done"] == 120 // 16
    assert summary["eval_counts"] == {"val": 37, "test": 29} and summary["lost_eval_samples"] == {"val": 0, "test": 0}
    # The evaluate CLI crops as the trainer did (from the checkpoint's config): the same val top-1.
    cmd = [sys.executable, "-m", "resnet_dist.evaluate", "--checkpoint", str(out / "checkpoints" / "last")]
    cmd += ["--data", str(photos), "--split", "val", "--num-workers", "0", "--out", str(tmp_path / "eval")]
    ok(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=run_env(), timeout=300))
    result = read_json(tmp_path / "eval" / "eval.json")
    last = read_json(out / "history.json")[-1]
    assert result["count"] == 37 and result["loss"] == pytest.approx(last["val_loss"], rel=1e-4)


def test_resume_mid_epoch_with_rrc_and_a_res_schedule_is_exact(photos, tmp_path):
    """32 px in epoch 1, 64 px from epoch 2: the run is cut in epoch 2 and resumed; same weights."""
    args = ["--data", str(photos), "--epochs", "3", "--res-schedule", "32:64", "--checkpoint-every", "2", *TINY]
    ok(train(*args, "--out", str(tmp_path / "full")))
    ok(train(*args, "--out", str(tmp_path / "cut"), "--max-steps", "10"))  # 7 steps per epoch: cut in epoch 2
    assert read_json(tmp_path / "cut" / "summary.json")["steps_done"] == 10
    other = train(*args, "--train-crop", "center", "--out", str(tmp_path / "cut"))  # the last --train-crop wins
    assert other.returncode != 0 and "holds a run with other settings (train_crop)" in other.stderr
    ok(train(*args, "--out", str(tmp_path / "cut")))
    full, cut = read_json(tmp_path / "full" / "summary.json"), read_json(tmp_path / "cut" / "summary.json")
    assert cut["steps_done"] == full["steps_done"] == 3 * 7
    a = load_file(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors")
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-6


def train_cli(*args: str) -> subprocess.CompletedProcess:
    """launch/train.py in one process, as a user runs it without accelerate."""
    return subprocess.run(
        [sys.executable, str(TRAIN), *args], capture_output=True, text=True, cwd=ROOT, env=run_env(), timeout=300
    )


def test_pad_crop_and_cpu_gpu_decode_are_refused_in_one_line(photos, tmp_path):
    base = ["--data", str(photos), "--out", str(tmp_path / "r"), "--wandb-mode", "disabled"]
    cases = {
        (): f"error: {photos} holds images of varying sizes; --train-crop pad needs one size: "
        "use --train-crop rrc --res N (or center)",
        ("--train-crop", "rrc"): f"error: {photos} holds images of varying sizes: --train-crop rrc needs --res N",
        ("--train-crop", "rrc", "--res", "32", "--decode", "gpu"): "error: --decode gpu decodes with nvJPEG on a "
        "CUDA device; this run is on cpu: use --decode cpu",
        ("--res", "32"): "error: --res, --res-schedule and --eval-res need --train-crop rrc or center "
        "(pad keeps the images' size)",
        ("--train-crop", "rrc", "--res-schedule", "160:190"): "error: --res-schedule 160:190: START and END must "
        "be positive multiples of 32",
        ("--train-crop", "rrc", "--rrc-scale", "0.5,2"): "error: --rrc-scale 0.5,2: need 0 < LOW <= HIGH <= 1",
    }
    for extra, message in cases.items():
        result = train_cli(*base, *extra)
        assert (result.returncode, result.stderr) == (2, message + "\n"), extra
    assert not (tmp_path / "r").exists()


def fashion_mnist_jpegs(root: Path, train_n: int, test_n: int, seed: int = 0) -> Path:
    """Real Fashion-MNIST as JPEG files of varying size: each image upscaled to a random side of 40-120 px
    at a random aspect ratio (3:4 to 4:3), in ROOT/<split>/<class>/."""
    source, rng = read_fashion_mnist(FMNIST), np.random.default_rng(seed)
    for split, n in (("train", train_n), ("test", test_n)):
        images, labels = source.splits[split].images, source.splits[split].labels
        for k in rng.permutation(len(labels))[:n]:
            side, aspect = int(rng.integers(40, 121)), float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            width = max(40, min(120, round(side * aspect)))
            folder = root / split / source.classes[labels[k]].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[k]).resize((width, side), Image.BICUBIC).save(folder / f"{k}.jpg", quality=90)
    return root


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs the Fashion-MNIST files (make data)")
def test_learns_fashion_mnist_from_variable_size_jpegs(tmp_path):
    """24k real training images of 40-120 px, RandomResizedCrop to 32 px, 5 epochs on 2 processes: >= 85%
    on 5,000 test images, every one of them counted. (A linear classifier on the 28 px originals gets ~84%.)"""
    tree = fashion_mnist_jpegs(tmp_path / "tree", 24000, 5000)
    ok(shard("imagefolder", "--root", str(tree), "--out", str(tmp_path / "shards"), "--shard-size", "2000"))
    assert read_json(tmp_path / "shards" / "index.json")["image_size"] is None
    args = ["--train-crop", "rrc", "--res", "32", "--rrc-scale", "0.35,1", "--width", "16", "--batch-size", "64"]
    args += ["--epochs", "5", "--schedule", "onecycle", "--lr", "0.2", "--label-smoothing", "0.1", "--num-workers", "1"]
    args += ["--eval-every", "5", "--log-every", "50", "--wandb-mode", "disabled"]
    ok(train("--data", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), *args, timeout=900))
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["eval_counts"] == {"test": 5000} and summary["test_top1"] >= 0.85, summary
