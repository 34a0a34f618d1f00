"""SLURM: launch/slurm_args.py builds each node's `accelerate launch` arguments from SLURM's environment, and
launch/slurm.sbatch turns the scheduler's SIGUSR1 into a checkpoint, a clean exit and `scontrol requeue`.

No SLURM here: stand-ins for srun (runs its command on this machine, as on a one-node allocation) and
scontrol (records what it is asked) go first on PATH; everything else is the real script and a real launch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PORT_TAKEN, ROOT, cluster_env, free_port, ok, read_json, shard

from resnet_dist.checkpoint import find_checkpoint, load_checkpoint

TINY = ["--width", "8", "--batch-size", "16", "--lr", "0.05", "--num-workers", "1", "--wandb-mode", "disabled"]
SLURM_ARGS = ROOT / "launch" / "slurm_args.py"
SBATCH = ROOT / "launch" / "slurm.sbatch"
MULTI_NODE = ROOT / "accelerate_configs" / "multi_node.yaml"


def slurm_args(env: dict, path: str | None = None) -> subprocess.CompletedProcess:
    base = {"PATH": path if path is not None else os.environ["PATH"]}  # nothing else from this shell
    return subprocess.run(
        [sys.executable, str(SLURM_ARGS)], capture_output=True, text=True, env=base | env, cwd=ROOT, timeout=60
    )


def as_dict(lines: str) -> dict:
    args = lines.split()
    return dict(zip(args[::2], args[1::2]))


@pytest.fixture
def no_scontrol(tmp_path) -> str:
    """A PATH without scontrol: the script's own host-list parser answers."""
    return str(Path(sys.executable).parent)


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node[01-03,07]", "node01"),
        ("gpu-a100-17", "gpu-a100-17"),
        ("rack[2-3]-n[08-10],login1", "rack2-n08"),
        ("x[7],y[1-2]", "x7"),
    ],
)
def test_the_main_node_is_the_first_host_of_the_list(no_scontrol, nodelist, first):
    env = {"SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": "4", "SLURM_NODEID": "3", "SLURM_JOB_ID": "90210"}
    args = as_dict(ok(slurm_args(env, no_scontrol)).stdout)
    assert args["--main_process_ip"] == first
    assert args["--config_file"] == str(MULTI_NODE)
    assert (args["--num_machines"], args["--machine_rank"]) == ("4", "3")
    assert args["--num_processes"] == "4"  # no GPUs on the node: one process per node
    assert args["--main_process_port"] == str(20000 + 90210 % 20000)  # the same on every node of the job


def test_the_host_list_expands_every_range_in_order():
    sys.path.insert(0, str(SLURM_ARGS.parent))
    try:
        from slurm_args import expand_nodelist
    finally:
        sys.path.remove(str(SLURM_ARGS.parent))
    assert expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_nodelist("r[1-2]-n[9-10],a") == ["r1-n9", "r1-n10", "r2-n9", "r2-n10", "a"]
    assert expand_nodelist("n[098-101]") == ["n098", "n099", "n100", "n101"]


def test_processes_are_nodes_times_gpus_per_node(no_scontrol):
    env = {"SLURM_JOB_NODELIST": "node[01-03]", "SLURM_NNODES": "3", "SLURM_NODEID": "0", "SLURM_JOB_ID": "7"}
    args = as_dict(ok(slurm_args(env | {"SLURM_GPUS_ON_NODE": "8"}, no_scontrol)).stdout)
    assert args["--num_processes"] == "24" and args["--machine_rank"] == "0"
    override = {"SLURM_GPUS_ON_NODE": "8", "PROCS_PER_NODE": "2", "MAIN_ADDR": "10.1.2.3", "MAIN_PORT": "31000"}
    args = as_dict(ok(slurm_args(env | override, no_scontrol)).stdout)
    assert (args["--num_processes"], args["--main_process_ip"], args["--main_process_port"]) == (
        "6",
        "10.1.2.3",
        "31000",
    )


def test_scontrol_expands_the_list_where_it_exists(tmp_path):
    fake = fake_bin(tmp_path)
    env = {"SLURM_JOB_NODELIST": "weird{syntax}", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "1"}
    args = as_dict(ok(slurm_args(env | {"FAKE_LOG": str(tmp_path / "log")}, f"{fake}:{os.environ['PATH']}")).stdout)
    assert args["--main_process_ip"] == "weird{syntax}"  # the stand-in prints its argument
    assert (tmp_path / "log").read_text().splitlines() == ["show hostnames weird{syntax}"]


