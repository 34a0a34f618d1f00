"""A table of bad invocations of both commands: each gets exactly one clear line on stderr and exit code 2,
never a traceback, before any work is done."""

from __future__ import annotations

import pytest

from resnet_dist.errors import run_cli
from resnet_dist.shard import main as shard_main
from resnet_dist.trainer import main as train_main

T = ["--data", "DATA", "--out", "OUT", "--wandb-mode", "disabled"]

TRAIN_CASES = [
    ([], "--data is required"),
    (["--data", "DATA"], "--out is required"),
    ([*T, "--model", "vgg16"], "invalid choice: 'vgg16'"),
    ([*T, "--stem", "tiny"], "invalid choice: 'tiny'"),
    ([*T, "--optimizer", "lamb"], "invalid choice: 'lamb'"),
    ([*T, "--schedule", "linear"], "invalid choice: 'linear'"),
    ([*T, "--epochs", "0"], "--epochs must be positive"),
    ([*T, "--epochs", "two"], "invalid int value: 'two'"),
    ([*T, "--batch-size", "0"], "--batch-size must be positive"),
    ([*T, "--grad-accum", "0"], "--grad-accum must be at least 1"),
    ([*T, "--lr", "-0.1"], "--lr must be positive"),
    ([*T, "--lr", "fast"], "invalid float value: 'fast'"),
    ([*T, "--width", "-1"], "--width must be positive"),
    ([*T, "--dropout", "1"], "--dropout must be in [0, 1)"),
    ([*T, "--weight-decay=-1e-4"], "--weight-decay must be >= 0"),
    ([*T, "--optimizer", "adamw", "--nesterov"], "--nesterov applies to --optimizer sgd only"),
    ([*T, "--momentum", "0", "--nesterov"], "--nesterov needs --momentum > 0"),
    ([*T, "--crop-padding", "-2"], "--crop-padding must be >= 0"),
    ([*T, "--collective-timeout", "0"], "--collective-timeout must be positive"),
    ([*T, "--random-erase", "1.5"], "--random-erase must be in [0, 1]"),
    ([*T, "--eval-every", "0"], "--eval-every must be positive"),
    ([*T, "--eval-tta", "crop"], "invalid choice: 'crop'"),
    ([*T, "--wandb-mode", "cloud"], "invalid choice: 'cloud'"),
    ([*T, "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
]

SHARD_CASES = [
    ([], "the following arguments are required: source"),
    (["imagenet21k", "--root", "ROOT"], "invalid choice: 'imagenet21k'"),
    (["cifar10", "--root", "ROOT/missing"], "expected cifar-10-batches-py/"),
    (["cifar100", "--root", "ROOT/missing"], "expected cifar-100-python/"),
    (["mnist", "--root", "ROOT/missing"], "train-images-idx3-ubyte"),
    (["tiny-imagenet", "--root", "ROOT/missing"], "wnids.txt"),
    (["imagefolder", "--root", "ROOT/missing"], "missing is not a folder: expected ROOT/<split>/<class>/<image>"),
    (["synthetic", "--shard-size", "0"], "--shard-size"),
    (["synthetic", "--val-fraction", "1.5"], "--val-fraction"),
    (["synthetic", "--channels", "2"], "invalid choice: 2"),
    (["synthetic", "--format", "gif"], "invalid choice: 'gif'"),
    (["synthetic", "--workers", "0"], "--workers"),
]


def invoke(main, argv, tmp_path, capsys) -> tuple[int, list[str]]:
    argv = [
        a.replace("ROOT", str(tmp_path))
        .replace("DATA", str(tmp_path / "no-shards"))
        .replace("OUT", str(tmp_path / "run"))
        for a in argv
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, [line for line in err.splitlines() if "error:" in line]


def test_the_table_is_big_enough():
    assert len(TRAIN_CASES) + len(SHARD_CASES) >= 25


@pytest.mark.parametrize("argv,message", TRAIN_CASES)
def test_train_bad_invocation(argv, message, tmp_path, capsys):
    code, lines = invoke(train_main, argv, tmp_path, capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_train_wrong_data_folder(tmp_path, capsys):
    code, lines = invoke(train_main, T, tmp_path, capsys)
    assert (
        code == 2
        and lines
        == [
            f"error: {tmp_path / 'no-shards'}: no such folder (expected a shard folder made "
            "by `python -m resnet_dist.shard`)"
        ]
        or "no-shards" in lines[0]
    )


@pytest.mark.parametrize("argv,message", SHARD_CASES)
def test_shard_bad_invocation(argv, message, tmp_path, capsys):
    code, lines = invoke(shard_main, [*argv, "--out", str(tmp_path / "out")] if argv else argv, tmp_path, capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
