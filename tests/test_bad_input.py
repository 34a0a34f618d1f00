"""A table of bad invocations of both commands: each gets exactly one clear line on stderr and exit code 2,
never a traceback or a usage block, before any work is done. And `--help` still prints the whole help."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path

import pytest

from resnet_dist.config import TrainConfig
from resnet_dist.errors import OneLineParser, UsageError, run_cli
from resnet_dist.shard import main as shard_main
from resnet_dist.trainer import main as train_main

T = ["--data", "DATA", "--out", "OUT", "--wandb-mode", "disabled"]

TRAIN_CASES = [
    ([], "--data is required"),
    (["--data", "DATA"], "--out is required"),
    ([*T, "--model", "vgg16"], "argument --model: invalid choice: 'vgg16'"),
    ([*T, "--stem", "tiny"], "argument --stem: invalid choice: 'tiny'"),
    ([*T, "--stem", "imagenett"], "argument --stem: invalid choice: 'imagenett'"),
    ([*T, "--optimizer", "lamb"], "argument --optimizer: invalid choice: 'lamb'"),
    ([*T, "--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
    ([*T, "--schedule", "poly"], "argument --schedule: invalid choice: 'poly'"),
    ([*T, "--epochs", "0"], "--epochs must be positive"),
    ([*T, "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    ([*T, "--epochs"], "argument --epochs: expected one argument"),
    ([*T, "--batch-size", "0"], "--batch-size must be positive"),
    ([*T, "--grad-accum", "0"], "--grad-accum must be at least 1"),
    ([*T, "--lr", "-0.1"], "--lr must be positive"),
    ([*T, "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    ([*T, "--width", "-1"], "--width must be positive"),
    ([*T, "--dropout", "1"], "--dropout must be in [0, 1)"),
    ([*T, "--weight-decay=-1e-4"], "--weight-decay must be >= 0"),
    ([*T, "--optimizer", "adamw", "--nesterov"], "--nesterov applies to --optimizer sgd only"),
    ([*T, "--momentum", "0", "--nesterov"], "--nesterov needs --momentum > 0"),
    ([*T, "--crop-padding", "-2"], "--crop-padding must be >= 0"),
    ([*T, "--collective-timeout", "0"], "--collective-timeout must be positive"),
    ([*T, "--random-erase", "1.5"], "--random-erase must be in [0, 1]"),
    ([*T, "--eval-every", "0"], "--eval-every must be positive"),
    ([*T, "--eval-tta", "crop"], "argument --eval-tta: invalid choice: 'crop'"),
    ([*T, "--wandb-mode", "cloud"], "argument --wandb-mode: invalid choice: 'cloud'"),
    ([*T, "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    ([*T, "stray"], "unrecognized arguments: stray"),
    ([*T, "--cache-limit=-1"], "--cache-limit must be a number of GB >= 0, 0 for no limit (got -1.0)"),
    ([*T, "--cache-limit", "nan"], "--cache-limit must be a number of GB >= 0, 0 for no limit (got nan)"),
    ([*T, "--cache-limit", "lots"], "argument --cache-limit: invalid float value: 'lots'"),
    ([*T, "--no-cache", "--cache-dir"], "argument --cache-dir: expected one argument"),
    # Locations: a URL is never taken for a local folder name (Path("s3://b/x") is the folder s3:/b/x).
    (["--data", "s3:/bkt/x", "--out", "OUT"], "--data s3:/bkt/x: looks like a URL with a slash missing after 's3:'"),
    (["--data", "ftp://host/x", "--out", "OUT"], "--data ftp://host/x: unsupported scheme 'ftp://' (supported: "),
    (["--data", "s3://AKIAX:hunter2@bkt/x", "--out", "OUT"], "s3://...@bkt/...: a URL must not carry credentials"),
    (["--data", "DATA", "--out", "s3://bkt/run"], "the run folder must be on this machine's file system"),
]

SHARD_CASES = [
    ([], "the following arguments are required: source"),
    (["imagenet21k", "--root", "ROOT"], "argument source: invalid choice: 'imagenet21k'"),
    (["nosuch", "--root", "ROOT"], "argument source: invalid choice: 'nosuch'"),
    (["cifar10", "--root", "ROOT/missing"], "expected cifar-10-batches-py/"),
    (["cifar100", "--root", "ROOT/missing"], "expected cifar-100-python/"),
    (["mnist", "--root", "ROOT/missing"], "train-images-idx3-ubyte"),
    (["tiny-imagenet", "--root", "ROOT/missing"], "wnids.txt"),
    (["imagefolder", "--root", "ROOT/missing"], "missing is not a folder: expected ROOT/<split>/<class>/<image>"),
    (["imagenet", "--root", "ROOT/missing"], "is not ILSVRC-2012: expected ROOT/train/<wnid>/*.JPEG and ROOT/val/"),
    (["imagefolder", "--root", "ROOT", "--max-size", "0"], "argument --max-size: must be >= 1, got 0"),
    (["imagenet", "--root", "ROOT", "--max-size", "big"], "argument --max-size: expected an integer, got 'big'"),
    (["cifar10", "--root", "ROOT", "--max-size", "64"], "--max-size applies to imagefolder and imagenet only"),
    (["imagenet", "--root", "ROOT", "--max-size", "64", "--image-size", "32"], "--max-size and --image-size exclude"),
    (["synthetic", "--stats-sample", "-1"], "argument --stats-sample: must be >= 0, got -1"),
    (["synthetic", "--shard-size", "0"], "argument --shard-size: must be >= 1, got 0"),
    (["synthetic", "--shard-size", "many"], "argument --shard-size: expected an integer, got 'many'"),
    (["synthetic", "--val-fraction", "1.5"], "argument --val-fraction: must be between 0 and 1"),
    (["synthetic", "--channels", "2"], "argument --channels: invalid choice: 2"),
    (["synthetic", "--format", "gif"], "argument --format: invalid choice: 'gif'"),
    (["synthetic", "--format", "tiff"], "argument --format: invalid choice: 'tiff'"),
    (["synthetic", "--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["synthetic", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
]

VERIFY_CASES = [
    (["verify"], "the following arguments are required: dir"),
    (["verify", "ROOT", "ROOT"], "unrecognized arguments: "),
    (["verify", "ROOT", "--deep"], "unrecognized arguments: --deep"),
    (["verify", "ftp://host/x"], "verify ftp://host/x: unsupported scheme 'ftp://'"),
    (["verify", "gs:/bkt/x"], "verify gs:/bkt/x: looks like a URL with a slash missing after 'gs:'"),
]

SHARD_OUT_CASES = [
    ("s3:/bkt/x", "--out s3:/bkt/x: looks like a URL with a slash missing after 's3:'; write s3://..."),
    ("s3:bkt/x", "--out s3:bkt/x: looks like a URL"),
    ("ftp://host/x", "--out ftp://host/x: unsupported scheme 'ftp://' (supported: a local path, file://"),
    ("webdav://host/x", "unsupported scheme 'webdav://'"),
    ("https://host/x", "--out https://host/x: cannot write to an http(s) URL"),
    ("s3://AKIAX:hunter2@bkt/x", "--out s3://...@bkt/...: a URL must not carry credentials"),
    ("s3://", "--out s3://: names no bucket or repository"),
]

INDEX_CASES = [
    (["index"], "the following arguments are required: source"),
    (["index", "ROOT/missing"], "ROOT/missing: no such folder"),
    (["index", "ROOT"], "ROOT: no .tar files there"),
    (["index", "nosuch://bucket/shards"], "nosuch://bucket/shards: unsupported scheme 'nosuch://'"),
    (["index", "https://example.com/shards"], "an http(s) URL cannot be listed: give a brace pattern like"),
    (["index", "ROOT/{a,b}/x-0.tar"], "a brace pattern must expand to files of one folder"),
    (["index", "ROOT", "--out", "s3://bucket/x"], "--out s3://bucket/x: must be a local folder"),
    (["index", "ROOT", "--label", "xml"], "argument --label: invalid choice: 'xml'"),
    (["index", "ROOT", "--label", "cls", "--label-key", "y"], "--label-key names a json field"),
    (["index", "ROOT", "--classes", "ROOT/c.txt", "--class-key", "n"], "--classes and --class-key exclude each other"),
    (["index", "ROOT", "--classes", "ROOT/missing.txt"], "--classes ROOT/missing.txt: cannot read"),
    (["index", "ROOT", "--split", "train=a*", "--split", "val"], "--split NAME puts every shard in one split"),
    (["index", "ROOT", "--split", "no good"], "--split no good: expected NAME or NAME=GLOB"),
    (["index", "ROOT", "--stats-sample", "-1"], "argument --stats-sample: expected an integer >= 0, got '-1'"),
]


def invoke(main, argv, tmp_path, capsys) -> tuple[int, str]:
    """(exit code, the whole of stderr), after checking that nothing went to stdout."""
    argv = [
        a.replace("ROOT", str(tmp_path))
        .replace("DATA", str(tmp_path / "no-shards"))
        .replace("OUT", str(tmp_path / "run"))
        for a in argv
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    out, err = capsys.readouterr()
    assert out == "", out
    return exit_info.value.code, err


def assert_one_error_line(code: int, err: str, message: str) -> None:
    """Exit 2 and stderr is exactly one `error:` line holding the message: no usage block, no traceback."""
    assert code == 2, (code, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ") and message in err, err


def test_the_table_is_big_enough():
    assert len(TRAIN_CASES) + len(SHARD_CASES) + len(VERIFY_CASES) + len(SHARD_OUT_CASES) >= 45


@pytest.mark.parametrize("argv,message", TRAIN_CASES)
def test_train_bad_invocation(argv, message, tmp_path, capsys):
    assert_one_error_line(*invoke(train_main, argv, tmp_path, capsys), message)


def test_train_wrong_data_folder(tmp_path, capsys):
    code, err = invoke(train_main, T, tmp_path, capsys)
    assert code == 2, err
    assert err == (
        f"error: {tmp_path / 'no-shards'}: no such folder (expected a shard folder made by "
        "`python -m resnet_dist.shard`)\n"
    )


@pytest.mark.parametrize("argv,message", SHARD_CASES)
def test_shard_bad_invocation(argv, message, tmp_path, capsys):
    argv = [*argv, "--out", str(tmp_path / "out")] if argv else argv
    assert_one_error_line(*invoke(shard_main, argv, tmp_path, capsys), message)


@pytest.mark.parametrize("argv,message", INDEX_CASES)
def test_shard_index_bad_invocation(argv, message, tmp_path, capsys):
    assert_one_error_line(*invoke(shard_main, argv, tmp_path, capsys), message.replace("ROOT", str(tmp_path)))


@pytest.mark.parametrize("out,message", SHARD_OUT_CASES)
def test_shard_bad_out_location(out, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = invoke(shard_main, ["synthetic", "--num-samples", "20", "--out", out], tmp_path, capsys)
    assert_one_error_line(code, err, message)
    assert "hunter2" not in err and list(tmp_path.iterdir()) == []  # no local folder named after the URL


@pytest.mark.parametrize("argv,message", VERIFY_CASES)
def test_shard_verify_bad_invocation(argv, message, tmp_path, capsys):
    assert_one_error_line(*invoke(shard_main, argv, tmp_path, capsys), message)


def test_subcommands_inherit_the_one_line_parser():
    """argparse builds subparsers with type(parent) unless told otherwise; a command that grows subcommands
    keeps one-line errors for them too."""
    parser = OneLineParser(prog="cmd")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("go").add_argument("--n", type=int)
    with pytest.raises(UsageError, match="invalid choice: 'stop'"):
        parser.parse_args(["stop"])
    with pytest.raises(UsageError, match="argument --n: invalid int value: 'x'"):
        parser.parse_args(["go", "--n", "x"])


ROOT = Path(__file__).resolve().parents[1]


def script_main(name: str):
    """main() of a launch/ script, imported from its file (launch/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def command_main(name: str):
    if name.startswith("launch/"):
        return script_main(name.removeprefix("launch/"))
    return importlib.import_module(f"resnet_dist.{name}").main


HELP_CASES = [
    ("train", [], "accelerate launch launch/train.py", "--cpu-bf16"),
    ("shard", [], "python -m resnet_dist.shard", "--shard-size"),
    ("shard", ["verify"], "python -m resnet_dist.shard verify", "folder holding index.json"),
    ("shard", ["index"], "python -m resnet_dist.shard index", "--label-key"),
    ("evaluate", [], "python -m resnet_dist.evaluate", "--tta"),
    ("predict", [], "python -m resnet_dist.predict", "--top-k"),
    ("export", [], "python -m resnet_dist.export", "--format"),
    ("report", [], "python -m resnet_dist.report", "RUN_DIR"),
    ("launch/sweep", [], "launch/sweep.py", "--set"),
    ("launch/time_to_accuracy", [], "launch/time_to_accuracy.py", "--budget"),
]


@pytest.mark.parametrize("name,before,prog,option", HELP_CASES)
def test_help_prints_the_whole_help_and_exits_0(name, before, prog, option, capsys):
    main = train_main if name == "train" else command_main(name)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [*before, "--help"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0 and err == "", err
    assert out.startswith(f"usage: {prog} ") and "options:" in out and option in out, out


def test_train_help_describes_every_setting(capsys):
    with pytest.raises(SystemExit):
        run_cli(train_main, ["--help"])
    out = capsys.readouterr().out
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"--{f.name.replace('_', '-')} " not in out]
    assert not missing, missing