@pytest.mark.parametrize(
    "env,says",
    [
        ({"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "a", "SLURM_JOB_ID": "1"}, "SLURM_NNODES is not set"),
        ({"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[01-", "SLURM_JOB_ID": "1"}, "brackets"),
        ({"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[3-1]", "SLURM_JOB_ID": "1"}, "'3-1'"),
        ({"SLURM_NNODES": "2", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "1"}, "NODEID=2"),
        ({"SLURM_NNODES": "two", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "1"}, "whole"),
    ],
)
def test_a_bad_environment_is_one_line(no_scontrol, env, says):
    result = slurm_args(env, no_scontrol)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ") and says in result.stderr


# The batch script, end to end ----------------------------------------------------------------------------


def fake_bin(tmp_path: Path) -> Path:
    """srun runs its command here; scontrol records its arguments (and expands a host list to itself)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (bin_ / "scontrol").write_text(
        '#!/bin/bash\necho "$*" >> "$FAKE_LOG"\n[ "$1 $2" = "show hostnames" ] && echo "$3"\nexit 0\n'
    )
    for f in bin_.iterdir():
        f.chmod(0o755)
    return bin_


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """56 optimizer steps an epoch at 2 x 16: a signal after step 5 lands mid-run."""
    out = tmp_path_factory.mktemp("slurm") / "ds"
    ok(shard("synthetic", "--out", str(out), "--num-classes", "4", "--image-size", "12", "--num-samples", "2000",
             "--shard-size", "300", "--val-fraction", "0.1", "--seed", "3"))  # fmt: skip
    return out


def sbatch(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    """The batch script as SLURM starts it on a one-node allocation of this machine, 2 processes."""
    env = cluster_env(
        PATH=f"{fake_bin(tmp_path)}:{os.environ['PATH']}",
        FAKE_LOG=str(tmp_path / "scontrol.log"),
        PYTHON=sys.executable,
        SLURM_JOB_ID="4242",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_NODELIST="127.0.0.1",
        SLURM_SUBMIT_DIR=str(ROOT),
        PROCS_PER_NODE="2",
        MAIN_PORT=str(free_port()),  # a real job derives it from SLURM_JOB_ID; a test must not bind a fixed one
    )
    return subprocess.Popen(
        ["bash", str(SBATCH), *args],
        cwd=tmp_path,  # the script goes to SLURM_SUBMIT_DIR itself
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 300) -> bool:
    """True once stdout shows `needle`; False if the job ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if needle in line:
            return True
        if not line and proc.poll() is not None:
            return False
    raise AssertionError(f"no {needle!r} within {timeout} s")


def run_sbatch(tmp_path: Path, args: list[str], signal_after: str | None = None, tries: int = 3):
    """(exit code, stdout, stderr); with `signal_after`, SIGUSR1 to the batch shell once stdout shows it,
    as --signal=B:USR1 sends it. A port another program took is the one reason to start again."""
    for _ in range(tries):
        proc = sbatch(tmp_path, args)
        try:
            if signal_after and wait_for_line(proc, signal_after):
                os.kill(proc.pid, signal.SIGUSR1)
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if not (proc.returncode and any(t in err for t in PORT_TAKEN)):
            return proc.returncode, out, err
    pytest.fail(f"the port was taken {tries} times in a row")


@pytest.mark.slow
def test_usr1_checkpoints_exits_cleanly_requeues_and_the_requeued_job_resumes(data, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), "--epochs", "1", "--log-every", "1", *TINY]
    code, stdout, stderr = run_sbatch(tmp_path, args, signal_after="step 5:")
    assert code == 0, stderr[-3000:]
    assert not (out / "summary.json").exists()  # stopped, not finished
    ckpt = find_checkpoint(out / "checkpoints" / "last")
    _, _, meta = load_checkpoint(ckpt)
    assert 5 <= meta["global_step"] < 1800 // 32
    stopped = (
        f"stopped by SIGUSR1 at epoch 1, optimizer step {meta['global_step']}: saved {out / 'checkpoints' / 'last'}; "
        "exit 0 to be requeued; the requeued job resumes"
    )
    assert stderr.splitlines().count(stopped) == 1  # rank 0 alone says it
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr  # torchrun saw a clean exit
    log = tmp_path / "scontrol.log"
    assert [line for line in log.read_text().splitlines() if "requeue" in line] == ["requeue 4242"]
    assert "requeued job 4242 (srun exit 0)" in stderr

    code, stdout, stderr = run_sbatch(tmp_path, args)  # the requeued job: same script, same arguments
    assert code == 0, stderr[-3000:]
    assert f"resumed from {ckpt}" in stdout
    summary = read_json(out / "summary.json")
    assert summary["steps_done"] == 1800 // 32 and summary["epochs_done"] == 1
    assert [line for line in log.read_text().splitlines() if "requeue" in line] == ["requeue 4242"]  # not again


# The batch script's trap alone: srun is a stand-in that waits, no training ---------------------------------

WAITING_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
trap 'echo "srun got USR1" >> "$FAKE_LOG"; kill $! 2>/dev/null; exit 0' USR1
sleep "${FAKE_SLEEP:-60}" & wait $!
exit 3
"""


def trap_only(tmp_path: Path, with_scontrol: bool, usr1: bool) -> tuple[int, str, str]:
    bin_ = tmp_path / ("bin" if with_scontrol else "bin-no-scontrol")
    bin_.mkdir()
    (bin_ / "srun").write_text(WAITING_SRUN)
    if with_scontrol:
        (bin_ / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "FAKE_LOG": str(log), "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT)}
    env["FAKE_SLEEP"] = "60" if usr1 else "0"
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "--data", "x y"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if usr1:
        deadline = time.time() + 30
        while not (log.exists() and log.read_text().startswith("srun")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the stand-in's trap is set right after its first line
        os.kill(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, log.read_text(), err


def test_the_trap_forwards_usr1_to_srun_and_requeues(tmp_path):
    code, log, err = trap_only(tmp_path, with_scontrol=True, usr1=True)
    assert code == 0, err
    assert log.splitlines() == [
        "srun --kill-on-bad-exit=1 launch/slurm_node.sh --data x y",
        "srun got USR1",
        "scontrol requeue 4242",
    ]
    assert "requeued job 4242 (srun exit 0)" in err


def test_without_scontrol_the_script_says_it_did_not_requeue(tmp_path):
    code, log, err = trap_only(tmp_path, with_scontrol=False, usr1=True)
    assert code == 0 and "srun got USR1" in log
    assert "no scontrol here: not requeued; submit the same command again to resume (srun exit 0)" in err


def test_without_usr1_the_script_exits_as_srun_did_and_does_not_requeue(tmp_path):
    code, log, err = trap_only(tmp_path, with_scontrol=True, usr1=False)
    assert code == 3 and "requeue" not in log and err == ""
