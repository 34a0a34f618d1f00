"""The fault suite: each fault is injected for real into real runs (signals, kills, damaged bytes,
a full disk, a frozen rank, diverging losses) and the run must end as the README's table says."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import ROOT, SCRIPTS, TRAIN, launch, launch_cmd, ok, read_json, run_env, synthetic, train
from safetensors.torch import load_file

from resnet_dist.checkpoint import find_checkpoint, load_checkpoint
from resnet_dist.guard import SECOND_CTRL_C_AFTER

pytestmark = pytest.mark.slow
TINY = ["--width", "8", "--batch-size", "16", "--lr", "0.05", "--num-workers", "1", "--wandb-mode", "disabled"]


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Enough steps per epoch (2000 samples) that a signal lands mid-run."""
    out = tmp_path_factory.mktemp("faults") / "ds"
    return synthetic(out, num_classes=4, image_size=12, num_samples=2000, shard_size=300, val_fraction=0.1, seed=3)


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


def stopped_line(sig: signal.Signals, run: Path, meta: dict) -> str:
    """The README's promise: `stopped by SIGTERM at epoch E, optimizer step S: saved ...`."""
    return (
        f"stopped by {sig.name} at epoch {meta['epoch'] + 1}, optimizer step {meta['global_step']}: saved "
        f"{run / 'checkpoints' / 'last'}; run the same command again to resume"
    )


