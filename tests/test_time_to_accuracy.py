"""launch/time_to_accuracy.py: the script behind the README's Results, run end to end on IDX files in
Fashion-MNIST's real layout (packing, a real 2-process launch, result.json, the curve)."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys

import fabricate
import pytest
from helpers import ROOT, launch_cmd, read_json, run_env

from resnet_dist.evaluate import main as evaluate_main

SCRIPT = ROOT / "launch" / "time_to_accuracy.py"
spec = importlib.util.spec_from_file_location("time_to_accuracy", SCRIPT)
tta = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tta)


def run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=run_env(OMP_NUM_THREADS="1"),
    )


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    base = tmp_path_factory.mktemp("tta")
    fabricate.make_idx(base / "fm", train=300, test=100)
    launch = shlex.join(launch_cmd(2))
    result = run_script(
        "--recipe",
        "fashion-mnist-demo",
        "--root",
        str(base / "fm"),
        "--out",
        str(base / "res"),
        "--goal",
        "5",
        "--budget",
        "30",
        "--launch",
        launch,
        # the trainer's own flags pass through: a tiny model, 3 epochs, test after 2 and 3
        "--width",
        "4",
        "--epochs",
        "3",
        "--eval-every",
        "2",
        "--batch-size",
        "16",
        "--random-erase",
        "0.5",
        "--eval-tta",
        "flip",
        # fp32 as the evaluate command below computes, so the command's numbers on checkpoints/last must
        # equal the run's own. No --sync-bn on purpose: each rank's BatchNorm statistics drift from rank 0's
        # during training, and the run must evaluate with rank 0's (the checkpoint's) on every rank.
        "--cpu-bf16",
        "off",
        "--wandb-mode",
        "disabled",
    )
    return base, result


def test_measures_the_whole_pipeline_and_records_the_curve(measured):
    base, result = measured
    assert result.returncode == 0, result.stderr[-3000:]
    out = read_json(base / "res" / "result.json")
    summary = read_json(base / "res" / "run" / "summary.json")
    assert read_json(base / "res" / "shards" / "index.json")["splits"]["train"]["num_samples"] == 300  # no val cut
    assert out["test_top1"] == pytest.approx(100 * summary["test_top1"])
    assert [p["epoch"] for p in out["curve"]] == [2, 3, "end"]  # --eval-every 2, and always the last epoch
    history = read_json(base / "res" / "run" / "history.json")
    assert [h["epoch"] for h in history] == [1, 2, 3] and "val_top1" not in history[0]
    minutes = [p["minutes"] for p in out["curve"]]
    assert 0 < out["pack_minutes"] < minutes[0] < minutes[1] <= minutes[2] == pytest.approx(out["wall_minutes"])
    # The end point is the final weights' test top-1 with flip TTA. Without a val split it comes from the same
    # history row as the epoch-3 point, so it is checked against an evaluation of its own: the evaluate
    # command on checkpoints/last (the final weights), in this process.
    last = base / "res" / "run" / "checkpoints" / "last"
    args = ["--checkpoint", str(last), "--data", str(base / "res" / "shards"), "--split", "test", "--tta", "flip"]
    assert evaluate_main([*args, "--batch-size", "16", "--num-workers", "0", "--out", str(base / "again")]) == 0
    again = read_json(base / "again" / "eval.json")
    assert again["count"] == summary["eval_counts"]["test"] == 100 and again["global_step"] == summary["steps_done"]
    assert out["curve"][2]["top1"] == out["test_top1"] == pytest.approx(100 * again["top1"], abs=1e-9)
    assert out["curve"][1]["top1"] == pytest.approx(100 * again["top1"], abs=1e-9)  # epoch 3: the same weights
    assert summary["test_loss"] == pytest.approx(again["loss"], rel=1e-5)
    assert out["config"]["eval_tta"] == "flip" and out["config"]["width"] == 4
    assert out["config"]["random_erase"] == 0.5 and out["config"]["eval_every"] == 2
    assert out["met"] == (out["test_top1"] >= 5) and out["machine"]["cores"] >= 1
    assert "--recipe fashion-mnist-demo" in out["command"] and "--eval-tta flip" in out["command"]
    assert (base / "res" / "curve.png").stat().st_size > 5000
    assert "with flip TTA on 100 images" in result.stdout
    assert f"goal 5.0% within 30 min: {'met' if out['met'] else 'missed'}" in result.stdout


def test_overlays_finished_results_and_refuses_a_second_timed_run_in_the_same_folder(measured):
    base, _ = measured
    plotted = run_script("--plot", str(base / "res"), str(base / "res"), "--to", str(base / "both.png"))
    assert plotted.returncode == 0, plotted.stderr
    assert (base / "both.png").stat().st_size > 5000
    again = run_script("--root", str(base / "fm"), "--out", str(base / "res"))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
    assert "exists: a timed run starts from nothing" in again.stderr
    no_launcher = run_script("--root", str(base / "fm"), "--out", str(base / "other"), "--launch", "no-such-launcher")
    assert no_launcher.returncode == 2 and "cannot start training: no-such-launcher" in no_launcher.stderr
    missing = run_script("--plot", str(base / "nowhere"), "--to", str(base / "x.png"))
    assert missing.returncode == 2 and "no readable result.json" in missing.stderr
    assert "Traceback" not in again.stderr + missing.stderr + no_launcher.stderr


def test_the_goal_counts_only_when_the_finished_run_is_within_budget():
    curve = [
        {"epoch": 1, "minutes": 5.0, "top1": 93.0},
        {"epoch": 2, "minutes": 10.0, "top1": 94.2},
        {"epoch": "end", "minutes": 10.3, "top1": 94.2},
    ]
    assert tta.goal_met(curve, 94.0, 15) and not tta.goal_met(curve, 94.5, 15) and not tta.goal_met(curve, 94.0, 10)
    assert tta.first_reaching(curve, 94.0)["epoch"] == 2 and tta.first_reaching(curve, 95.0) is None
