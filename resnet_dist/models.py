"""ResNet-18/34/50 (He et al., 2016) with the knobs small-image training needs, and a plain CNN baseline.

The blocks come from torchvision: they are well kept, and reusing them keeps our state dicts loadable
by torchvision's ResNet (same module names and shapes). Our ResNet adds what torchvision's lacks:
a CIFAR stem, a base width, input channels, dropout before the classifier.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

STEMS = ("cifar", "imagenet")
MODELS = ("resnet18", "resnet34", "resnet50", "simple_cnn")

Block = type[BasicBlock] | type[Bottleneck]


def _check(name: str, value: object, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


def _check_common(num_classes: int, in_channels: int, width: int, dropout: float) -> None:
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
        _check(name, value, isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive integer")
    _check("dropout", dropout, isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0, "in [0, 1)")


class ResNet(nn.Module):
    """A ResNet of `block`s, with `layers[i]` blocks in stage i (stage widths width, 2w, 4w, 8w).

    stem='imagenet': 7x7 stride-2 conv + 3x3 stride-2 max-pool (input /4), as in the paper.
    stem='cifar': 3x3 stride-1 conv and no pool, so 32x32 or 64x64 images keep their resolution
    in the first stage instead of starting at 8x8 or 16x16.
    """

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 1000,
        *,
        stem: str = "imagenet",
        width: int = 64,
        in_channels: int = 3,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        _check("stem", stem, stem in STEMS, f"one of {', '.join(STEMS)}")
        _check_common(num_classes, in_channels, width, dropout)
        # Module names follow torchvision's (conv1, bn1, maxpool, layer1..4, fc): state dicts stay compatible.
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

        self.inplanes = width  # channels entering the next block; _make_layer advances it
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Projection shortcut: the identity cannot be added when the shape changes.
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # fan_out keeps the backward signal's variance steady through ReLU convs (He et al., 2015).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            # With the last BN's gamma at 0 each residual branch outputs 0, so every block starts as the
            # identity: the deep net trains like a shallow one at first, which makes large-batch training
            # stable (Goyal et al., 2017, "Accurate, Large Minibatch SGD").
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, H/4, W/4) imagenet; (B, w, H, W) cifar
        x = self.layer1(x)  # (B, w*e, ., .)   e = block.expansion (1 basic, 4 bottleneck)
        x = self.layer2(x)  # (B, 2w*e, /2)
        x = self.layer3(x)  # (B, 4w*e, /4)
        x = self.layer4(x)  # (B, 8w*e, /8)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 8w*e)
        return self.fc(self.dropout(x))  # (B, num_classes)


def _resnet(
    block: Block,
    layers: list[int],
    num_classes: int,
    stem: str,
    width: int,
    in_channels: int,
    dropout: float,
    zero_init_residual: bool,
) -> ResNet:
    return ResNet(
        block,
        layers,
        num_classes,
        stem=stem,
        width=width,
        in_channels=in_channels,
        dropout=dropout,
        zero_init_residual=zero_init_residual,
    )


def resnet18(
    num_classes: int = 1000,
    stem: str = "imagenet",
    width: int = 64,
    in_channels: int = 3,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, stem, width, in_channels, dropout, zero_init_residual)


def resnet34(
    num_classes: int = 1000,
    stem: str = "imagenet",
    width: int = 64,
    in_channels: int = 3,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, stem, width, in_channels, dropout, zero_init_residual)


def resnet50(
    num_classes: int = 1000,
    stem: str = "imagenet",
    width: int = 64,
    in_channels: int = 3,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, stem, width, in_channels, dropout, zero_init_residual)


def simple_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 32, dropout: float = 0.0) -> nn.Sequential:
    """The 4-conv baseline of the CIFAR-10 ResNet-18 notebook: what the residual connections are measured against.

    Four conv3x3-BN-ReLU stages of width w, 2w, 4w, 8w, 2x2 max-pool after the first three, global
    average pool, linear. No residuals and no special init, on purpose: it is the plain reference.
    """
    _check_common(num_classes, in_channels, width, dropout)

    def stage(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)] + (
            [nn.MaxPool2d(2)] if pool else []
        )

    w = width
    features = nn.Sequential(
        *stage(in_channels, w, True), *stage(w, 2 * w, True), *stage(2 * w, 4 * w, True), *stage(4 * w, 8 * w, False)
    )  # (B, 8w, H/8, W/8)
    classifier = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, 8w)
        nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        nn.Linear(8 * w, num_classes),
    )
    return nn.Sequential(features, classifier)


_RESNETS: dict[str, Callable[..., ResNet]] = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


def build_model(
    name: str,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: str = "imagenet",
    width: int | None = None,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
) -> nn.Module:
    """Build a model by name (one of MODELS), as the CLI does.

    width=None means the model's own default (64 for the ResNets, 32 for simple_cnn). simple_cnn has
    no stem and no residual blocks, so it ignores `stem` and `zero_init_residual` (both still validated).
    """
    _check("model", name, name in MODELS, f"one of {', '.join(MODELS)}")
    _check("stem", stem, stem in STEMS, f"one of {', '.join(STEMS)}")
    if name == "simple_cnn":
        return simple_cnn(num_classes, in_channels, 32 if width is None else width, dropout)
    return _RESNETS[name](num_classes, stem, 64 if width is None else width, in_channels, dropout, zero_init_residual)


def model_for(cfg, num_classes: int, channels: int) -> nn.Module:
    """The network a training config (resnet_dist.config.TrainConfig) describes, freshly initialised: what the
    trainer trains and what evaluate, predict and export load a checkpoint into."""
    return build_model(
        cfg.model,
        num_classes=num_classes,
        in_channels=channels,
        stem=cfg.stem,
        width=cfg.width or None,
        dropout=cfg.dropout,
        zero_init_residual=cfg.zero_init_residual,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
