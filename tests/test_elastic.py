"""Elastic resume, launched for real: a run stopped on 2 processes x 2 loader workers resumes on 1 process
accumulating 2 micro-batches with 1 worker (the same global batch) and ends where the uninterrupted run
ends; a change of the worker count alone ends bitwise equal."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TRAIN, launch_cmd, ok, read_json, run_env, shard, train
from safetensors.torch import load_file

from resnet_dist.checkpoint import find_checkpoint, load_checkpoint

pytestmark = pytest.mark.slow
# fp32 (--cpu-bf16 off); a 200-sample shuffle block, which 32-sample micro-batches straddle
ARGS = ["--width", "8", "--lr", "0.05", "--epochs", "2", "--cpu-bf16", "off", "--shuffle-block", "200"]
ARGS += ["--wandb-mode", "disabled", "--log-every", "1", "--batch-size", "32"]
STEPS = 2 * (1800 // 64)  # 2 epochs of 1800 train samples at a global batch of 64
# BatchNorm's running statistics are buffers, not parameters: on 2 processes they are rank 0's alone (DDP
# broadcasts rank 0's buffers every forward), on 1 process accumulating 2 they follow both micro-batches.
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# The bound stated (issue 12 expects about 1e-4 from summation order). Measured: 0, bitwise equal, on this
# CPU/gloo setup: the same micro-batches in the same order, and with 2 of them (a + b) / 2 (DDP's mean) and
# a / 2 + b / 2 (Accelerate's accumulation of loss / 2) round alike, halving being exact in binary. With
# more micro-batches, or a GPU's reduction order, it need not be.
BOUND = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("elastic") / "ds"
    args = ["--num-classes", "4", "--image-size", "12", "--num-samples", "2000", "--shard-size", "300"]
    ok(shard("synthetic", "--out", str(out), *args, "--val-fraction", "0.1", "--seed", "3"))
    return out


def stop_mid_epoch(args: list[str], out: Path) -> dict:
    """A 2-process run SIGTERMed (as a scheduler preempts) after step 10: it checkpoints the step it is at."""
    cmd = [*launch_cmd(2), str(TRAIN), *args, "--out", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=run_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and "epoch 1 step 10:" not in proc.stdout.readline():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    _, _, meta = load_checkpoint(find_checkpoint(out / "checkpoints" / "last"))
    return meta


def params(run: Path) -> dict[str, torch.Tensor]:
    weights = load_file(run / "checkpoints" / "last" / "model.safetensors")
    return {k: v for k, v in weights.items() if not k.endswith(BUFFERS)}


def test_resume_on_another_world_size_accumulation_and_worker_count(data, tmp_path):
    args = ["--data", str(data), *ARGS]
    ok(train(*args, "--num-workers", "2", "--out", str(tmp_path / "full")))
    assert read_json(tmp_path / "full" / "summary.json")["steps_done"] == STEPS
    meta = stop_mid_epoch([*args, "--num-workers", "2"], tmp_path / "cut")
    assert meta["epoch"] == 0 and 10 <= meta["global_step"] < STEPS // 2 and meta["batch"] == meta["global_step"]
    shutil.copytree(tmp_path / "cut", tmp_path / "workers")

    # another global batch is refused, naming both
    # (the script as a user starts one process, python launch/train.py: accelerate launch would add its own report)
    refused = subprocess.run(
        [sys.executable, str(TRAIN), *args, "--batch-size", "16", "--out", str(tmp_path / "cut")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=run_env(),
        timeout=300,
    )
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "global batch of 64 (32 x 2 processes x 1 accumulation)" in errors[0]
    assert "16 (16 x 1 processes x 1 accumulation)" in errors[0] and "Traceback" not in refused.stderr

    # 1 process x --grad-accum 2 x 1 worker: the same steps, within fp32 summation order
    resumed = ok(train(*args, "--num-workers", "1", "--grad-accum", "2", "--out", str(tmp_path / "cut"), processes=1))
    step = meta["global_step"]
    assert f"epoch 1, micro-batch {2 * step}, optimizer step {step}" in resumed.stdout
    assert read_json(tmp_path / "cut" / "summary.json")["steps_done"] == STEPS
    full, cut = params(tmp_path / "full"), params(tmp_path / "cut")
    assert full.keys() == cut.keys()
    worst = max((full[k] - cut[k]).abs().max().item() for k in full)
    print(f"max abs parameter difference, 2 processes vs 1 process x 2 accumulation: {worst:.3g}")
    assert worst <= BOUND
    # really resumed on 1 process: its running statistics followed both micro-batches, not rank 0's alone
    a = load_file(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("running_mean"))

    # the worker count alone: bitwise, BatchNorm buffers included
    ok(train(*args, "--num-workers", "1", "--out", str(tmp_path / "workers")))
    a = load_file(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(tmp_path / "workers" / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
