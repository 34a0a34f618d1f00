"""The fault suite: each fault is injected for real into real runs (signals, kills, damaged bytes,
a full disk, a frozen rank, diverging losses) and the run must end as the README's table says."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import ROOT, SCRIPTS, TRAIN, launch, launch_cmd, ok, read_json, run_env, shard, train
from safetensors.torch import load_file

from resnet_dist.checkpoint import find_checkpoint, load_checkpoint

pytestmark = pytest.mark.slow
TINY = ["--width", "8", "--batch-size", "16", "--lr", "0.05", "--num-workers", "1", "--wandb-mode", "disabled"]


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Enough steps per epoch (2000 samples) that a signal lands mid-run."""
    out = tmp_path_factory.mktemp("faults") / "ds"
    ok(
        shard(
            "synthetic",
            "--out",
            str(out),
            "--num-classes",
            "4",
            "--image-size",
            "12",
            "--num-samples",
            "2000",
            "--shard-size",
            "300",
            "--val-fraction",
            "0.1",
            "--seed",
            "3",
        )
    )
    return out


def start(*args: str, processes: int = 2) -> subprocess.Popen:
    """A real `accelerate launch` in the background, in its own session so a test can signal it as a shell would."""
    cmd = [*launch_cmd(processes), str(TRAIN), *args, "--log-every", "1"]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=run_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"run ended before {needle!r}: {proc.stderr.read()[-2000:]}")
    raise AssertionError(f"no {needle!r} within {timeout} s")


