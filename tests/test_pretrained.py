"""--init-from's reading, naming and adaptation, the parameter groups, the frozen backbone and gradient clipping
under accumulation, in process; the one-line errors of bad --init-from specs through the real command."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error

import pytest
import timm
import torch
import torchvision
from accelerate import Accelerator
from helpers import ROOT, TRAIN, run_env
from safetensors.torch import load_file, save_file
from timm.models import adapt_input_conv as timm_adapt
from timm.optim import param_groups_weight_decay
from torch import nn

from resnet_dist.augment import BatchAugment
from resnet_dist.config import TrainConfig, parse_args
from resnet_dist.engine import GradClip, Step, train_step
from resnet_dist.errors import DataError, UsageError
from resnet_dist.guard import StepGuard, StopRequest
from resnet_dist.models import build_model
from resnet_dist.optim import build_optimizer, build_scheduler, param_groups
from resnet_dist.pretrained import (
    adapt_input_conv,
    backbone_eval,
    head_names,
    init_from,
    load_into,
    read_state_dict,
    set_backbone_trainable,
)
from resnet_dist.trainer import fit


def resnet(name="resnet18", classes=10, channels=1, stem="imagenet", width=None):
    torch.manual_seed(0)
    return build_model(name, num_classes=classes, in_channels=channels, stem=stem, width=width)


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_weights_load_unchanged(name):
    theirs = timm.create_model(name, pretrained=False).state_dict()
    model = resnet(name, classes=1000, channels=3)
    assert load_into(model, theirs, "timm", "imagenet") == f"init from timm: {len(theirs)} tensors loaded"
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("old", "new"), [(3, 1), (3, 2), (3, 4), (3, 5), (1, 3), (3, 3)])
def test_input_conv_adapted_as_timm_does(old, new):
    weight = torch.randn(8, old, 7, 7)
    assert torch.equal(adapt_input_conv(weight, new), timm_adapt(new, weight, base_chans=old))


def test_pth_and_safetensors_and_their_containers_read_alike(r18, tmp_path):
    save_file(r18, str(tmp_path / "w.safetensors"))
    torch.save(r18, tmp_path / "w.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in r18.items()}, "epoch": 3}, tmp_path / "ddp.pt")
    torch.save({"model": r18, "model_ema": r18}, tmp_path / "m.bin")
    for name in ("w.safetensors", "w.pth", "ddp.pt", "m.bin"):
        sd = read_state_dict(str(tmp_path / name), "resnet18")
        assert sd.keys() == r18.keys() and all(torch.equal(sd[k], r18[k]) for k in sd), name
    torch.save({"model_ema": r18}, tmp_path / "ema.pth")  # which weights are meant is not guessed
    with pytest.raises(DataError, match="not a state dict of tensors"):
        read_state_dict(str(tmp_path / "ema.pth"), "resnet18")
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a module object: weights_only refuses
    with pytest.raises(DataError, match="not a readable weights file"):
        read_state_dict(str(tmp_path / "pickled.pth"), "resnet18")


def test_adaptation_is_reported_in_one_line(r18):
    model = resnet()
    line = init_from_dict(model, r18)
    assert line == (
        "init from F: 120 tensors loaded; fc replaced (1000 -> 10 classes, new init); "
        "conv1 summed over its 3 input channels for 1-channel data"
    )
    state = model.state_dict()
    assert torch.equal(state["conv1.weight"], r18["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(state["fc.weight"], resnet().state_dict()["fc.weight"])  # our init, not the file's
    assert all(torch.equal(state[k], r18[k]) for k in r18 if k not in ("conv1.weight", "fc.weight", "fc.bias"))


def init_from_dict(model, sd, stem="imagenet"):
    return load_into(model, dict(sd), "F", stem)


def test_mismatches_name_the_fix(r18):
    with pytest.raises(UsageError, match=r"conv1 is 7x7 .*--stem cifar has a 3x3 conv1: add --stem imagenet"):
        init_from_dict(resnet(stem="cifar"), r18, "cifar")
    cifar = resnet(classes=1000, channels=3, stem="cifar").state_dict()
    with pytest.raises(UsageError, match="add --stem cifar"):
        init_from_dict(resnet(), cifar)
    r50 = torchvision.models.resnet50().state_dict()
    with pytest.raises(UsageError, match=r"layer1.0.conv1.weight does not fit .* looks like resnet50 \(width 64"):
        init_from_dict(resnet(), r50)
    with pytest.raises(UsageError, match=r"bn1.weight does not fit \(the file's \(64,\), this model's \(32,\)\)"):
        init_from_dict(resnet(width=32), r18)
    with pytest.raises(UsageError, match=r"layer1.2.conv1.weight does not fit \(missing from the file\).*resnet18"):
        init_from_dict(resnet("resnet34"), r18)
    with pytest.raises(DataError, match="not a ResNet state dict"):
        init_from_dict(resnet(), nn.Linear(3, 2).state_dict())


def test_torchvision_weights_come_from_the_hub_cache_unchecked(r18, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(r18, tmp_path / "hub" / "checkpoints" / os.path.basename(url))  # any bytes: no hash is checked
    model = resnet(channels=3)
    assert init_from(model, "torchvision:resnet18.DEFAULT", "resnet18", "imagenet").startswith(
        "init from torchvision:resnet18.DEFAULT: 120 tensors loaded; fc replaced (1000 -> 10 classes"
    )
    assert torch.equal(model.state_dict()["layer4.1.bn2.running_var"], r18["layer4.1.bn2.running_var"])


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kw):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    with pytest.raises(DataError) as info:
        init_from(resnet("resnet50"), "torchvision:resnet50.IMAGENET1K_V2", "resnet50", "imagenet")
    message = str(info.value)
    assert "\n" not in message and f"cannot download {url} ([Errno -2] Name or service not known)" in message
    assert "download it elsewhere and pass the file: --init-from PATH" in message


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--init-from", "torchvision:resnet50.DEFAULT"], "weights of resnet50, but --model is resnet18"),
        (["--init-from", "torchvision:resnet18.DEFAULT"], "the 7x7 stem: add --stem imagenet"),
        (["--init-from", "torchvision:resnet18.V9", "--stem", "imagenet"], "torchvision has no resnet18 weights 'V9'"),
        (["--init-from", "torchvision:resnet18"], "expected torchvision:ARCH.WEIGHTS"),
        (["--init-from", "ROOT/missing.pth"], "--init-from ROOT/missing.pth: no such file or folder"),
        (["--init-from", "ROOT"], "neither a checkpoint folder (meta.json + model.safetensors) nor a run folder"),
        (["--init-from", "ftp://host/w.pth"], "--init-from ftp://host/w.pth: unsupported scheme 'ftp://'"),
        (["--init-from", "s3://bucket/weights"], "a URL must name a weights file"),
        (["--init-from", "ROOT/w.pth", "--model", "simple_cnn"], "--model simple_cnn has no pretrained form"),
        (["--freeze-backbone"], "--freeze-backbone needs --init-from"),
        (["--unfreeze-epoch", "1"], "--unfreeze-epoch needs --freeze-backbone"),
        (["--init-from", "ROOT/w.pth", "--freeze-backbone", "--unfreeze-epoch", "10"], "leaves no epoch of 10"),
        (["--backbone-lr-mult", "0"], "--backbone-lr-mult must be positive"),
        (["--clip-grad-norm=-1"], "--clip-grad-norm must be >= 0"),
    ],
)
def test_bad_options_are_one_usage_line(flags, message, tmp_path):
    (tmp_path / "w.pth").write_bytes(b"")
    flags = [f.replace("ROOT", str(tmp_path)) for f in flags]
    message = message.replace("ROOT", str(tmp_path))
    with pytest.raises(UsageError) as info:
        parse_args(["--data", "d", "--out", "o", "--epochs", "10", *flags])
    assert message in str(info.value)


def command(*args, **env) -> subprocess.CompletedProcess:
    """launch/train.py as a user runs it (one process): errors must be one line, exit code non-zero."""
    cmd = [sys.executable, str(TRAIN), "--wandb-mode", "disabled", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=run_env(**env))


def test_cli_errors_are_one_line(synthetic_shards, tmp_path):
    missing = command("--data", str(synthetic_shards), "--out", str(tmp_path / "a"), "--init-from", "nope.pth")
    assert missing.returncode == 2 and missing.stderr == (
        "error: --init-from nope.pth: no such file or folder (a weights file, a checkpoint or run folder, "
        "or torchvision:ARCH.WEIGHTS)\n"
    )
    linear = tmp_path / "linear.safetensors"
    save_file({"weight": torch.zeros(2, 3)}, str(linear))  # read once setup has started: still one line
    other = command("--data", str(synthetic_shards), "--out", str(tmp_path / "b"), "--init-from", str(linear))
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert other.stderr.startswith(f"error: --init-from {linear}: not a ResNet state dict"), other.stderr


# --- the optimizer's groups ----------------------------------------------------------------------------------


def test_groups_split_head_backbone_and_norm_bias_as_timm():
    model = resnet()
    cfg = TrainConfig(lr=0.2, weight_decay=5e-4, backbone_lr_mult=0.1, wd_norm_bias=False)
    groups = param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["head", "head no-decay", "backbone", "backbone no-decay"]
    assert [g["lr"] for g in groups] == [0.2, 0.2, pytest.approx(0.02), pytest.approx(0.02)]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 5e-4, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups[0]["params"]] == ["fc.weight"]
    assert [names[id(p)] for p in groups[1]["params"]] == ["fc.bias"]
    timm_groups = param_groups_weight_decay(model, 5e-4)  # [no decay, decay]
    assert {id(p) for p in timm_groups[0]["params"]} == {id(p) for g in groups[1::2] for p in g["params"]}
    assert {id(p) for p in timm_groups[1]["params"]} == {id(p) for g in groups[0::2] for p in g["params"]}
    default = param_groups(model, TrainConfig(lr=0.2, weight_decay=5e-4))  # as before: one group, in order
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in default] == [("all", 0.2, 5e-4)]
    assert default[0]["params"] == list(model.parameters())
    no_wd = param_groups(model, TrainConfig(lr=0.2, weight_decay=5e-4, wd_norm_bias=False))
    assert [g["name"] for g in no_wd] == ["all", "no-decay"]
    assert {id(p) for p in no_wd[1]["params"]} == {id(p) for p in timm_groups[0]["params"]}


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "triangle", "none"])
def test_backbone_lr_follows_every_schedule(schedule):
    cfg = TrainConfig(lr=0.4, backbone_lr_mult=0.25, schedule=schedule, warmup_epochs=1)
    optimizer = build_optimizer(cfg, param_groups(resnet(), cfg))
    scheduler = build_scheduler(cfg, optimizer, total_steps=20, steps_per_epoch=5)
    for _ in range(12):
        head, backbone = (g["lr"] for g in optimizer.param_groups)
        assert backbone == pytest.approx(head * 0.25)
        optimizer.step()
        scheduler.step()
    if schedule == "onecycle":
        assert [g["max_lr"] for g in optimizer.param_groups] == [0.4, 0.1]


def test_optimizer_state_loads_into_the_same_groups():
    cfg = TrainConfig(wd_norm_bias=False, backbone_lr_mult=0.5)
    model = resnet()
    optimizer = build_optimizer(cfg, param_groups(model, cfg))
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    optimizer.step()
    again = build_optimizer(cfg, param_groups(resnet(), cfg))
    again.load_state_dict(optimizer.state_dict())
    assert [g["name"] for g in again.param_groups] == ["head", "head no-decay", "backbone", "backbone no-decay"]


# --- the frozen backbone ---------------------------------------------------------------------------------------


def test_frozen_backbone_trains_the_head_only_with_bn_in_eval():
    model = resnet()
    assert head_names(model) == {"fc.weight", "fc.bias"}
    assert head_names(build_model("simple_cnn", num_classes=10)) == {"1.3.weight", "1.3.bias"}
    assert set_backbone_trainable(model, False) and not set_backbone_trainable(model, False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    cfg = TrainConfig(lr=0.1, weight_decay=5e-4)
    optimizer = build_optimizer(cfg, param_groups(model, cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    backbone_eval(model)
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)) and model.fc.training
    for _ in range(2):
        nn.functional.cross_entropy(model(torch.randn(4, 1, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("fc."))  # weight decay too
    assert not torch.equal(after["fc.weight"], before["fc.weight"])


# --- clipping under accumulation ----------------------------------------------------------------------------


def test_clipping_with_accumulation_clips_the_summed_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    reference = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    reference.load_state_dict(net.state_dict())
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    model, optimizer = acc.prepare(net, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    augment = BatchAugment([0.5] * 3, [0.25] * 3, acc.device, 0, False, False, 0.0)
    guard = StepGuard(acc, StopRequest(), 10)
    step = Step(acc, model, optimizer, scheduler, augment, guard, 0.0, clip=GradClip(0.01))
    images = torch.randint(0, 256, (2, 4, 4, 4, 3), dtype=torch.uint8)
    labels = torch.tensor([[0, 1, 2, 0], [1, 1, 2, 2]])
    for i in range(2):
        train_step(step, images[i], labels[i], None)
    for i in range(2):  # the same by hand: the mean of the two micro-batches' gradients, clipped once
        x = augment.eval(images[i])
        (nn.functional.cross_entropy(reference(x), labels[i]) / 2).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    assert norm > 0.1 and torch.allclose(step.clip.last_norm, norm)  # clipping did act, at the sync step only
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad
    for a, b in zip(net.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-7), (a - b).abs().max()


# --- a resume across --unfreeze-epoch ------------------------------------------------------------------------


def test_resume_across_the_unfreeze_epoch_matches_the_uninterrupted_run(synthetic_shards, tmp_path):
    """In process, one process (the 2-process DDP rebuild runs in test_finetune.py): cut while frozen, resume
    through the unfreeze, and end on the uninterrupted run's weights."""
    torch.manual_seed(5)
    save_file(resnet(classes=1000, channels=3, stem="cifar", width=8).state_dict(), str(tmp_path / "w.safetensors"))
    args = ["--data", str(synthetic_shards), "--model", "resnet18", "--stem", "cifar", "--width", "8", "--lr", "0.02"]
    args += ["--init-from", str(tmp_path / "w.safetensors"), "--freeze-backbone", "--unfreeze-epoch", "1"]
    args += ["--epochs", "2", "--batch-size", "64", "--num-workers", "0", "--wandb-mode", "disabled"]
    args += ["--backbone-lr-mult", "0.5", "--no-wd-norm-bias", "--clip-grad-norm", "2"]
    fit(parse_args([*args, "--out", str(tmp_path / "full")])[0])
    fit(parse_args([*args, "--out", str(tmp_path / "cut"), "--max-steps", "3"])[0])  # mid-epoch 1, frozen
    fit(parse_args([*args, "--out", str(tmp_path / "cut")])[0])
    a = load_file(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(tmp_path / "w.safetensors")
    assert not torch.equal(a["layer1.0.conv1.weight"], first["layer1.0.conv1.weight"])  # unfrozen in epoch 2


def test_a_run_folder_trained_with_ema_is_continued_from_its_ema_weights(tmp_path):
    """As evaluate, predict and export pick them: ema.safetensors when the checkpoint has it."""
    from resnet_dist.checkpoint import save_checkpoint

    model = build_model("resnet18", num_classes=10, in_channels=1, stem="cifar", width=8)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    folder = tmp_path / "run" / "checkpoints" / "last"
    save_checkpoint(folder, model, {}, {"epoch": 1}, extra={"ema.safetensors": ema})
    loaded = read_state_dict(str(tmp_path / "run"), "resnet18")
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    (folder / "ema.safetensors").unlink()
    loaded = read_state_dict(str(tmp_path / "run"), "resnet18")
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
