"""Multi-node, launched for real: two `accelerate launch` commands, one per "node", form one job on loopback.

Both "nodes" run on this machine and share the run folder, as nodes on a shared file system do: only the
job's global main process (rank 0, on machine 0) writes it, so they do not collide.

The port: machine 1 must be told machine 0's port before either starts, so it cannot be 0 (the OS's choice,
which only machine 0 would learn). The test binds port 0, closes it and passes the number on; in the gap
another program may take it. Machine 0 then fails at once and says so (Accelerate's "another process is
utilizing it", or torch's EADDRINUSE): only then is the whole job run again, on a new port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PORT_TAKEN, ROOT, TRAIN, cluster_env, free_port, read_json

pytestmark = pytest.mark.slow
MULTI_NODE = ROOT / "accelerate_configs" / "multi_node.yaml"
TINY = ["--width", "8", "--batch-size", "16", "--lr", "0.05", "--num-workers", "1", "--wandb-mode", "disabled"]


def node(rank: int, port: int, logs: Path, args: list[str]) -> subprocess.Popen:
    """One node: multi_node.yaml as shipped, with this machine's address, port and rank, and 2 CPU processes
    in the whole job (1 per node) in place of its 16 GPUs."""
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_NODE)),
        *("--num_processes", "2", "--machine_rank", str(rank), "--mixed_precision", "no"),
        *("--main_process_ip", "127.0.0.1", "--main_process_port", str(port)),
        *(str(TRAIN), *args),
    ]
    # Files, not pipes: a pipe nobody reads while the other node is awaited can fill and stall a node.
    with (logs / f"node{rank}.out").open("w") as out, (logs / f"node{rank}.err").open("w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=cluster_env(), stdout=out, stderr=err, start_new_session=True)


def read(logs: Path, rank: int, stream: str) -> str:
    return (logs / f"node{rank}.{stream}").read_text()


def two_node_job(logs: Path, args: list[str], tries: int = 3) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of machine 0 and machine 1."""
    for _ in range(tries):
        port = free_port()
        nodes = [node(rank, port, logs, args) for rank in (0, 1)]
        try:
            nodes[0].wait(timeout=600)
            taken = nodes[0].returncode and any(t in read(logs, 0, "err") for t in PORT_TAKEN)
            if taken:
                os.killpg(nodes[1].pid, signal.SIGKILL)  # it may be talking to whoever holds the port
            nodes[1].wait(timeout=120)
        finally:
            for proc in nodes:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        if not taken:
            return [(p.returncode, read(logs, r, "out"), read(logs, r, "err")) for r, p in enumerate(nodes)]
    pytest.fail(f"the port was taken {tries} times in a row")


def test_two_nodes_on_loopback_train_and_evaluate_every_sample_once(uneven_shards, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(uneven_shards), "--out", str(out), "--epochs", "1", "--log-every", "5", *TINY]
    (code0, out0, err0), (code1, out1, err1) = two_node_job(tmp_path, args)
    assert code0 == 0 and code1 == 0, f"{err0[-3000:]}\n{err1[-3000:]}"
    summary = read_json(out / "summary.json")
    # one job of 2 ranks, 1 per launcher: the two launchers joined; apart, each would be a world of 1
    assert summary["world_size"] == 2 and summary["global_batch"] == 32
    assert summary["steps_done"] == 544 // 32 and summary["epochs_done"] == 1
    assert summary["eval_counts"] == {"val": 61, "test": 121}  # every sample once, the odd one out included
    assert summary["lost_eval_samples"] == {"val": 0, "test": 0} and summary["lost_train_samples"] == 0
    assert "2 process(es)" in out0 and "test top-1" in out0  # machine 0 holds rank 0: it reports
    assert out1.strip() == "" and "error" not in err1.lower()  # machine 1 holds rank 1: it trains silently
    assert not list(out.glob(".write-test-*"))
