"""Every model builds, runs forward and backward, and the ResNets match torchvision where they should."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from resnet_dist.models import MODELS, STEMS, ResNet, build_model, count_parameters, simple_cnn

RESNETS = [m for m in MODELS if m != "simple_cnn"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str, stem: str) -> None:
    # Tiny width and input keep this fast; 32x32 survives the imagenet stem's /32 downsampling.
    model = build_model(name, num_classes=7, in_channels=3, stem=stem, width=4)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "name,expected", [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)]
)
def test_parameter_count_matches_torchvision(name: str, expected: int) -> None:
    ours = build_model(name, num_classes=1000, in_channels=3, stem="imagenet", width=64)
    theirs = getattr(torchvision.models, name)(weights=None)
    assert count_parameters(ours) == expected
    assert count_parameters(theirs) == expected


def test_state_dict_loads_strictly_into_torchvision() -> None:
    ours = build_model("resnet18", stem="imagenet")
    theirs = torchvision.models.resnet18(weights=None)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_cifar_stem_keeps_resolution_until_layer2() -> None:
    model = build_model("resnet18", num_classes=10, stem="cifar", width=8)
    x = torch.randn(1, 3, 32, 32)
    stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    assert stem.shape == (1, 8, 32, 32)
    assert model.layer1(stem).shape == (1, 8, 32, 32)
    imagenet = build_model("resnet18", num_classes=10, stem="imagenet", width=8)
    assert imagenet.maxpool(imagenet.relu(imagenet.bn1(imagenet.conv1(x)))).shape == (1, 8, 8, 8)


@pytest.mark.parametrize("name", MODELS)
def test_single_channel_28x28(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1, stem="cifar", width=4)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_width_sets_stage_channels() -> None:
    model = build_model("resnet50", num_classes=5, stem="cifar", width=8)
    assert [model.layer1[0].conv3.out_channels, model.layer4[0].conv3.out_channels] == [32, 256]
    assert model.fc.in_features == 256


@pytest.mark.parametrize("name", MODELS)
def test_dropout_only_when_asked(name: str) -> None:
    def dropouts(m: nn.Module) -> list[float]:
        return [d.p for d in m.modules() if isinstance(d, nn.Dropout)]

    assert dropouts(build_model(name, width=4, dropout=0.0)) == []
    assert dropouts(build_model(name, width=4, dropout=0.4)) == [0.4]


def test_dropout_sits_before_the_classifier() -> None:
    model = build_model("resnet18", num_classes=3, stem="cifar", width=4, dropout=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout active in training
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name,block,last_bn", [("resnet18", BasicBlock, "bn2"), ("resnet50", Bottleneck, "bn3")])
def test_zero_init_residual(name: str, block: type, last_bn: str) -> None:
    model = build_model(name, width=4, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, block)]
    assert len(blocks) == (8 if name == "resnet18" else 16)
    for b in blocks:
        assert torch.all(getattr(b, last_bn).weight == 0)
        assert torch.all(b.bn1.weight == 1)  # only the last BN of each block
    assert torch.all(model.bn1.weight == 1)
    default = build_model(name, width=4)
    assert all(torch.all(getattr(b, last_bn).weight == 1) for b in default.modules() if isinstance(b, block))


def test_zero_init_blocks_start_as_identity() -> None:
    model = build_model("resnet18", width=4, stem="cifar", zero_init_residual=True).eval()
    x = torch.randn(2, 4, 8, 8).relu()  # a block's input is post-ReLU, and it ends in ReLU(x + 0)
    torch.testing.assert_close(model.layer1[0](x), x)


def test_kaiming_init() -> None:
    model = build_model("resnet18", width=64)
    w = model.layer3[0].conv2.weight  # fan_out = 256 * 3 * 3
    assert abs(w.std().item() - (2.0 / (256 * 9)) ** 0.5) < 0.002
    assert torch.all(model.layer3[0].bn1.bias == 0)


def test_builders_are_the_public_api() -> None:
    from resnet_dist import models

    m = models.resnet34(num_classes=10, stem="cifar", width=4, in_channels=1, dropout=0.1)
    assert isinstance(m, ResNet) and m.fc.out_features == 10 and m.conv1.in_channels == 1
    assert simple_cnn(num_classes=10, in_channels=3, width=32)[1][-1].in_features == 256
    # The notebook's baseline: 4 convs (32/64/128/256) with BN, then Linear(256, 10).
    convs = sum(9 * cin * cout + cout + 2 * cout for cin, cout in [(3, 32), (32, 64), (64, 128), (128, 256)])
    assert count_parameters(build_model("simple_cnn", num_classes=10, in_channels=3)) == convs + 256 * 10 + 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="resnet101"), "model must be one of resnet18, resnet34, resnet50, simple_cnn"),
        (dict(name="resnet18", stem="tiny"), "stem must be one of cifar, imagenet"),
        (dict(name="resnet18", width=0), "width must be a positive integer"),
        (dict(name="simple_cnn", width=-3), "width must be a positive integer"),
        (dict(name="resnet18", dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(name="resnet50", dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(name="resnet18", num_classes=0), "num_classes must be a positive integer"),
        (dict(name="resnet18", in_channels=0), "in_channels must be a positive integer"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)
