"""Bad flags: one line on stderr, exit code 2, no traceback, before anything is loaded."""

import subprocess
import sys

import pytest
from helpers import ROOT, TRAIN, run_env

from resnet_dist.config import TrainConfig, parse_args
from resnet_dist.errors import UsageError


def run(*args):
    return subprocess.run(
        [sys.executable, str(TRAIN), *args], capture_output=True, text=True, cwd=ROOT, env=run_env(), timeout=120
    )


BAD = [
    ([], "--data is required"),
    (["--data", "x"], "--out is required"),
    (["--data", "x", "--out", "y", "--epochs", "0"], "--epochs must be positive"),
    (["--data", "x", "--out", "y", "--batch-size", "-4"], "--batch-size must be positive"),
    (["--data", "x", "--out", "y", "--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--data", "x", "--out", "y", "--lr", "0"], "--lr must be positive"),
    (["--data", "x", "--out", "y", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--data", "x", "--out", "y", "--optimizer", "adam", "--nesterov"], "--nesterov applies to --optimizer sgd"),
    (["--data", "x", "--out", "y", "--model", "resnet101"], "invalid choice: 'resnet101'"),
    (["--data", "x", "--out", "y", "--epochs", "ten"], "invalid int value: 'ten'"),
    (["--data", "x", "--out", "y", "--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--data", "x", "--out", "y", "--label-smoothing", "-0.1"], "--label-smoothing must be in [0, 1)"),
    (["--data", "x", "--out", "y", "--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--data", "x", "--out", "y", "--max-steps", "-1"], "--max-steps must be >= 0"),
    (["--data", "x", "--out", "y", "--width", "-8"], "--width must be positive"),
    # issue 13: mix
    (["--data", "x", "--out", "y", "--mixup", "-0.2"], "--mixup must be >= 0"),
    (["--data", "x", "--out", "y", "--cutmix", "-1"], "--cutmix must be >= 0"),
    (["--data", "x", "--out", "y", "--mix-prob", "1.5"], "--mix-prob must be in [0, 1]"),
    (["--data", "x", "--out", "y", "--mix-switch-prob", "-0.5"], "--mix-switch-prob must be in [0, 1]"),
    (["--data", "x", "--out", "y", "--augment", "autoaugment"], "invalid choice: 'autoaugment'"),
    (["--data", "x", "--out", "y", "--augment", "randaugment", "--randaugment-m", "31"], "--randaugment-m must be in"),
    (
        ["--data", "x", "--out", "y", "--augment", "trivialaugment", "--train-crop", "rrc", "--decode", "gpu"],
        "--augment needs --decode cpu",
    ),
    # issue 13: ema
    (["--data", "x", "--out", "y", "--ema", "1"], "--ema must be in [0, 1)"),
    (["--data", "x", "--out", "y", "--ema", "0.9", "--ema-every", "0"], "--ema-every must be positive"),
    (["--data", "x", "--out", "y", "--best-by", "ema"], "--best-by ema needs --ema DECAY"),
]


@pytest.mark.parametrize("args,message", [case for case in BAD if "invalid" not in case[1]])
def test_bad_values_raise_usage_error(args, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_args(args)


# Through the real entry point, the way a user meets them (each is a fresh Python process).
@pytest.mark.parametrize(
    "args,message",
    [
        BAD[2],
        BAD[8],
        BAD[9],
        (
            ["--data", "/nonexistent/shards", "--out", "y", "--wandb-mode", "disabled"],
            "/nonexistent/shards: no such folder",
        ),
    ],
)
def test_bad_flags_get_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    # the whole of stderr: one line, no usage block, no traceback
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr


def test_crop_larger_than_image_is_refused(synthetic_shards, tmp_path):
    result = run(
        "--data",
        str(synthetic_shards),
        "--out",
        str(tmp_path / "r"),
        "--crop-padding",
        "16",
        "--wandb-mode",
        "disabled",
    )
    assert result.returncode == 2
    assert result.stderr == "error: --crop-padding 16 makes no sense for 16x16 images\n", result.stderr


def test_defaults_and_bool_flags_parse():
    cfg, print_only = parse_args(["--data", "d", "--out", "o", "--no-flip", "--sync-bn", "--width", "32"])
    assert not print_only
    assert isinstance(cfg, TrainConfig) and cfg.flip is False and cfg.sync_bn is True and cfg.width == 32
    assert cfg.model == "resnet18" and cfg.wandb_mode == "offline"
