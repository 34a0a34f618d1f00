"""python -m resnet_dist.evaluate on a real trained run: 1 process and a real 2-process launch agree."""

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, TRAIN, launch_cmd, ok, read_json, run_env, shard, synthetic

from resnet_dist.augment import BatchAugment
from resnet_dist.data import ShardStream, make_loader
from resnet_dist.errors import run_cli
from resnet_dist.evaluate import load_model, main, read_meta
from resnet_dist.storage import read_index

pytestmark = pytest.mark.slow
TINY = [
    "--width",
    "8",
    "--batch-size",
    "32",
    "--lr",
    "0.05",
    "--epochs",
    "2",
    "--num-workers",
    "0",
    "--wandb-mode",
    "disabled",
    "--log-every",
    "5",
]


def run(*args, launch=False, timeout=300):
    """The evaluate command as a user types it; with launch=True under a 2-process `accelerate launch`."""
    cmd = [sys.executable, "-m", "resnet_dist.evaluate", *args]
    if launch:
        cmd = [*launch_cmd(2), "-m", "resnet_dist.evaluate", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=run_env(OMP_NUM_THREADS="1")
    )


@pytest.fixture(scope="module")
def trained(uneven_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    ok(
        subprocess.run(
            [sys.executable, str(TRAIN), "--data", str(uneven_shards), "--out", str(out), *TINY],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env=run_env(OMP_NUM_THREADS="1"),
        )
    )
    return out


@pytest.fixture(scope="module")
def single(trained, uneven_shards):
    result = ok(run("--checkpoint", str(trained), "--data", str(uneven_shards), "--num-workers", "0"))
    return result, read_json(trained / "eval-test" / "eval.json")


def test_eval_json_and_png(single, trained, uneven_shards):
    result, ev = single
    n_test = read_json(uneven_shards / "index.json")["splits"]["test"]["num_samples"]
    assert ev["count"] == ev["expected_count"] == n_test and ev["lost"] == 0
    assert ev["checkpoint"].endswith("checkpoints/best") and ev["world_size"] == 1
    assert ev["top1"] > 0.4 and ev["top1"] <= ev["top5"] <= 1.0 and ev["loss"] > 0
    assert np.asarray(ev["confusion"]).sum() == n_test
    assert [r["class"] for r in ev["per_class"]] == ev["classes"]
    assert sum(r["support"] for r in ev["per_class"]) == n_test
    assert set(ev["macro"]) == {"precision", "recall", "f1"}
    # the trainer's own test evaluation of the same best checkpoint gives the same top-1
    assert ev["top1"] == pytest.approx(read_json(trained / "summary.json")["test_top1"], abs=1e-9)
    assert (trained / "eval-test" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "macro average" in result.stdout and "top-1" in result.stdout


def test_per_class_metrics_match_numpy(single, trained, uneven_shards):
    """Precision/recall/F1 from predictions made here, in-process, with plain numpy."""
    _, ev = single
    ckpt = trained / "checkpoints" / "best"
    index = read_index(str(uneven_shards))
    meta = read_meta(ckpt)
    model = load_model(ckpt, meta, index, str(uneven_shards)).eval()
    augment = BatchAugment(meta["mean"], meta["std"], torch.device("cpu"))
    stream = ShardStream(str(uneven_shards), index, "test", batch_size=50, rank=0, world_size=1, train=False)
    preds, labels = [], []
    with torch.no_grad():
        for images, y, *_ in make_loader(stream, 0, pin_memory=False):
            preds.append(model(augment.eval(images)).argmax(1).numpy())
            labels.append(y.numpy())
    pred, true = np.concatenate(preds), np.concatenate(labels)
    assert (pred == true).mean() == pytest.approx(ev["top1"])
    for k, row in enumerate(ev["per_class"]):
        tp = np.sum((pred == k) & (true == k))
        precision = tp / max(np.sum(pred == k), 1)
        recall = tp / np.sum(true == k)
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        assert row["precision"] == pytest.approx(precision) and row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(f1)
    assert ev["macro"]["f1"] == pytest.approx(np.mean([r["f1"] for r in ev["per_class"]]))


def test_two_processes_give_the_same_numbers(single, trained, uneven_shards, tmp_path):
    _, ev1 = single
    result = ok(
        run(
            "--checkpoint",
            str(trained / "checkpoints" / "best"),
            "--data",
            str(uneven_shards),
            "--out",
            str(tmp_path / "ddp"),
            "--num-workers",
            "1",
            "--batch-size",
            "7",
            launch=True,
        )
    )
    ev2 = read_json(tmp_path / "ddp" / "eval.json")
    assert ev2["world_size"] == 2 and ev2["expected_count"] % 2  # 121: one rank holds the odd sample
    assert ev2["count"] == ev1["count"] == ev2["expected_count"] and ev2["confusion"] == ev1["confusion"]
    for key in ("top1", "top5", "loss"):
        assert ev2[key] == pytest.approx(ev1[key], rel=1e-5)
    assert ev2["per_class"] == ev1["per_class"]
    assert result.stdout.count("macro average") == 1  # the main process alone prints


def flip_tta_reference(checkpoint, data, split: str) -> dict:
    """Loss and top-1 of `split` computed here, in one batch: plain logits, and flip TTA as the mean of the
    softmax of each image and of its horizontal mirror."""
    index, meta = read_index(str(data)), read_meta(checkpoint)
    model = load_model(checkpoint, meta, index, str(data)).eval()
    n = index.splits[split].num_samples
    stream = ShardStream(str(data), index, split, batch_size=n, rank=0, world_size=1, train=False)
    [(images, labels, lost, _, _)] = list(stream)
    assert lost == 0 and len(labels) == n
    x = BatchAugment(meta["mean"], meta["std"], torch.device("cpu")).eval(images)  # N x C x H x W
    with torch.no_grad():
        logits = model(x)
        probs = (logits.softmax(1) + model(x.flip(3)).softmax(1)) / 2
    rows = torch.arange(n)
    return {
        "plain": (F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()),
        "flip": (-probs[rows, labels].log().mean().item(), (probs.argmax(1) == labels).float().mean().item()),
    }


def test_flip_tta(trained, uneven_shards):
    def evaluate_val(*tta):
        args = ["--checkpoint", str(trained), "--data", str(uneven_shards), "--split", "val", *tta]
        assert main([*args, "--num-workers", "0"]) == 0

    evaluate_val("--tta", "flip")
    evaluate_val()
    ev, plain = read_json(trained / "eval-val-tta" / "eval.json"), read_json(trained / "eval-val" / "eval.json")
    assert ev["tta"] == "flip" and ev["split"] == "val" and plain["tta"] == "none"
    assert ev["count"] == read_json(uneven_shards / "index.json")["splits"]["val"]["num_samples"]
    assert 0 <= ev["top1"] <= 1 and ev["loss"] > 0
    assert (trained / "eval-val-tta" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    # the command's numbers are those of the mirror-averaged softmax, and the mirror does change them
    ref = flip_tta_reference(Path(ev["checkpoint"]), uneven_shards, "val")
    assert (ev["loss"], ev["top1"]) == pytest.approx(ref["flip"], rel=1e-4)
    assert (plain["loss"], plain["top1"]) == pytest.approx(ref["plain"], rel=1e-4)
    assert abs(ref["flip"][0] - ref["plain"][0]) > 1e-3 and abs(ev["loss"] - plain["loss"]) > 1e-3


class Boom:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['BOOM_FILE'], 'w').write('ran')",))


def test_only_weights_are_loaded(trained, uneven_shards, tmp_path):
    """A checkpoint whose state.pt is a malicious pickle still evaluates, and the pickle never runs."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "checkpoints" / "best", ckpt)
    (ckpt / "state.pt").write_bytes(pickle.dumps(Boom()))
    boom = tmp_path / "boom"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_dist.evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(uneven_shards),
            "--num-workers",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=run_env(OMP_NUM_THREADS="1", BOOM_FILE=str(boom)),
        timeout=300,
    )
    ok(result)
    assert not boom.exists()
    assert read_json(ckpt / "eval-test" / "eval.json")["count"] > 0  # not a run folder: output beside the weights


@pytest.fixture(scope="module")
def three_class_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("data3") / "three"
    ok(
        shard(
            "synthetic",
            "--out",
            str(out),
            "--num-classes",
            "3",
            "--image-size",
            "16",
            "--num-samples",
            "60",
            "--channels",
            "3",
            "--seed",
            "2",
        )
    )
    return out


@pytest.fixture(scope="module")
def gray_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("data1") / "gray"
    return synthetic(out, num_classes=4, image_size=16, num_samples=60, channels=1, seed=2)


def in_process(*args):
    """The command's main() through run_cli, in this process (no interpreter start-up): (code, stderr)."""
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        run_cli(main, list(args))
    return subprocess.CompletedProcess(args, exit_.value.code, "", err.getvalue())


def one_line_exit_2(result, *words):
    """The whole of stderr is one `error:` line holding every word: no usage block, no traceback."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_mismatched_classes_and_channels_refused(trained, three_class_shards, gray_shards):
    one_line_exit_2(run("--checkpoint", str(trained), "--data", str(three_class_shards)), "4 classes", "has 3")
    one_line_exit_2(in_process("--checkpoint", str(trained), "--data", str(gray_shards)), "3-channel", "1-channel")


def test_bad_inputs(trained, uneven_shards, tmp_path):
    data = str(uneven_shards)
    one_line_exit_2(in_process("--checkpoint", str(tmp_path / "nope"), "--data", data), "no such")
    one_line_exit_2(in_process("--checkpoint", str(tmp_path), "--data", data), "neither a checkpoint")
    one_line_exit_2(in_process("--checkpoint", str(trained), "--data", str(tmp_path)), "index.json")
    one_line_exit_2(in_process("--checkpoint", str(trained), "--data", data, "--split", "dev"), "--split dev")
    one_line_exit_2(in_process("--checkpoint", str(trained), "--data", data, "--tta", "crop"), "--tta")
    one_line_exit_2(in_process("--checkpoint", str(trained), "--data", data, "--batch-size", "0"), "--batch-size")
    one_line_exit_2(in_process("--data", data), "the following arguments are required: --checkpoint")
    one_line_exit_2(in_process("--checkpoint", str(trained), "--data", data, "--bogus"), "unrecognized arguments")
    broken = tmp_path / "broken"
    shutil.copytree(trained / "checkpoints" / "best", broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    one_line_exit_2(in_process("--checkpoint", str(broken), "--data", data), "model.safetensors")