def root_cause_exit_code(stderr: str) -> int:
    """The exit code of the first rank torchrun saw fail, from its failure report."""
    report = stderr[stderr.index("Root Cause (first observed failure):") :]
    return int(re.search(r"exitcode\s*:\s*(-?\d+)", report).group(1))


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
    # The launcher's own code is torchrun's: 1 for a signal it received itself (it passes the signal on to
    # every rank and waits for them) and 1 for a rank that failed; the ranks' own codes are checked by
    # test_a_stopped_process_exits_with_128_plus_the_signal, where the process observed is the rank.
    assert code == 1
    if target == "rank1":  # rank 1 told rank 0, and the first rank torchrun saw end left with 128 + signal
        assert root_cause_exit_code(stderr) == 128 + sig
    # torchrun prints its own report (with its traceback) after a signal; none of ours may appear
    assert "resnet_dist/" not in stderr and 'train.py", line' not in stderr
    ckpt = find_checkpoint(out / "checkpoints" / "last")
    assert ckpt is not None
    _, state, meta = load_checkpoint(ckpt)
    assert 10 <= meta["global_step"] < 2 * (1800 // 32)
    assert stderr.splitlines().count(stopped_line(sig, out, meta)) == 1  # rank 0 alone says it
    resumed = ok(train(*args, "--log-every", "1"))
    assert f"resumed from {ckpt}" in resumed.stdout
    summary = read_json(out / "summary.json")
    assert summary["steps_done"] == 2 * (1800 // 32) and summary["epochs_done"] == 2


def start_single(*args: str) -> subprocess.Popen:
    """launch/train.py as one plain process (the rank itself, no launcher), in its own session."""
    return subprocess.Popen(
        [sys.executable, str(TRAIN), *args, "--log-every", "1"],
        cwd=ROOT,
        env=run_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_process_exits_with_128_plus_the_signal(data, tmp_path, sig):
    out = tmp_path / "run"
    proc = start_single("--data", str(data), "--out", str(out), "--epochs", "2", *TINY)
    wait_for_line(proc, "step 10:")
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the loader workers get it too, and ignore it
    else:
        os.kill(proc.pid, sig)  # a scheduler's SIGTERM to the process
    code, _, stderr = finish(proc)
    assert code == 128 + sig, stderr[-2000:]
    _, _, meta = load_checkpoint(find_checkpoint(out / "checkpoints" / "last"))
    assert meta["global_step"] >= 10
    assert stderr.splitlines() == [stopped_line(sig, out, meta)]


def test_a_second_ctrl_c_stops_at_once(data, tmp_path):
    """The first Ctrl-C asks for a checkpoint at the next optimizer step; a second one does not wait for it.

    The loader worker is frozen after step 1, so the next step (16 micro-batches on, more than the worker
    prefetched) can never come: only the second Ctrl-C can end this run, and without a checkpoint."""
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), "--epochs", "1", "--grad-accum", "16", *TINY]
    proc = start_single(*args)
    wait_for_line(proc, "step 1:")
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers  # --num-workers 1
    try:
        for worker in workers:
            worker.suspend()
        os.killpg(proc.pid, signal.SIGINT)  # the first Ctrl-C: noted, waiting for the next step
        time.sleep(2 * SECOND_CTRL_C_AFTER)  # a repeat sooner is the same Ctrl-C delivered twice
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            # the second Ctrl-C (sent again only if the two reached the process as one pending signal)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        stopped = proc.poll() is not None
    finally:
        for worker in workers:  # frozen, they hold the output pipes open: end them before reading
            if worker.is_running():
                worker.resume()
                worker.kill()
    code, _, stderr = finish(proc)
    assert stopped, "still running 2 minutes after the second Ctrl-C"
    assert code == 130 and stderr.splitlines() == ["interrupted"], stderr[-2000:]
    assert find_checkpoint(out / "checkpoints" / "last") is None  # it did not wait to save


# 2. Exact mid-epoch resume ----------------------------------------------------------------------------


def test_single_process_resume_is_bitwise_equal(data, tmp_path):
    # 2 loader workers and a 200-sample shuffle block: at step 40 each worker has read 320 samples, so the
    # resumed workers start 120 samples into their second block
    args = ["--data", str(data), "--epochs", "2", "--checkpoint-every", "7", "--cpu-bf16", "off", *TINY]  # fp32
    args += ["--num-workers", "2", "--shuffle-block", "200", "--log-every", "1"]
    single = dict(processes=1)
    total = 2 * (1800 // 16)
    ok(train(*args, "--out", str(tmp_path / "full"), **single))
    ok(train(*args, "--out", str(tmp_path / "cut"), "--max-steps", "40", **single))  # mid-epoch 1 (112 steps/epoch)
    assert read_json(tmp_path / "cut" / "summary.json")["steps_done"] == 40
    resumed = ok(train(*args, "--out", str(tmp_path / "cut"), **single))
    # it resumed at step 40 and ran only steps 41..224, not a fresh run that happens to end the same way
    checkpoint = tmp_path / "cut" / "checkpoints" / "last"
    assert f"resumed from {checkpoint}: epoch 1, micro-batch 40, optimizer step 40" in resumed.stdout
    steps = [int(s) for s in re.findall(r"^epoch \d+ step (\d+):", resumed.stdout, re.MULTILINE)]
    assert steps == list(range(41, total + 1))
    assert read_json(tmp_path / "cut" / "summary.json")["steps_done"] == total
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# 3. SIGKILL, also while a checkpoint is being written ----------------------------------------------


KILL_SCRIPT = ROOT / "tests" / "scripts" / "kill_during_save.py"


def save_steps() -> int:
    """The fsync and rename steps of one save over an existing checkpoint: every point a kill can land on."""
    spec = importlib.util.spec_from_file_location("kill_during_save", KILL_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoints" / "last"
        script.save(folder, 1)
        with script.file_system_steps() as calls:
            script.save(folder, 2)
    return calls[0]


SAVE_STEPS = save_steps()


def kill_during_save(run_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(KILL_SCRIPT), str(run_dir), str(kill_at)],
        capture_output=True,
        text=True,
        env=run_env(),
        timeout=120,
    )


@pytest.mark.parametrize("kill_at", range(1, SAVE_STEPS + 1))
def test_kill_during_checkpoint_write_leaves_a_complete_checkpoint(tmp_path, kill_at):
    result = kill_during_save(tmp_path, kill_at)
    assert result.returncode == -signal.SIGKILL, result.stderr  # the kill did land, at step kill_at
    found = find_checkpoint(tmp_path / "checkpoints" / "last")
    assert found is not None
    weights, state, meta = load_checkpoint(found)
    assert meta["version"] in (1, 2) and float(weights["w"][0]) == meta["version"]
    assert state["step"] == meta["version"]


def test_an_uninterrupted_save_makes_the_counted_steps_and_leaves_only_the_new_checkpoint(tmp_path):
    result = kill_during_save(tmp_path, 0)
    assert result.returncode == 0, result.stderr
    assert SAVE_STEPS >= 5 and result.stdout == f"{SAVE_STEPS} file-system steps\n"  # 3 files, folder, renames
    assert find_checkpoint(tmp_path / "checkpoints" / "last") == tmp_path / "checkpoints" / "last"
    assert load_checkpoint(tmp_path / "checkpoints" / "last")[2]["version"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last"]  # no .old, no temporary


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
    # The one bad image, once per epoch it is read: whether caught by its digest (the shard changed after
    # packing: its per-sample table names it) or by its decoder (the shard was written damaged).
    assert 1 <= summary["lost_train_samples"] <= 2
    if mend_index:
        assert "does not decode" in warnings[0]
    else:
        assert f"{name}: sample train_" in warnings[0] and "changed since it was packed" in warnings[0]
    assert summary["steps_done"] == 2 * (1800 // 32)  # every rank kept the same batch count
    assert summary["data_problems"] and name in summary["data_problems"][0]


def test_strict_data_fails_naming_the_shard(data, tmp_path):
    copy, name = damaged_copy(data, tmp_path, mend_index=False)
    result = train("--data", str(copy), "--out", str(tmp_path / "run"), "--epochs", "1", "--strict-data", *TINY)
    assert result.returncode != 0
    named = [line for line in errors(result) if f"{name}: sample train_" in line and "sha256 differs" in line]
    assert named, result.stderr[-2000:]


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
    # Only the sample whose bytes hold that block (its per-sample table says which), an early one of the
    # shard: read this epoch, where only the stream's last 8 positions (a shard's last samples) are not.
    assert read_json(out / "summary.json")["lost_train_samples"] == 1


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
    assert r["bad_steps"] == 1, r
    assert r["unchanged_by_bad_step"], r  # rank 0 skipped the step too, though only rank 1 saw the NaN
    assert r["trained_after"], r  # and training went on
    assert r["finite"], r  # no NaN reached the weights or the optimizer state at any step
    assert r["ranks_agree"], r


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
