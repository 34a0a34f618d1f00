"""The W&B dashboard, read back from the offline run files of one real 2-process run that is preempted
(SIGTERM) and resumed: system metrics, epoch axes, per-rank throughput, end-of-run tables, artifacts,
provenance in the config, and no step logged twice across the two offline run folders."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT, TRAIN, launch_cmd, ok, read_json, run_env, train
from wandb_log import config, history, records, summary

from resnet_dist.dashboard import StepLog, git_state, log_dataset
from resnet_dist.data import Piece, ShardStream, make_loader, read_piece, sample_parts
from resnet_dist.engine import batch_start
from resnet_dist.index import load_index
from resnet_dist.tracking import wandb_init_kwargs

# A low lr and few steps leave some test images wrong, so the "most confidently wrong" table has rows.
ARGS = ["--width", "8", "--batch-size", "16", "--lr", "0.002", "--num-workers", "1", "--log-every", "1"]
ARGS += ["--epochs", "3", "--wandb-mode", "offline"]


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"run ended before {needle!r}: {proc.stderr.read()[-2000:]}")
    raise AssertionError(f"no {needle!r} within {timeout} s")


@pytest.fixture(scope="module")
def resumed_run(uneven_shards, tmp_path_factory):
    """Part 1 (system metrics on, the default) stopped by SIGTERM in epoch 2; part 2 resumed with them off.

    Steps per epoch: 544 train samples // (16 x 2 processes) = 17."""
    out = tmp_path_factory.mktemp("dash") / "r"
    args = ["--data", str(uneven_shards), "--out", str(out), *ARGS]
    env = run_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*launch_cmd(2), str(TRAIN), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    # Mid-epoch 2, with its loader running: the stop comes at the next step, well within torchrun's 30 s
    # grace period (at an epoch boundary, starting the next epoch's loader workers can take longer here).
    wait_for_line(proc, "epoch 2 step 20:")
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=180)
    stopped_at = read_json(out / "checkpoints" / "last" / "meta.json")["global_step"]
    assert 20 <= stopped_at < 3 * 17  # stopped mid-run: the resumed part has steps to log
    ok(train(*args, "--no-wandb-system-stats"))
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and files[0].name == files[1].name  # one W&B run (same id), two offline folders
    return out, files, stopped_at


def kinds(path: Path) -> list[str]:
    return [r.WhichOneof("record_type") for r in records(path)]


@pytest.mark.slow
def test_system_metrics_on_by_default_and_off_by_flag(resumed_run):
    _, (first, second), _ = resumed_run
    stats = [r.stats for r in records(first) if r.WhichOneof("record_type") == "stats"]
    assert stats, "no system metrics with the default settings"
    keys = {item.key for s in stats for item in s.item}
    # W&B's first sample (a short run may get no other) has memory and process metrics; CPU % needs two
    assert {"memory_percent", "proc.memory.rssMB", "proc.cpu.threads"} <= keys, keys
    assert "stats" not in kinds(second)  # resumed with --no-wandb-system-stats


@pytest.mark.slow
def test_steps_strictly_increase_across_the_preempted_and_resumed_parts(resumed_run):
    _, files, stopped_at = resumed_run
    steps = [r.history.step.num for f in files for r in records(f) if r.WhichOneof("record_type") == "history"]
    assert steps == sorted(set(steps)), "a step was logged twice or went back"
    first = [r.history.step.num for r in records(files[0]) if r.WhichOneof("record_type") == "history"]
    assert max(first) == stopped_at  # part 1 logged up to its checkpoint; part 2 starts after it


@pytest.mark.slow
def test_epoch_axis_and_summary(resumed_run):
    out, (_, second), _ = resumed_run
    metrics = {(r.metric.name or r.metric.glob_name): r.metric for r in records(second) if r.metric.ListFields()}
    assert metrics["val/*"].step_metric == "epoch" and metrics["perf/epoch_*"].step_metric == "epoch"
    assert metrics["data/cache_*"].step_metric == "epoch"
    assert any("data/cache_hits" in r and "epoch" in r for r in history(second))
    assert metrics["val/top1"].summary.max
    rows = history(second)
    final = read_json(out / "summary.json")
    s = summary(second)
    assert s["val/top1"]["max"] == max(r["val/top1"] for r in rows if "val/top1" in r)
    assert s["test_top1"] == final["test_top1"] and s["test_top5"] == final["test_top5"]
    assert s["best_val_top1"] == final["best_val_top1"]


