"""launch/sweep.py and python -m resnet_dist.report on two real (tiny) runs: the weight-decay ablation."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, ok, read_json, run_env

pytestmark = pytest.mark.slow
SWEEP = ROOT / "launch" / "sweep.py"
TINY = [
    "--width",
    "4",
    "--batch-size",
    "32",
    "--lr",
    "0.05",
    "--epochs",
    "2",
    "--max-steps",
    "20",
    "--num-workers",
    "0",
    "--wandb-mode",
    "disabled",
    "--log-every",
    "5",
]


def cmd(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=run_env(OMP_NUM_THREADS="1"),
    )


@pytest.fixture(scope="module")
def sweep(synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "wd"
    args = [
        str(SWEEP),
        "--data",
        str(synthetic_shards),
        "--out",
        str(out),
        "--set",
        "weight_decay=5e-4,1e-4",
        "--",
        *TINY,
    ]
    return out, ok(cmd(*args)), args


def test_sweep_runs_each_variant_and_reports(sweep):
    out, result, _ = sweep
    names = ["weight_decay=0.0005", "weight_decay=0.0001"]
    for name in names:
        assert (out / name / "summary.json").is_file()
        assert read_json(out / name / "config.json")["weight_decay"] == float(name.split("=")[1])
    report = read_json(out / "report" / "report.json")
    rows = report["runs"]
    assert [r["run"] for r in rows] == names
    for row in rows:
        assert row["model"] == "resnet18" and row["params"] == 44_424  # width 4, 4 classes, counted from weights
        assert row["lr"] == 0.05 and row["wall_seconds"] > 0 and row["train_img_per_s"] > 0
        assert 0 <= row["best_val_top1"] <= 1 and 0 <= row["test_top1"] <= 1
    assert [r["weight_decay"] for r in rows] == [5e-4, 1e-4]
    md = (out / "report" / "report.md").read_text()
    assert "| run | model | params |" in md and "| weight_decay=0.0005 | resnet18 | 44,424 |" in md
    for png in ("val_accuracy", "generalization_gap", "loss"):
        assert (out / "report" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert "run comparison" in result.stdout


def test_sweep_skips_finished_variants(sweep):
    out, _, args = sweep
    result = ok(cmd(*args))
    assert result.stdout.count("finished, skipped") == 2


def test_report_cli(sweep, tmp_path):
    out, _, _ = sweep
    result = ok(
        cmd(
            "-m",
            "resnet_dist.report",
            str(out / "weight_decay=0.0005"),
            str(out / "weight_decay=0.0001"),
            "--out",
            str(tmp_path / "r"),
        )
    )
    assert "weight decay" in result.stdout and "weight_decay=0.0001" in result.stdout
    assert json.loads((tmp_path / "r" / "report.json").read_text())["runs"][0]["epochs"] >= 0


def one_line_exit_2(result, word):
    """The whole of stderr is one `error:` line holding the word: no usage block, no traceback."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert word in result.stderr, result.stderr


def test_bad_inputs(synthetic_shards, tmp_path):
    one_line_exit_2(cmd("-m", "resnet_dist.report", str(synthetic_shards), "--out", str(tmp_path)), "not a run folder")
    one_line_exit_2(cmd("-m", "resnet_dist.report", str(tmp_path / "nope"), "--out", str(tmp_path)), "no such")
    one_line_exit_2(cmd(str(SWEEP), "--data", "x", "--out", str(tmp_path), "--set", "wd=1"), "not a training setting")
    one_line_exit_2(cmd(str(SWEEP), "--data", "x", "--out", str(tmp_path), "--set", "epochs=two"), "not a valid")
    one_line_exit_2(cmd(str(SWEEP), "--data", "x", "--out", str(tmp_path), "--set", "model=vgg"), "one of")
    one_line_exit_2(cmd("-m", "resnet_dist.report", "--out", str(tmp_path)), "arguments are required: RUN_DIR")
    one_line_exit_2(cmd(str(SWEEP), "--data", "x", "--out", str(tmp_path)), "arguments are required: --set")


def test_runs_with_the_same_folder_name_get_distinct_names():
    from pathlib import Path

    from resnet_dist.report import unique_names

    assert unique_names([Path("/x/a/r"), Path("/x/b/r")]) == ["a/r", "b/r"]
    assert unique_names([Path("/x/a"), Path("/x/b")]) == ["a", "b"]
