"""Helpers every test file shares, defined once: real shards from the real CLI, real `accelerate launch` runs.

A plain module (tests import it as `from helpers import ...`, the way they import `fabricate`); conftest.py
keeps only fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_DDP = ROOT / "accelerate_configs" / "cpu_ddp.yaml"
TRAIN = ROOT / "launch" / "train.py"
SCRIPTS = ROOT / "tests" / "scripts"
FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (make data)


def run_env(**extra) -> dict:
    """The environment of every subprocess: this checkout's package first, no W&B account, no inherited world.

    PET_STANDALONE=1 is torchrun's --standalone, which `accelerate launch` passes through (it fills torchrun's
    own arguments from their PET_ variables): each launch serves its rendezvous on a port the OS assigns as it
    binds (port 0), so concurrent launches, the tests' own or other jobs', cannot meet at one port. Picking a
    free port first and handing it over leaves a gap in which another job can take it.
    """
    env = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1", PET_STANDALONE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.pop("WANDB_API_KEY", None)
    env.pop("WORLD_SIZE", None)  # a launched child must see its launcher's world, not the test runner's
    env.update(extra)
    return env


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def shard(*args: str, timeout: int = 300, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """`python -m resnet_dist.shard ARGS`, as a user runs it (with `env` on top of the test environment)."""
    return subprocess.run(
        [sys.executable, "-m", "resnet_dist.shard", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=run_env(**(env or {})),
        **kw,
    )


def synthetic(out: Path, **options) -> Path:
    """Pack `python -m resnet_dist.shard synthetic --out OUT` with `options` as flags (num_classes=4 is
    --num-classes 4), assert it worked, and return OUT: the one recipe every test dataset fixture uses."""
    flags = [str(v) if i % 2 else f"--{k.replace('_', '-')}" for k, v in options.items() for i in (0, 1)]
    result = shard("synthetic", "--out", str(out), *flags)
    assert result.returncode == 0, result.stderr
    return out


def launch_cmd(processes: int = 2, mixed_precision: str = "no") -> list[str]:
    """The `accelerate launch` command line, up to the script: `processes` CPU processes joined by gloo
    (cpu_ddp.yaml, as the README tells users), or one process with no torchrun and no process group.
    No --main_process_port: under run_env's standalone rendezvous the port in cpu_ddp.yaml is not bound."""
    head = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes == 1:
        one = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", mixed_precision]
        return [*head, *one, "--dynamo_backend", "no"]
    return [
        *head,
        "--config_file",
        str(CPU_DDP),
        "--num_processes",
        str(processes),
        "--mixed_precision",
        mixed_precision,
    ]


def launch(
    script: Path,
    *args: str,
    processes: int = 2,
    mixed_precision: str = "no",
    timeout: int = 600,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """A real `accelerate launch` of `script` (a path, or "-m" and a module as its first arg) to the end."""
    cmd = [*launch_cmd(processes, mixed_precision), str(script), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=run_env(OMP_NUM_THREADS="1", **(env or {}))
    )


def train(*args: str, **kw) -> subprocess.CompletedProcess:
    return launch(TRAIN, *args, **kw)


# Launches that span "machines": a port both sides know in advance ---------------------------------------

# What a launcher on machine 0 says when the port it was given is taken: Accelerate's check before it starts,
# torch's store when it binds. Only these make a multi-machine test start again on another port.
PORT_TAKEN = ("another process is utilizing it", "EADDRINUSE")


def free_port() -> int:
    """A port free now, for launches that must agree on one before they start (machine 1 cannot learn the
    port machine 0 bound as 0). Another program may take it before machine 0 binds it: see PORT_TAKEN."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(**extra) -> dict:
    """run_env without PET_STANDALONE: standalone is a one-machine rendezvous on a port of its own choosing."""
    env = run_env(OMP_NUM_THREADS="1", **extra)
    env.pop("PET_STANDALONE", None)
    return env


def fashion_subset(out: Path, limit: int, *shard_args: str) -> Path:
    """The first `limit` images of each real Fashion-MNIST split packed into `out` (skips the test where the
    dataset is not installed)."""
    import pytest

    if not FASHION.is_dir():
        pytest.skip(f"{FASHION} not present (make data)")
    ok(shard("fashion-mnist", "--root", str(FASHION), "--out", str(out), "--limit", str(limit), *shard_args))
    return out
