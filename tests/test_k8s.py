"""launch/k8s-pytorchjob.yaml: the example Kubeflow PyTorchJob names a command that trains.

No Kubernetes here. The manifest is parsed and checked, then its command runs as the operator runs it: one
identical torchrun per worker pod (2 here, both on this machine), each given the PET_ variables the operator
derives from elasticPolicy, with CPU processes in place of the 8 GPUs and a tiny model in place of the recipe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, cluster_env, free_port, read_json

from resnet_dist.config import parse_args

TINY = ["--width", "8", "--batch-size", "16", "--lr", "0.05", "--num-workers", "1", "--wandb-mode", "disabled"]
MANIFEST = ROOT / "launch" / "k8s-pytorchjob.yaml"


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def container(job: dict) -> dict:
    (only,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    return only


def train_flags(command: list[str]) -> list[str]:
    return command[command.index("launch/train.py") + 1 :]


def test_the_manifest_is_an_elastic_pytorchjob(job):
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    policy = job["spec"]["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d"
    workers = job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
    assert 1 <= policy["minReplicas"] <= workers <= policy["maxReplicas"]
    assert policy["maxRestarts"] >= 1
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Worker"}  # elastic: every pod alike, no Master


def test_its_command_is_torchrun_on_the_trainer_with_valid_flags(job):
    box = container(job)
    command = box["command"]
    assert command[0] == "torchrun" and (ROOT / "launch" / "train.py").is_file()
    launcher = command[1 : command.index("launch/train.py")]
    # the rendezvous comes from the operator's PET_ variables; a flag here would override elasticPolicy
    assert not [a for a in launcher if a.startswith(("--nnodes", "--rdzv", "--master", "--node_rank", "--standalone"))]
    assert f"--nproc_per_node={box['resources']['limits']['nvidia.com/gpu']}" in launcher  # a process per GPU
    cfg, _ = parse_args([*train_flags(command), "--print-config"])  # the trainer's own parser accepts them
    assert cfg.checkpoint_every > 0 and cfg.out.startswith("/runs/")
    mounts = {m["mountPath"] for m in box["volumeMounts"]}
    assert "/runs" in mounts and Path(cfg.data).parts[1] in {m.strip("/") for m in mounts}
    env = {e["name"]: e["value"] for e in box["env"]}
    multi_node = yaml.safe_load((ROOT / "accelerate_configs" / "multi_node.yaml").read_text())
    assert env["ACCELERATE_MIXED_PRECISION"] == multi_node["mixed_precision"]


def pod(job: dict, port: int, logs: Path, name: str, args: list[str]) -> subprocess.Popen:
    """One worker pod's torchrun: the manifest's launcher flags (1 CPU process for 8 GPUs), its environment, and
    the PET_ variables the operator sets from elasticPolicy (the endpoint: this machine, not worker-0)."""
    box, policy = container(job), job["spec"]["elasticPolicy"]
    launcher = box["command"][1 : box["command"].index("launch/train.py")]
    launcher = ["--nproc_per_node=1" if a.startswith("--nproc_per_node") else a for a in launcher]
    env = cluster_env(
        PET_NNODES=f"{policy['minReplicas']}:{policy['maxReplicas']}",
        PET_RDZV_BACKEND=policy["rdzvBackend"],
        PET_RDZV_ENDPOINT=f"127.0.0.1:{port}",
        PET_MAX_RESTARTS=str(policy["maxRestarts"]),
        # torchrun waits last_call_timeout (30 s) for more pods once minReplicas have come, and join_timeout
        # (600 s) for the first ones: shortened, so that a test that waits for nothing ends in minutes
        PET_RDZV_CONF="last_call_timeout=1,join_timeout=180",
        **{e["name"]: e["value"] for e in box["env"]} | {"ACCELERATE_MIXED_PRECISION": "no"},  # bf16 is for GPUs
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "launch" / "train.py"), *args]
    with (logs / f"{name}.out").open("w") as out, (logs / f"{name}.err").open("w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)


@pytest.mark.slow
def test_two_pods_form_one_elastic_job_that_trains_and_evaluates_everything(job, uneven_shards, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(uneven_shards), "--out", str(out), "--epochs", "1", "--log-every", "5", *TINY]
    port = free_port()  # c10d: the pod whose address is the endpoint serves it; both learn it in advance
    pods = [pod(job, port, tmp_path, f"pod{i}", args) for i in range(2)]
    try:
        codes = [p.wait(timeout=420) for p in pods]
    finally:
        for p in pods:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = "\n".join((tmp_path / f"pod{i}.err").read_text()[-2000:] for i in range(2))
    assert codes == [0, 0], logs
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["steps_done"] == 544 // 32  # one job of the two pods
    assert summary["eval_counts"] == {"val": 61, "test": 121}