@pytest.mark.slow
def test_throughput_per_rank_and_slowest(resumed_run):
    out, (_, second), _ = resumed_run
    rows = [r for r in history(second) if "rank/0/img_per_s" in r]
    assert rows
    for row in rows:
        rates = [row["rank/0/img_per_s"], row["rank/1/img_per_s"]]
        assert row["perf/min_img_per_s_per_process"] == min(rates)
        assert rates[row["perf/slowest_rank"]] == min(rates)
        assert 0 <= row["rank/1/data_wait"] <= 1 and "rank/2/img_per_s" not in row
    epochs = [r for r in history(second) if "perf/epoch_slowest_rank" in r]
    assert epochs and all(r["perf/epoch_slowest_rank"] in (0, 1) for r in epochs)
    for row in read_json(out / "history.json"):  # the same per epoch, kept with the run folder
        assert len(row["rank_img_per_s"]) == len(row["rank_data_wait"]) == 2
        assert row["rank_img_per_s"][row["slowest_rank"]] == min(row["rank_img_per_s"])


def staged(run_file: Path, key: str) -> dict[str, Path]:
    """The files of the `run_table` artifact W&B makes for the table logged under `key`, as staged for sync."""
    (row,) = [r for r in history(run_file) if f"{key}/_type" in r]
    assert row[f"{key}/_type"] == "table-file"
    for r in records(run_file):
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "run_table":
            files = {c.path: Path(c.local_path) for c in r.artifact.manifest.contents}
            if f"{key}.table.json" in files:
                return files
    raise AssertionError(f"no run_table artifact holds {key}")


def table(run_file: Path, key: str) -> dict:
    """A logged table as W&B will upload it (the copy under files/media has its images as bare names)."""
    return json.loads(staged(run_file, key)[f"{key}.table.json"].read_text())


@pytest.mark.slow
def test_end_of_run_tables(resumed_run, uneven_shards):
    out, (_, second), _ = resumed_run
    index = load_index(uneven_shards)
    final = read_json(out / "summary.json")
    cm = table(second, "test/confusion_matrix_table")
    assert sum(row[2] for row in cm["data"]) == 121  # every test image, counted once
    per_class = table(second, "test/per_class")
    assert per_class["columns"] == ["class", "precision", "recall", "f1", "support"]
    assert [r[0] for r in per_class["data"]] == index.classes and sum(r[4] for r in per_class["data"]) == 121
    wrong = table(second, "test/most_confidently_wrong")
    assert wrong["columns"] == ["image", "true", "predicted", "confidence", "key", "shard", "origin"]
    assert len(wrong["data"]) == min(16, round((1 - final["test_top1"]) * 121)) > 0
    confidences = [r[3] for r in wrong["data"]]
    assert confidences == sorted(confidences, reverse=True)
    tables, files = {}, staged(second, "test/most_confidently_wrong")
    shards = {s.file: s for s in index.splits["test"].shards}
    for image, true, pred, _, key, shard, origin in wrong["data"]:
        assert true != pred and image["_type"] == "image-file" and image["width"] == image["height"] == 16
        assert files[image["path"]].read_bytes()[:4] == b"\x89PNG"
        if shard not in tables:
            name = next(s.samples for s in index.splits["test"].shards if s.file == shard)
            tables[shard] = read_json(uneven_shards / name)
        # the key and origin of the image the model got wrong, from the shard's per-sample table
        k = tables[shard]["keys"].index(key)
        assert origin == tables[shard]["origins"][k] and origin.startswith("synthetic-test")
        # and it is the image that was evaluated: its label in the shard is the table's true class
        sample = read_piece(str(uneven_shards), Piece(shards[shard], k, 1), strict=True)[0]
        assert sample["__key__"] == key and index.classes[sample_parts(sample)[1]] == true


@pytest.mark.slow
def test_artifacts_are_kept_for_sync(resumed_run, uneven_shards):
    _, (first, second), _ = resumed_run
    # the stopped attempt logged its data but no model: checkpoints are logged once, at the end of the run
    assert [r.artifact.type for r in records(first) if r.WhichOneof("record_type") == "artifact"] == ["dataset"]
    arts = [r.artifact for r in records(second) if r.WhichOneof("record_type") == "artifact"]
    models = [a for a in arts if a.type == "model"]
    assert {"best", "latest"} <= {alias for a in models for alias in a.aliases}
    assert all({"model.safetensors", "meta.json", "state.pt"} <= {c.path for c in a.manifest.contents} for a in models)
    (data,) = [a for a in arts if a.type == "dataset"]
    (entry,) = data.manifest.contents
    assert entry.path == "index.json"
    # offline, W&B stages a copy of each file until `wandb sync`: inside the run folder, not the home
    for a in models + [data]:
        for c in a.manifest.contents:
            staged = Path(c.local_path)
            assert staged.is_relative_to(second.parents[2]) and staged.is_file()
    assert Path(entry.local_path).read_bytes() == (uneven_shards / "index.json").read_bytes()


