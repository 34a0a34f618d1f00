"""Shared test helpers: real shards from the real CLI, real `accelerate launch` runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_DDP = ROOT / "accelerate_configs" / "cpu_ddp.yaml"
TRAIN = ROOT / "launch" / "train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(**extra) -> dict:
    env = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def shard(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m resnet_dist.shard ARGS`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "resnet_dist.shard", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=run_env(),
    )


def launch(
    script: Path,
    *args: str,
    processes: int = 2,
    mixed_precision: str = "no",
    timeout: int = 600,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """A real `accelerate launch` of `script` with `processes` CPU processes joined by gloo."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_DDP),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        mixed_precision,
        str(script),
        *args,
    ]
    if processes == 1:  # a single process: no torchrun, no process group
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            mixed_precision,
            "--dynamo_backend",
            "no",
            str(script),
            *args,
        ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=run_env(OMP_NUM_THREADS="1", **(env or {}))
    )


def train(*args: str, **kw) -> subprocess.CompletedProcess:
    return launch(TRAIN, *args, **kw)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """A small 10-class, 16x16 RGB dataset with a learnable signal, in several uneven shards."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    result = shard(
        "synthetic",
        "--out",
        str(out),
        "--num-classes",
        "4",
        "--image-size",
        "16",
        "--num-samples",
        "600",
        "--channels",
        "3",
        "--shard-size",
        "70",
        "--val-fraction",
        "0.1",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """Like synthetic_shards, with eval splits no world size divides: val 61 (prime), test 121 (11 x 11).

    An even split hides a rank that drops the n % world_size leftover; these sizes leave one at every
    world size from 2 to 10."""
    out = tmp_path_factory.mktemp("data") / "uneven"
    result = shard(
        "synthetic",
        "--out",
        str(out),
        "--num-classes",
        "4",
        "--image-size",
        "16",
        "--num-samples",
        "605",
        "--channels",
        "3",
        "--shard-size",
        "70",
        "--val-fraction",
        "0.102",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr
    splits = json.loads((out / "index.json").read_text())["splits"]
    assert (splits["train"]["num_samples"], splits["val"]["num_samples"], splits["test"]["num_samples"]) == (
        544,
        61,
        121,
    )
    return out
