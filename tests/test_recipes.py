"""Recipes: each resolves, prints, and starts training on synthetic shards of its dataset's shape."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, TRAIN, read_json, run_env, shard, train

from resnet_dist.bench.photos import photo_jpegs, write_imagefolder
from resnet_dist.config import TrainConfig, parse_args
from resnet_dist.errors import UsageError
from resnet_dist.recipes import RECIPES

SHAPES = {  # recipe -> (classes, size, channels) of the dataset it was made for
    "tinyimagenet-resnet34": (200, 64, 3),
    "cifar10-resnet18": (10, 32, 3),
    "cifar10-resnet34-adam": (10, 32, 3),
    "cifar10-simplecnn": (10, 32, 3),
    "fashion-mnist-demo": (10, 28, 1),
    "fashion-mnist-15min": (10, 28, 1),
    "fashion-mnist-6min": (10, 28, 1),
    "fashion-mnist-resnet18": (10, 28, 1),
    "fashion-mnist-60min": (10, 28, 1),
    "imagenet-resnet50": (10, 0, 3),  # size 0: photographs of varying size, as ImageNet's
    "imagenet-resnet18": (10, 0, 3),
}


def test_every_recipe_has_a_smoke_shape():
    assert set(SHAPES) == set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_and_flags_override_it(name):
    cfg, print_only = parse_args(["--recipe", name, "--print-config"])
    assert print_only and cfg.recipe == name and cfg.tuned_global_batch == RECIPES[name].global_batch
    for key, value in RECIPES[name].settings.items():
        assert getattr(cfg, key) == value, key
    cfg, _ = parse_args(["--recipe", name, "--data", "d", "--out", "o", "--epochs", "1", "--lr", "0.5"])
    assert cfg.epochs == 1 and cfg.lr == 0.5  # explicit flags win


def test_reference_settings_are_the_notebooks():
    tin = TrainConfig(**RECIPES["tinyimagenet-resnet34"].settings)
    assert (tin.model, tin.stem, tin.dropout, tin.lr, tin.weight_decay, tin.epochs, tin.batch_size) == (
        "resnet34",
        "cifar",
        0.4,
        0.01,
        4e-4,
        100,
        64,
    )
    adam = TrainConfig(**RECIPES["cifar10-resnet34-adam"].settings)
    assert (adam.stem, adam.optimizer, adam.lr, adam.epochs) == ("imagenet", "adam", 1e-3, 10)


def test_imagenet_recipes_are_the_published_setups():
    """torchvision's reference ResNet-50 (76.13%) and FFCV's rn18_16_epochs config (66.9%), as published."""
    tv = TrainConfig(**RECIPES["imagenet-resnet50"].settings)
    assert (tv.model, tv.lr, tv.momentum, tv.weight_decay, tv.schedule, tv.lr_step_epochs, tv.epochs) == (
        "resnet50",
        0.1,
        0.9,
        1e-4,
        "step",
        30,
        90,
    )
    assert (tv.batch_size * 8, tv.train_crop, tv.res, tv.eval_res, tv.crop_ratio) == (256, "rrc", 224, 224, 0.875)
    assert "76.13%" in RECIPES["imagenet-resnet50"].summary
    ffcv = TrainConfig(**RECIPES["imagenet-resnet18"].settings)
    assert (ffcv.lr, ffcv.weight_decay, ffcv.label_smoothing, ffcv.batch_size, ffcv.epochs) == (
        0.5,
        5e-5,
        0.1,
        1024,
        16,
    )
    assert (ffcv.res_schedule, ffcv.eval_res, ffcv.eval_tta, ffcv.schedule, ffcv.warmup_epochs) == (
        "160:192:11-13",
        256,
        "flip",
        "triangle",
        2.0,
    )
    assert "66.9% top-1" in RECIPES["imagenet-resnet18"].summary


def test_print_config_needs_no_data_and_prints_json():
    result = subprocess.run(
        [sys.executable, str(TRAIN), "--recipe", "cifar10-resnet18", "--print-config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=run_env(),
        timeout=120,
    )
    assert result.returncode == 0
    assert json.loads(result.stdout)["model"] == "resnet18"


def test_unknown_recipe_and_scale_without_a_tuned_batch_are_refused():
    with pytest.raises(UsageError, match="--recipe 'cifar11' does not exist"):
        parse_args(["--recipe", "cifar11", "--print-config"])
    with pytest.raises(UsageError, match="--scale-lr linear needs"):
        parse_args(["--data", "d", "--out", "o", "--scale-lr", "linear"])


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    made = {}
    for classes, size, channels in set(SHAPES.values()):
        out = tmp_path_factory.mktemp("shape") / f"c{classes}-s{size}-ch{channels}"
        if size == 0:
            tree = write_imagefolder(photo_jpegs(120, seed=5), out.parent / "tree")
            result = shard("imagefolder", "--root", str(tree), "--out", str(out), "--val-fraction", "0.5")
            assert result.returncode == 0, result.stderr
            made[(classes, size, channels)] = out
            continue
        result = shard(
            "synthetic",
            "--out",
            str(out),
            "--num-classes",
            str(classes),
            "--image-size",
            str(size),
            "--channels",
            str(channels),
            "--num-samples",
            str(max(120, classes * 2)),
            "--val-fraction",
            "0.5",
        )
        assert result.returncode == 0, result.stderr
        made[(classes, size, channels)] = out
    return made


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_starts_training(name, shaped, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--recipe",
            name,
            "--data",
            str(shaped[SHAPES[name]]),
            "--out",
            str(out),
            "--max-steps",
            "1",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--width",
            "8",  # the recipe's own width is checked above; this keeps CI quick
            "--wandb-mode",
            "disabled",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=run_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_json(out / "summary.json")["steps_done"] == 1
    assert read_json(out / "config.json")["recipe"] == name


@pytest.mark.slow
def test_scale_lr_linear_follows_the_global_batch(shaped, tmp_path):
    out = tmp_path / "run"
    result = train(
        "--recipe",
        "cifar10-resnet18",
        "--data",
        str(shaped[(10, 32, 3)]),
        "--out",
        str(out),
        "--width",
        "8",
        "--batch-size",
        "16",
        "--max-steps",
        "1",
        "--scale-lr",
        "linear",
        "--num-workers",
        "0",
        "--wandb-mode",
        "disabled",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_json(out / "config.json")["lr"] == pytest.approx(0.1 * 32 / 128)  # 16 x 2 processes
    assert "lr scaled linearly to 0.025" in result.stdout
