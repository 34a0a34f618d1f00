"""The weight EMA's update rule, in process: warm-up, buffers, and which steps move it."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from resnet_dist.config import TrainConfig
from resnet_dist.ema import ModelEma, decay_at
from resnet_dist.engine import train_step
from resnet_dist.models import build_model

sys.path.insert(0, str(Path(__file__).parent / "scripts"))


def test_warmup_decay_against_hand_computation():
    # 1 - (1 + t) ** (-2/3): t = 7 gives 1 - 8 ** (-2/3) = 1 - 1/4; t = 26 gives 1 - 27 ** (-2/3) = 1 - 1/9
    assert decay_at(0.999, 0) == 0.0  # the first update copies the weights
    assert decay_at(0.999, 7) == pytest.approx(0.75, abs=1e-12)
    assert decay_at(0.999, 26) == pytest.approx(8 / 9, abs=1e-12)
    assert decay_at(0.8, 26) == 0.8  # capped at the decay asked for
    assert decay_at(0.999, 1, warmup=False) == 0.999 and decay_at(0.999, 0, warmup=False) == 0.0


def bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())


def test_parameters_and_buffers_are_averaged_and_counts_copied():
    net = bn_net()
    ema = ModelEma(net, decay=0.9, warmup=False)
    ema.step(net)  # the first update: a copy
    bn = net[1]
    with torch.no_grad():
        net[0].weight.add_(1.0)
        bn.running_mean.fill_(2.0)
    bn.num_batches_tracked.fill_(5)
    old_w, old_mean = ema.module[0].weight.clone(), ema.module[1].running_mean.clone()
    ema.step(net)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * old_w + 0.1 * net[0].weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(ema.module[1].running_mean, 0.9 * old_mean + 0.1 * 2.0, rtol=0, atol=1e-6)
    assert ema.module[1].num_batches_tracked.item() == 5  # an integer count is copied, not averaged
    assert ema.updates == 2 and not any(p.requires_grad for p in ema.module.parameters())


def test_every_n_steps_raises_the_decay_to_the_power_n():
    net = bn_net()
    ema = ModelEma(net, decay=0.9, warmup=False, every=4)
    for _ in range(3):
        ema.step(net)
    assert (ema.steps, ema.updates) == (3, 0)  # nothing until the 4th step
    ema.step(net)  # the first update copies
    with torch.no_grad():
        net[0].weight.add_(1.0)
    old = ema.module[0].weight.clone()
    for _ in range(4):
        ema.step(net)
    assert (ema.steps, ema.updates) == (8, 2)
    d = 0.9**4
    torch.testing.assert_close(ema.module[0].weight, d * old + (1 - d) * net[0].weight, rtol=0, atol=1e-6)


def timm_module(relative: str):
    """One source file of timm, where timm is installed (not a dependency), without importing the whole
    package (10 s here): model_ema.py imports only torch."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm is not installed")
    path = Path(spec.origin).parent / relative
    module_spec = importlib.util.spec_from_file_location("timm_model_ema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_matches_timm_model_ema_v3_with_warmup():
    timm_ema = timm_module("utils/model_ema.py")
    torch.manual_seed(0)
    net = torch.nn.Sequential(bn_net(), torch.nn.Linear(4 * 6 * 6, 3), torch.nn.BatchNorm1d(3))
    ours = ModelEma(net, decay=0.99)
    theirs = timm_ema.ModelEmaV3(net, decay=0.99, use_warmup=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for k in range(1, 13):  # BatchNorm buffers move with each train-mode forward
        loss = net(torch.randn(4, 3, 8, 8, generator=g)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours.step(net)
        theirs.update(net, step=k)  # timm's train.py passes the number of updates made, this one included
    for key, value in theirs.module.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_only_real_optimizer_steps_move_the_average():
    """Accumulation micro-batches and a step the NaN guard skipped are not counted."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from real_step import real_step

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2, step_scheduler_with_optimizer=False)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5))
    poison = {"on": False}
    net.register_forward_hook(lambda m, i, o: o * float("nan") if poison["on"] else o)
    cfg = TrainConfig(lr=0.1, weight_decay=0.0, schedule="none")
    step = real_step(acc, net, cfg, max_bad_steps=3)
    step = type(step)(**{**step.__dict__, "ema": ModelEma(acc.unwrap_model(step.model), 0.9)})
    g = torch.Generator().manual_seed(0)
    seen = []
    for i in range(6):  # micro-batches: steps after 2 (real), 4 (NaN: skipped), 6 (real)
        poison["on"] = i in (2, 3)
        images = torch.randint(0, 256, (8, 6, 6, 3), generator=g, dtype=torch.uint8)
        train_step(step, images, torch.randint(0, 5, (8,), generator=g), None)
        seen.append(step.ema.steps)
    assert seen == [0, 1, 1, 1, 1, 2] and step.guard.bad_steps == 1
    assert all(torch.isfinite(v).all() for v in step.ema.state_dict().values())
    AcceleratorState._reset_state(reset_partial_state=True)


def test_checkpoint_holds_the_average_and_restores_it_bitwise(tmp_path):
    """ema.safetensors in the same folder as model.safetensors, same keys; loaded back bitwise into a
    channels_last copy, which stays channels_last (the EMA lives in the model's memory format)."""
    from resnet_dist.checkpoint import load_weights, save_checkpoint

    net = build_model("resnet18", num_classes=3, in_channels=3, stem="cifar", width=4)
    net = net.to(memory_format=torch.channels_last)
    ema = ModelEma(net, 0.9)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(3):
        ema.step(net)
    save_checkpoint(tmp_path / "last", net, {"ema": ema.counters()}, {}, {"ema.safetensors": ema.state_dict()})
    saved = load_weights(tmp_path / "last", "ema.safetensors")
    assert saved.keys() == load_weights(tmp_path / "last").keys()
    other = ModelEma(build_model("resnet18", num_classes=3, in_channels=3, stem="cifar", width=4), 0.9)
    other.module.to(memory_format=torch.channels_last)
    other.load(saved, {"steps": 3, "updates": 3})
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in other.state_dict().items())
    assert other.module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert (other.steps, other.updates) == (3, 3)


def test_a_checkpoint_without_the_average_is_refused_with_ema(tmp_path):
    from types import SimpleNamespace

    from resnet_dist.errors import UsageError
    from resnet_dist.run import restore_ema

    run = SimpleNamespace(step=SimpleNamespace(ema=ModelEma(bn_net(), 0.9)))
    with pytest.raises(UsageError, match="was saved by a run without --ema: resume it without --ema"):
        restore_ema(run, tmp_path, {"history": []})  # a checkpoint from before --ema existed
    restore_ema(SimpleNamespace(step=SimpleNamespace(ema=None)), tmp_path, {})  # without --ema: nothing to do


def test_best_by_picks_the_row_metric_and_wandb_names_both():
    from resnet_dist.trainer import best_key, default_weights, val_metrics

    assert best_key(TrainConfig(ema=0.9)) == "val_ema_top1" and default_weights(TrainConfig(ema=0.9)) == "ema"
    assert best_key(TrainConfig(ema=0.9, best_by="raw")) == "val_top1"
    assert best_key(TrainConfig()) == "val_top1" and default_weights(TrainConfig()) == "raw"
    row = {"val_top1": 0.5, "val_ema_top1": 0.6, "val_ema_loss": 1.0, "train_loss": 2.0}
    assert val_metrics(row) == {"val/top1": 0.5, "val_ema/top1": 0.6, "val_ema/loss": 1.0}
