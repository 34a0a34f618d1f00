"""--init-from and --freeze-backbone in real 2-process runs on real Fashion-MNIST: torchvision-format weights
go in, the frozen backbone comes out bitwise the file's, and a resume past --unfreeze-epoch trains it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import fashion_subset, ok, read_json, train
from safetensors.torch import load_file, save_file

from resnet_dist.models import build_model

HEAD = ("fc.weight", "fc.bias")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    return fashion_subset(tmp_path_factory.mktemp("finetune") / "fashion", 384, "--shard-size", "200")


@pytest.mark.slow
def test_frozen_backbone_keeps_the_files_tensors_then_unfreezes_on_resume(fashion, tmp_path):
    torch.manual_seed(1)
    weights = {k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}  # random init
    save_file(weights, str(tmp_path / "r18.safetensors"))
    spec = str(tmp_path / "r18.safetensors")
    run = tmp_path / "run"
    # 384 train images, 32 x 2 processes: 6 optimizer steps an epoch; epoch 1 frozen, epoch 2 all layers.
    args = ["--data", str(fashion), "--out", str(run), "--model", "resnet18", "--stem", "imagenet"]
    args += ["--init-from", spec, "--freeze-backbone", "--unfreeze-epoch", "1", "--epochs", "2"]
    args += ["--batch-size", "32", "--lr", "0.05", "--num-workers", "1", "--log-every", "2", "--wandb-mode"]
    args += ["disabled", "--no-wd-norm-bias", "--clip-grad-norm", "5", "--backbone-lr-mult", "0.5"]
    first = ok(train(*args, "--max-steps", "6"))  # stops at the end of the frozen epoch
    line = (
        f"init from {spec}: 120 tensors loaded; fc replaced (1000 -> 10 classes, new init); "
        f"conv1 summed over its 3 input channels for 1-channel data"
    )
    assert first.stdout.count(line) == 1, first.stdout[-3000:]  # the main process only
    assert "grad norm " in first.stdout  # the pre-clip norm is logged
    frozen = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert read_json(run / "summary.json")["steps_done"] == 6
    for key, value in frozen.items():
        if key in HEAD:
            continue
        want = weights[key].sum(1, keepdim=True) if key == "conv1.weight" else weights[key]
        assert torch.equal(value, want), key  # bitwise: weights, BN running statistics and their counters
    torch.manual_seed(0)  # the run's --seed: its fc before training
    start = build_model("resnet18", num_classes=10, in_channels=1, stem="imagenet").state_dict()
    assert frozen["fc.weight"].shape == (10, 512)
    assert not torch.equal(frozen["fc.weight"], start["fc.weight"])  # the head did train

    shutil.copytree(run, tmp_path / "kept")
    resumed = ok(train(*args))  # the same command without --max-steps: epoch 2, all layers
    assert "resumed from" in resumed.stdout and "epoch 2: backbone unfrozen: all layers train" in resumed.stdout
    assert "init from" not in resumed.stdout  # a resumed run loads its own checkpoint, not the file
    trained = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert read_json(run / "summary.json")["steps_done"] == 12
    assert not torch.equal(trained["layer1.0.conv1.weight"], frozen["layer1.0.conv1.weight"])
    assert not torch.equal(trained["bn1.running_mean"], frozen["bn1.running_mean"])  # BN in train mode again