@pytest.mark.slow
def test_config_says_which_code_and_machines(resumed_run):
    _, (_, second), _ = resumed_run
    cfg = config(second)
    assert cfg["world_size"] == 2 and cfg["devices"] == [f"cpu ({os.cpu_count()} cores)"] * 2
    assert set(cfg["versions"]) == {"torch", "torchvision", "accelerate", "wandb", "resnet-dist"}
    assert cfg["versions"]["torch"] and cfg["versions"]["wandb"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert cfg["git_commit"] == commit and isinstance(cfg["git_dirty"], bool)
    assert cfg["lr"] == 0.002 and cfg["epochs"] == 3 and cfg["wandb_system_stats"] is False


def labels_in_file_order(shards: Path, split: str) -> list[int]:
    index = load_index(shards)
    out = []
    for shard in index.splits[split].shards:
        for sample in read_piece(str(shards), Piece(shard, 0, shard.num_samples), strict=True):
            out.append(sample_parts(sample)[1])
    return out


@pytest.mark.parametrize("rank,workers", [(0, 2), (1, 2), (1, 0), (0, 3)])
def test_eval_batch_positions_match_the_split_order(uneven_shards, rank, workers):
    """batch_start says where each eval batch starts in the split: the labels there are the batch's labels."""
    index = load_index(uneven_shards)
    stream = ShardStream(str(uneven_shards), index, "test", batch_size=8, rank=rank, world_size=2, train=False)
    truth = labels_in_file_order(uneven_shards, "test")
    seen = 0
    for i, (_, labels, lost, _, _) in enumerate(make_loader(stream, workers, pin_memory=False)):
        start = batch_start(stream, workers, i)
        assert lost == 0 and labels.tolist() == truth[start : start + len(labels)]
        seen += len(labels)
    assert seen == stream.rank_stop - stream.rank_start


@pytest.mark.parametrize("scheme", ["https://example.com", "s3://bucket"])
def test_remote_shards_are_a_dataset_reference(tmp_path, scheme):
    """Shards behind a URL: index.json is logged as a reference (nothing uploaded) with its sha256."""
    import wandb

    run = wandb.init(project="p", dir=str(tmp_path), mode="offline", settings=wandb.Settings(x_disable_stats=True))
    log_dataset(run, f"{scheme}/data/imagenet-shards/", b'{"format_version": 3}')
    run.finish()
    wandb.teardown()  # finish() may return before W&B's service has written the file: wait for it
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    (art,) = [r.artifact for r in records(path) if r.WhichOneof("record_type") == "artifact"]
    assert art.type == "dataset" and art.name == "shards-imagenet-shards"
    (entry,) = art.manifest.contents
    assert entry.path == "index.json" and entry.ref == f"{scheme}/data/imagenet-shards/index.json"
    assert json.loads(art.metadata)["index_sha256"] == hashlib.sha256(b'{"format_version": 3}').hexdigest()


def attempt(run_dir: Path, steps: range) -> None:
    """One attempt of a run: a real Accelerator logging to an offline W&B run (the same id each time)."""
    import wandb
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, log_with="wandb")
    acc.init_trackers("p", init_kwargs=wandb_init_kwargs(run_dir, "offline", "sameid", "r", system_stats=False))
    log = StepLog(run_dir, enabled=True)
    for step in steps:
        log.log(acc, {"train/loss": 1.0 / step}, step)
    acc.end_training()
    wandb.teardown()  # finish() may return before W&B's service has written the file: wait for it


def test_steps_redone_after_a_crash_are_not_logged_twice(tmp_path):
    """Attempt 1 logged steps 1-10 and crashed; its last checkpoint was step 6, so attempt 2 redoes 7-10."""
    attempt(tmp_path, range(1, 11))
    time.sleep(1.1)  # offline run folders are named by the second they start in
    attempt(tmp_path, range(7, 16))
    files = sorted(tmp_path.glob("wandb/offline-run-*/run-sameid.wandb"))
    assert len(files) == 2
    steps = [[r.history.step.num for r in records(f) if r.WhichOneof("record_type") == "history"] for f in files]
    assert steps == [list(range(1, 11)), list(range(11, 16))]


def test_git_state_is_null_outside_a_checkout(tmp_path):
    """Code installed under a venv inside another repository must not report that repository's commit."""
    inner = tmp_path / "venv" / "site-packages"
    inner.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert git_state(inner) == {"git_commit": None, "git_dirty": None}
