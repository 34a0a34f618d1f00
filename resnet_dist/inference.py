"""From a checkpoint folder to a model ready to run: what evaluate, predict and export share.

Only `meta.json` (JSON) and the safetensors weights are read: the pickle-based `state.pt` of a checkpoint
is never opened, so using a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from resnet_dist.checkpoint import find_checkpoint
from resnet_dist.config import TrainConfig
from resnet_dist.errors import DataError, UsageError
from resnet_dist.models import build_model


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder as given, or a run folder's checkpoints/best, else checkpoints/last."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--checkpoint {path}: no such file or folder")
    found = find_checkpoint(path)
    if found is not None:
        return found
    for name in ("best", "last"):
        found = find_checkpoint(path / "checkpoints" / name)
        if found is not None:
            return found
    raise UsageError(
        f"--checkpoint {path}: neither a checkpoint folder (meta.json + model.safetensors) "
        f"nor a run folder holding checkpoints/best or checkpoints/last"
    )


def run_folder_of(checkpoint: Path) -> Path:
    """RUN_DIR of RUN_DIR/checkpoints/<name>; the checkpoint folder itself if it lives elsewhere."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def read_meta(checkpoint: Path) -> dict:
    try:
        meta = json.loads((checkpoint / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{checkpoint / 'meta.json'}: unreadable ({exc})") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("config"), dict)
        or not isinstance(meta.get("classes"), list)
    ):
        raise DataError(f"{checkpoint / 'meta.json'}: lacks the run's config and class names")
    return meta


def config_of(meta: dict) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in meta["config"].items() if k in known})


def stem_channels(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(name, input channels) of the first convolution's weight in the checkpoint."""
    name = next(k for k, v in model.state_dict().items() if v.ndim == 4)
    if name not in weights or weights[name].ndim != 4:
        raise DataError(f"checkpoint weights lack {name}: not a {type(model).__name__} checkpoint")
    return name, int(weights[name].shape[1])


def build_for(cfg: TrainConfig, num_classes: int, channels: int) -> torch.nn.Module:
    """The run's network, freshly initialised, as the trainer built it."""
    return build_model(
        cfg.model,
        num_classes=num_classes,
        in_channels=channels,
        stem=cfg.stem,
        width=cfg.width or None,
        dropout=cfg.dropout,
        zero_init_residual=cfg.zero_init_residual,
    )


def fill(model: torch.nn.Module, weights: dict[str, torch.Tensor], checkpoint: Path, cfg: TrainConfig) -> None:
    """Load `weights` into `model`, every key; a mismatch is one line naming the first difference."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise DataError(
            f"{checkpoint}: weights do not fit a {cfg.model} of width {cfg.width} "
            f"({first[1].strip() if len(first) > 1 else first[0]})"
        ) from None
