"""End to end: real `accelerate launch` runs with 2 CPU processes (gloo) on real shards."""

import re

import pytest
import torch
from helpers import ROOT, TRAIN, launch, ok, read_json, run_env, shard, train
from safetensors.torch import load_file
from wandb_log import config, history, run_file, summary

from resnet_dist.errors import run_cli
from resnet_dist.evaluate import main as evaluate_main
from resnet_dist.hardware import cpu_has_bf16

pytestmark = pytest.mark.slow
TINY = ["--width", "8", "--batch-size", "16", "--lr", "0.05", "--num-workers", "1", "--log-every", "5"]


@pytest.fixture(scope="module")
def two_epoch_run(uneven_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    result = ok(train("--data", str(uneven_shards), "--out", str(out), "--epochs", "2", *TINY))
    return out, result


def test_run_writes_every_output(two_epoch_run):
    out, _ = two_epoch_run
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["global_batch"] == 32
    assert summary["epochs_done"] == 2 and summary["steps_done"] == 2 * (544 // 32)
    # every eval sample counted once across ranks, the odd one out included (61 and 121 do not split in 2)
    assert summary["eval_counts"] == {"val": 61, "test": 121}
    assert summary["lost_eval_samples"] == {"val": 0, "test": 0}
    assert summary["best_val_top1"] > 0.4 and summary["test_top1"] > 0.4  # chance is 0.25: the signal is learnt
    hist = read_json(out / "history.json")
    assert [h["epoch"] for h in hist] == [1, 2] and [h["val_count"] for h in hist] == [61, 61]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "img_per_s", "data_wait", "epoch_seconds"):
        assert all(key in h for h in hist), key
    assert read_json(out / "config.json")["epochs"] == 2
    for name in ("loss", "accuracy", "lr"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    for ckpt in ("last", "best"):
        weights = load_file(out / "checkpoints" / ckpt / "model.safetensors")
        assert "fc.weight" in weights
        state = torch.load(out / "checkpoints" / ckpt / "state.pt", weights_only=True)
        assert {"optimizer", "scheduler", "epoch", "history"} <= set(state)


def test_only_the_main_process_prints(two_epoch_run):
    _, result = two_epoch_run
    lines = result.stdout.splitlines()
    assert sum(line.startswith("epoch 1:") for line in lines) == 1
    assert sum("parameters) on synthetic: 2 process(es)" in line for line in lines) == 1


def test_wandb_offline_run_holds_throughput_and_accuracy(two_epoch_run):
    out, _ = two_epoch_run
    rows = history(run_file(out))
    keys = set().union(*rows)
    for key in (
        "train/loss",
        "train/lr",
        "perf/img_per_s",
        "perf/img_per_s_per_process",
        "perf/data_wait_fraction",
        "val/top1",
        "val/top5",
        "val/loss",
    ):
        assert key in keys, key
    assert max(r["val/top1"] for r in rows if "val/top1" in r) == read_json(out / "summary.json")["best_val_top1"]
    assert summary(run_file(out))["test_top1"] == read_json(out / "summary.json")["test_top1"]
    cfg = config(run_file(out))
    assert cfg["global_batch"] == 32 and cfg["world_size"] == 2


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "ds"
    ok(
        shard(
            "synthetic",
            "--out",
            str(out),
            "--num-classes",
            "3",
            "--image-size",
            "8",
            "--num-samples",
            "203",
            "--shard-size",
            "10000",
            "--val-fraction",
            "0.1",
            "--seed",
            "2",
        )
    )
    return out


def test_one_shard_two_processes_two_workers(one_shard, tmp_path):
    """Fewer shards than processes x workers: equal batch counts, no sample twice, and no DDP hang."""
    ok(launch(ROOT / "tests" / "scripts" / "rank_batches.py", str(one_shard), str(tmp_path), "2", "8"))
    ranks = [read_json(tmp_path / f"rank-{r}.json") for r in (0, 1)]
    train_n = read_json(one_shard / "index.json")["splits"]["train"]["num_samples"]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["batches"] == ranks[1]["batches"] == train_n // 16
    seen = ranks[0]["images"] + ranks[1]["images"]
    assert len(seen) == len(set(seen)) == train_n // 16 * 16
    out = tmp_path / "run"
    ok(
        train(
            "--data", str(one_shard), "--out", str(out), "--epochs", "1", *TINY[:-4], "--num-workers", "2", timeout=300
        )
    )
    assert (
        read_json(out / "summary.json")["eval_counts"]["val"]
        == read_json(one_shard / "index.json")["splits"]["val"]["num_samples"]
    )


def test_grad_accum_equals_larger_batch(tmp_path):
    ok(launch(ROOT / "tests" / "scripts" / "accum_check.py", str(tmp_path / "r.json")))
    r = read_json(tmp_path / "r.json")
    assert r["world_size"] == 2
    assert r["moved"] > 1e-3  # the weights did train
    assert r["max_diff"] < 1e-6
    assert r["sched_steps_accum"] == r["sched_steps_big"] == 2  # once per optimizer step, not per micro-batch


def logged_steps(stdout: str) -> list[int]:
    """Optimizer steps of the `epoch E step S:` lines a run printed (every step with --log-every 1)."""
    return [int(m) for m in re.findall(r"^epoch \d+ step (\d+):", stdout, re.MULTILINE)]


def test_resume_mid_epoch_continues_and_matches_uninterrupted(synthetic_shards, tmp_path):
    # 2 workers and a 48-sample shuffle block: at the cut each worker has read 80 of its 128 samples, so
    # the resume starts inside its second block (the block arithmetic of a resumed worker is exercised).
    # --ema on: the average resumes exactly too (issue 13); its files and numbers are checked on the way.
    args = ["--data", str(synthetic_shards), "--epochs", "2", "--grad-accum", "2", *TINY[:-4]]
    args += ["--num-workers", "2", "--shuffle-block", "48", "--log-every", "1", "--ema", "0.9"]
    total = 2 * (540 // 64)
    full = ok(train(*args, "--out", str(tmp_path / "full")))
    assert logged_steps(full.stdout) == list(range(1, total + 1))
    check_ema_outputs(tmp_path / "full", full.stdout, total, synthetic_shards)
    ok(train(*args, "--out", str(tmp_path / "cut"), "--max-steps", "5"))  # stops mid-epoch 1
    assert read_json(tmp_path / "cut" / "summary.json")["steps_done"] == 5
    other = train(*args, "--seed", "7", "--out", str(tmp_path / "cut"))  # other settings: never mixed in
    assert other.returncode != 0
    assert other.stderr.splitlines()[0] == (
        f"error: {tmp_path / 'cut'} holds a run with other settings (seed): "
        "choose another --out for a new run, or repeat its settings to resume it"
    )
    resumed = ok(train(*args, "--out", str(tmp_path / "cut")))  # the same command again resumes by itself
    # it really resumed: from the saved step, running only the remaining ones (a fresh start that happened
    # to reproduce the uninterrupted run would log steps 1-5 again and say nothing of a checkpoint)
    checkpoint = tmp_path / "cut" / "checkpoints" / "last"
    assert f"resumed from {checkpoint}: epoch 1, micro-batch 10, optimizer step 5" in resumed.stdout
    assert logged_steps(resumed.stdout) == list(range(6, total + 1))
    full, cut = read_json(tmp_path / "full" / "summary.json"), read_json(tmp_path / "cut" / "summary.json")
    assert cut["steps_done"] == full["steps_done"] == total
    assert [h["epoch"] for h in read_json(tmp_path / "cut" / "history.json")] == [1, 2]
    a = load_file(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors")
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-6
    a = load_file(tmp_path / "full" / "checkpoints" / "last" / "ema.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "last" / "ema.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # the average: bitwise
    assert read_json(tmp_path / "cut" / "checkpoints" / "last" / "meta.json")["ema"] == {"decay": 0.9, "updates": total}


def check_ema_outputs(out, stdout: str, steps: int, data) -> None:
    """A finished --ema run: the average beside the weights in every checkpoint, evaluated each epoch,
    choosing `best` (--best-by's default with --ema), and the test numbers of both, the EMA's first."""
    for name in ("last", "best"):
        raw = load_file(out / "checkpoints" / name / "model.safetensors")
        ema = load_file(out / "checkpoints" / name / "ema.safetensors")
        assert ema.keys() == raw.keys() and "layer1.0.bn1.running_var" in ema  # BatchNorm buffers included
        assert not torch.equal(ema["fc.weight"], raw["fc.weight"])
        assert not torch.equal(ema["bn1.running_mean"], raw["bn1.running_mean"])  # buffers averaged
        assert torch.equal(ema["bn1.num_batches_tracked"], raw["bn1.num_batches_tracked"])  # a count: copied
    meta = read_json(out / "checkpoints" / "last" / "meta.json")
    assert meta["ema"] == {"decay": 0.9, "updates": steps}  # one per optimizer step, none per micro-batch
    hist, s = read_json(out / "history.json"), read_json(out / "summary.json")
    best = max(hist, key=lambda h: h["val_ema_top1"])  # the first of equals: `best` is replaced on a rise only
    assert read_json(out / "checkpoints" / "best" / "meta.json")["epoch"] == best["epoch"]
    assert s["best_by"] == "ema" and s["best_val_top1"] == best["val_ema_top1"]
    assert s["final_val_top1"] == hist[-1]["val_top1"] and s["final_val_top1_ema"] == hist[-1]["val_ema_top1"]
    assert s["test_weights"] == "ema" and s["test_top1"] == s["test_top1_ema"] and 0 <= s["test_top1_raw"] <= 1
    line = f"test top-1 {s['test_top1']:.2%} (EMA weights) on 120 images; raw weights {s['test_top1_raw']:.2%}"
    assert line in stdout
    assert re.search(r"^epoch 1: .* val loss .* EMA loss [0-9.]+ top-1 [0-9.]+%", stdout, re.MULTILINE)
    rows = history(run_file(out))
    assert [r["val_ema/top1"] for r in rows if "val_ema/top1" in r] == [h["val_ema_top1"] for h in hist]
    assert summary(run_file(out))["test_top1_raw"] == s["test_top1_raw"]
    assert summary(run_file(out))["val_ema/top1"]["max"] == max(h["val_ema_top1"] for h in hist)
    # `evaluate` (helper ship's loader) reads the files this run wrote: the same test top-1 for each set of
    # weights, to one sample of 120 (this run evaluated in bf16 on 2 processes, evaluate runs 1 process)
    for weights, key in (("auto", "test_top1_ema"), ("raw", "test_top1_raw")):
        evaluated = out / f"eval-{weights}"
        argv = ["--checkpoint", str(out / "checkpoints" / "last"), "--split", "test", "--weights", weights]
        argv += ["--data", str(data)]
        with pytest.raises(SystemExit) as done:
            run_cli(evaluate_main, [*argv, "--out", str(evaluated)])
        assert done.value.code == 0
        result = read_json(evaluated / "eval.json")
        assert result["weights"] == ("ema" if weights == "auto" else "raw")
        assert abs(result["top1"] - s[key]) <= 1 / 120 + 1e-9, (weights, result["top1"], s[key])


def test_resume_with_mixup_cutmix_and_trivialaugment_is_bitwise_the_uninterrupted_run(synthetic_shards, tmp_path):
    # The method of the test above, with every issue-13 random draw on: per-sample TrivialAugment in 2
    # workers, mixup/cutmix from the step's generator. Weights must be bitwise equal, not merely close.
    args = ["--data", str(synthetic_shards), "--epochs", "1", "--grad-accum", "2", *TINY[:-4]]
    args += ["--num-workers", "2", "--shuffle-block", "48", "--log-every", "1", "--wandb-mode", "disabled"]
    args += ["--mixup", "0.2", "--cutmix", "1.0", "--augment", "trivialaugment", "--label-smoothing", "0.1"]
    args += ["--ema", "0.99"]  # and the weight EMA (issue 13: "an exact-resume test with EMA and mixup on")
    total = 540 // 64
    full = ok(train(*args, "--out", str(tmp_path / "full")))
    assert "top-1 vs major label" in full.stdout  # train top-1 says what it counts
    ok(train(*args, "--out", str(tmp_path / "cut"), "--max-steps", "3"))  # stops mid-epoch
    assert read_json(tmp_path / "cut" / "summary.json")["steps_done"] == 3
    resumed = ok(train(*args, "--out", str(tmp_path / "cut")))
    assert "optimizer step 3" in resumed.stdout and logged_steps(resumed.stdout) == list(range(4, total + 1))
    a = load_file(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(tmp_path / "full" / "checkpoints" / "last" / "ema.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "last" / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sync_bn_and_bf16_run(synthetic_shards, tmp_path):
    out = tmp_path / "r"
    ok(
        train(
            "--data",
            str(synthetic_shards),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--sync-bn",
            *TINY,
            mixed_precision="bf16",
        )
    )
    summary = read_json(out / "summary.json")
    assert summary["mixed_precision"] == "bf16" and summary["world_size"] == 2
    # the flag really converts the layers: the run's own setup, 2 processes, every BatchNorm synchronized
    flags = ["--data", str(synthetic_shards), "--out", str(tmp_path / "layers"), "--sync-bn", *TINY]
    ok(launch(ROOT / "tests" / "scripts" / "sync_bn_layers.py", str(tmp_path), *flags, "--wandb-mode", "disabled"))
    built = read_json(tmp_path / "sync_bn_layers.json")
    assert built["world_size"] == 2
    assert built["layers"] == {"CPUSyncBatchNorm": 1 + 4 * 2 * 2 + 3}  # resnet18: stem, 2 per block, 3 downsamples
    assert built["moved"] > 0 and built["rank_spread"] < 1e-6  # different images, the same global statistics


def test_fp16_on_cpu_is_refused_in_one_line(synthetic_shards, tmp_path):
    result = train("--data", str(synthetic_shards), "--out", str(tmp_path / "r"), *TINY, mixed_precision="fp16")
    assert result.returncode != 0
    # The launcher reports the failed ranks after our line: ours comes first, with no traceback of ours.
    first = result.stderr.splitlines()[0]
    assert first == "error: fp16 mixed precision has no autocast on CPU; use --mixed_precision bf16 or no", first
    assert "resnet_dist/" not in result.stderr and 'train.py", line' not in result.stderr, result.stderr


def test_precision_default_follows_the_hardware_and_can_be_turned_off(synthetic_shards, tmp_path):
    args = ["--data", str(synthetic_shards), "--epochs", "1", "--max-steps", "2", *TINY, "--wandb-mode", "disabled"]
    ok(train(*args, "--out", str(tmp_path / "auto")))
    ok(train(*args, "--out", str(tmp_path / "off"), "--cpu-bf16", "off"))
    assert read_json(tmp_path / "auto" / "summary.json")["mixed_precision"] == ("bf16" if cpu_has_bf16() else "no")
    assert read_json(tmp_path / "off" / "summary.json")["mixed_precision"] == "no"
    summary = read_json(tmp_path / "off" / "summary.json")
    assert 0 <= summary["data_wait"] <= 1 and summary["diagnosis"].startswith("diagnosis: ")


def test_compile_trains_and_saves_plain_weights(synthetic_shards, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "r"
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--data",
            str(synthetic_shards),
            "--out",
            str(out),
            "--compile",
            "--max-steps",
            "2",
            "--width",
            "4",
            "--batch-size",
            "16",
            "--num-workers",
            "0",
            "--wandb-mode",
            "disabled",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=run_env(),
        timeout=600,
    )
    ok(result)
    keys = load_file(out / "checkpoints" / "last" / "model.safetensors").keys()
    assert "fc.weight" in keys and not any("_orig_mod" in k for k in keys)  # loadable without compile