def ranks(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """Training processes by rank: those torchrun gave a RANK, not their loader workers (which inherit it)."""
    procs = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            procs[child.pid] = (child, child.environ())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {
        int(env["RANK"]): child
        for child, env in procs.values()
        if "RANK" in env and "RANK" not in procs.get(child.ppid(), (None, {}))[1]
    }


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


# 1. Preemption ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,sig", [("launcher", signal.SIGTERM), ("rank1", signal.SIGTERM), ("group", signal.SIGINT)]
)
def test_preemption_saves_and_the_same_command_resumes(data, tmp_path, target, sig):
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), "--epochs", "2", *TINY]
    proc = start(*args)
    wait_for_line(proc, "step 10:")
    if target == "launcher":
        os.kill(proc.pid, sig)
    elif target == "rank1":
        ranks(proc)[1].send_signal(sig)
    else:  # Ctrl-C in a terminal: the whole foreground process group
        os.killpg(proc.pid, sig)
    code, stdout, stderr = finish(proc)
    assert code != 0
    # torchrun prints its own report (with its traceback) after a signal; none of ours may appear
    assert "resnet_dist/" not in stderr and 'train.py", line' not in stderr
    assert f"stopped by {sig.name} at epoch" in stderr
    ckpt = find_checkpoint(out / "checkpoints" / "last")
    assert ckpt is not None
    _, state, meta = load_checkpoint(ckpt)
    assert 10 <= meta["global_step"] < 2 * (1800 // 32)
    resumed = ok(train(*args, "--log-every", "1"))
    assert f"resumed from {ckpt}" in resumed.stdout
    summary = read_json(out / "summary.json")
    assert summary["steps_done"] == 2 * (1800 // 32) and summary["epochs_done"] == 2


# 2. Exact mid-epoch resume ----------------------------------------------------------------------------


def test_single_process_resume_is_bitwise_equal(data, tmp_path):
    args = ["--data", str(data), "--epochs", "2", "--checkpoint-every", "7", "--cpu-bf16", "off", *TINY]  # fp32
    single = dict(processes=1)
    ok(train(*args, "--out", str(tmp_path / "full"), **single))
    ok(train(*args, "--out", str(tmp_path / "cut"), "--max-steps", "40", **single))  # mid-epoch 1 (112 steps/epoch)
    assert read_json(tmp_path / "cut" / "summary.json")["steps_done"] == 40
    ok(train(*args, "--out", str(tmp_path / "cut"), **single))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# 3. SIGKILL, also while a checkpoint is being written ----------------------------------------------


@pytest.mark.parametrize("kill_at", range(1, 9))
def test_kill_during_checkpoint_write_leaves_a_complete_checkpoint(tmp_path, kill_at):
    script = ROOT / "tests" / "scripts" / "kill_during_save.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(kill_at)],
        capture_output=True,
        text=True,
        env=run_env(),
        timeout=120,
    )
    assert result.returncode in (-signal.SIGKILL, 0), result.stderr
    found = find_checkpoint(tmp_path / "checkpoints" / "last")
    assert found is not None
    weights, state, meta = load_checkpoint(found)
    assert meta["version"] in (1, 2) and float(weights["w"][0]) == meta["version"]
    assert state["step"] == meta["version"]


def test_sigkill_of_a_rank_ends_the_job_and_the_last_checkpoint_resumes(data, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), "--epochs", "2", "--checkpoint-every", "5", *TINY]
    proc = start(*args)
    wait_for_line(proc, "step 23:")
    ranks(proc)[1].kill()
    code, _, _ = finish(proc)
    assert code != 0  # torchrun notices the dead rank and stops the others: no hang
    _, _, meta = load_checkpoint(find_checkpoint(out / "checkpoints" / "last"))
    assert meta["global_step"] >= 20
    ok(train(*args))
    assert read_json(out / "summary.json")["steps_done"] == 2 * (1800 // 32)


# 4. Corruption met while streaming -----------------------------------------------------------------


def damaged_copy(data: Path, tmp_path: Path, mend_index: bool) -> tuple[Path, str]:
    """A copy whose second train shard has bytes flipped inside its first image.

    mend_index=False: the shard no longer matches its sha256 (it changed after packing).
    mend_index=True: index.json is rewritten to the damaged bytes (a shard written damaged): the image
    itself must be caught when it does not decode.
    """
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    index = json.loads((copy / "index.json").read_text())
    entry = index["splits"]["train"]["shards"][1]
    path = copy / entry["file"]
    raw = bytearray(path.read_bytes())
    raw[560:600] = bytes(b ^ 0x5A for b in raw[560:600])
    path.write_bytes(bytes(raw))
    if mend_index:
        import hashlib

        entry["sha256"] = hashlib.sha256(raw).hexdigest()
        (copy / "index.json").write_text(json.dumps(index))
    return copy, entry["file"]


@pytest.mark.parametrize("mend_index", [False, True])
def test_damaged_data_is_skipped_counted_and_warned_once(data, tmp_path, mend_index):
    copy, name = damaged_copy(data, tmp_path, mend_index)
    out = tmp_path / "run"
    result = ok(train("--data", str(copy), "--out", str(out), "--epochs", "2", *TINY))
    summary = read_json(out / "summary.json")
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:") and name in line]
    assert len(warnings) == 1
    if mend_index:
        assert "does not decode" in warnings[0]
        assert 1 <= summary["lost_train_samples"] <= 2  # the one bad image, once per epoch it is read
    else:
        assert "sha256 differs" in warnings[0]
        assert summary["lost_train_samples"] >= 100  # its samples, as far as this run read them
    assert summary["steps_done"] == 2 * (1800 // 32)  # every rank kept the same batch count
    assert summary["data_problems"] and name in summary["data_problems"][0]


def test_strict_data_fails_naming_the_shard(data, tmp_path):
    copy, name = damaged_copy(data, tmp_path, mend_index=False)
    result = train("--data", str(copy), "--out", str(tmp_path / "run"), "--epochs", "1", "--strict-data", *TINY)
    assert result.returncode != 0
    assert any(name in line and "sha256 differs" in line for line in errors(result)), result.stderr[-2000:]


def test_damaged_tar_block_is_survived(data, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    index = json.loads((copy / "index.json").read_text())
    path = copy / index["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(path.read_bytes())
    raw[512 * 30 : 512 * 31] = b"\xff" * 512  # a header block in the middle: the tar loses its thread there
    path.write_bytes(bytes(raw))
    out = tmp_path / "run"
    ok(train("--data", str(copy), "--out", str(out), "--epochs", "1", *TINY))
    assert read_json(out / "summary.json")["lost_train_samples"] > 0


# 5. Missing or inconsistent data: a clear error before training -----------------------------------


def single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN), *args, "--wandb-mode", "disabled"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=run_env(),
        timeout=120,
    )


def test_missing_shard_and_bad_index_fail_before_training(data, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    (copy / "val-000000.tar").unlink()
    result = single("--data", str(copy), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and errors(result) == [
        f"error: {copy / 'val-000000.tar'}: shard listed in index.json is missing"
    ]
    assert not (tmp_path / "r" / "checkpoints").exists()
    (copy / "index.json").write_text("{not json")
    result = single("--data", str(copy), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and len(errors(result)) == 1 and "not valid JSON" in errors(result)[0]


# 7. A dead or hung rank ---------------------------------------------------------------------------


def test_frozen_rank_ends_the_job_with_an_error_naming_it(data, tmp_path):
    out = tmp_path / "run"
    proc = start("--data", str(data), "--out", str(out), "--epochs", "3", "--collective-timeout", "8", *TINY)
    wait_for_line(proc, "step 5:")
    frozen = ranks(proc)[1]
    frozen.suspend()  # SIGSTOP: alive but silent, the way a hung GPU or a swapped-out host looks
    try:
        code, _, stderr = finish(proc, timeout=90)
    finally:
        if frozen.is_running():
            frozen.resume()
            frozen.kill()
    assert code != 0
    line = [line for line in stderr.splitlines() if "error:" in line and "silent rank" in line]
    assert line and line[0].endswith("rank 1 stopped answering"), stderr[-3000:]


# 8. NaN/inf losses --------------------------------------------------------------------------------


def test_nan_step_is_skipped_on_every_rank_and_training_goes_on(tmp_path):
    result = launch(SCRIPTS / "nan_step.py", str(tmp_path / "r.json"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r = read_json(tmp_path / "r.json")
    assert r["bad_steps"] == 1 and r["unchanged_by_bad_step"] and r["ranks_agree"] and r["trained_after"]


def test_diverging_run_stops_with_a_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    result = single(
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--max-bad-steps",
        "3",
        "--width",
        "8",
        "--batch-size",
        "16",
        "--num-workers",
        "1",
        "--lr",
        "1e12",
        "--momentum",
        "0",
    )
    assert result.returncode == 1
    assert len(errors(result)) == 1 and "NaN or infinite for 3 optimizer steps in a row" in errors(result)[0]
    assert find_checkpoint(out / "checkpoints" / "last") is not None


# 9. Disk full, unwritable RUN_DIR -------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_a_clear_error_and_the_last_checkpoint_survives(data, small_disk):
    out = small_disk / "run"
    # ~0.7 MB of weights + 0.7 MB of momentum: the first checkpoint fits, a second beside it does not.
    result = single(
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--checkpoint-every",
        "5",
        "--width",
        "8",
        "--batch-size",
        "16",
        "--num-workers",
        "1",
    )
    assert result.returncode == 1
    assert len(errors(result)) == 1 and "No space left on device" in errors(result)[0]
    assert "the previous checkpoint is intact" in errors(result)[0]
    found = find_checkpoint(out / "checkpoints" / "last")
    assert found is not None and load_checkpoint(found)[2]["global_step"] > 0


def test_unwritable_run_dir_fails_before_training(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = single("--data", str(data), "--out", str(blocker / "run"))
    assert result.returncode == 2 and len(errors(result)) == 1 and "cannot write there" in errors(result)[0]


# Security -------------------------------------------------------------------------------------------


def test_wandb_key_never_lands_in_the_run_folder(data, tmp_path):
    secret = "0123456789abcdef0123456789abcdef01234567"
    out = tmp_path / "run"
    env = run_env(WANDB_API_KEY=secret, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-steps",
            "3",
            "--width",
            "8",
            "--batch-size",
            "16",
            "--num-workers",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert secret not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_package_loads_pickles_only_through_safe_loaders():
    for path in (ROOT / "resnet_dist").glob("*.py"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path.name}: {line.strip()}"
            assert "yaml.load(" not in line and "extractall(" not in line, f"{path.name}: {line.strip()}"
