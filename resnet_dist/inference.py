"""From a checkpoint folder to a model ready to run: what evaluate, predict and export share.

Only `meta.json` (JSON) and the safetensors weights are read: the pickle-based `state.pt` of a checkpoint
is never opened, so using a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from resnet_dist.checkpoint import WEIGHTS_CHOICES, find_checkpoint, load_inference_weights
from resnet_dist.config import TrainConfig
from resnet_dist.crops import CropSpec, Plan, center_plan, eval_crop_spec, image_size, resize_crop
from resnet_dist.data import crop_image, decode_image
from resnet_dist.errors import DataError, UsageError
from resnet_dist.models import model_for


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


# --- a checkpoint on its own: predict and export (no shards) ----------------------------------------


WEIGHT_NAMES = {"ema": "EMA weights", "raw": "raw weights"}


def load_for_inference(checkpoint: Path, meta: dict, which: str = "auto") -> tuple[torch.nn.Module, str]:
    """(model in eval mode, "ema" or "raw") from the checkpoint alone. The input channels are meta.json's,
    or, for checkpoints written before meta.json held them, the first convolution's."""
    cfg = config_of(meta)
    weights, kind = load_inference_weights(checkpoint, which)
    channels = meta.get("channels")
    if not isinstance(channels, int):
        channels = stem_channels(model_for(cfg, len(meta["classes"]), 3), weights)[1]
    model = model_for(cfg, len(meta["classes"]), channels)
    fill(model, weights, checkpoint, cfg)
    return model.eval(), kind


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: `channels`, and either the eval crop of an rrc/center run (`crop`) or the one
    image size (height, width) of a pad run (`size`)."""

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: CropSpec | None
    size: tuple[int, int]

    def describe(self) -> str:
        h, w = self.size
        if self.crop is None:
            return f"{w}x{h} as they are; other sizes resized (shorter side) and centre-cropped to {w}x{h}"
        short = round(self.crop.res / self.crop.crop_ratio)
        return f"shorter side resized to {short}, centre {self.crop.res}x{self.crop.res}"


def input_spec(meta: dict, model: torch.nn.Module, res: int = 0) -> InputSpec:
    """The run's evaluation input, from meta.json; `res` (--res) where the checkpoint does not say."""
    cfg = config_of(meta)
    channels = next(v for v in model.state_dict().values() if v.ndim == 4).shape[1]
    size = meta.get("image_size")
    size = tuple(size) if isinstance(size, list) and len(size) == 2 else None
    crop = eval_crop_spec(cfg, size)
    if crop is not None and crop.res == 0 and res:
        crop = dataclasses.replace(crop, res=res)
    if crop is None and size is None and res:
        size = (res, res)
    side = crop.res if crop is not None else size
    if not side:
        raise UsageError("the checkpoint does not say its image size (written before meta.json held it): pass --res N")
    stats = [tuple(float(v) for v in meta.get(k) or ()) for k in ("mean", "std")]
    if not len(stats[0]) == len(stats[1]) == channels and not len(stats[0]) == len(stats[1]) == 1:
        raise DataError(f"meta.json: mean/std do not fit {channels}-channel images")
    square = (crop.res, crop.res) if crop is not None else size
    return InputSpec(int(channels), stats[0], stats[1], crop, square)


def prepare(data: bytes, spec: InputSpec, where: str) -> np.ndarray:
    """Encoded image -> uint8 HxWxC as evaluate's loader makes it from a shard sample (data.ShardStream):
    the same decoder, mode conversion, resize and crop. DataError if it does not decode."""
    if spec.crop is not None:
        size = image_size(data, where)
        return crop_image(data, spec.channels, size, center_plan(*size, spec.crop), spec.crop.res, where)
    array = decode_image(data, spec.channels, None, where)
    if array.shape[:2] == spec.size:
        return array
    return cover(array, spec.size)


def cover(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (antialiased bilinear, as the crops are) so the image covers `size`, then take the centre."""
    h, w = array.shape[:2]
    th, tw = size
    scale = max(th / h, tw / w)
    out_h, out_w = max(th, round(h * scale)), max(tw, round(w * scale))
    plan = Plan(0, 0, h, w, out_h, out_w, 0, 0, False)
    image = torch.from_numpy(np.require(array, requirements="W")).permute(2, 0, 1)
    big = resize_crop(image, plan, max(out_h, out_w))
    top, left = (out_h - th) // 2, (out_w - tw) // 2
    return big[:, top : top + th, left : left + tw].permute(1, 2, 0).contiguous().numpy()


def add_model_args(parser: argparse.ArgumentParser, res: bool = True) -> None:
    """--weights (evaluate, predict, export) and --res (predict, export): which weights, and the input side
    of older checkpoints whose meta.json does not record it."""
    parser.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHTS_CHOICES,
        help="auto: the EMA weights (ema.safetensors) when the checkpoint has them, else model.safetensors; "
        "ema: insist on the EMA weights; raw: model.safetensors",
    )
    if res:
        parser.add_argument(
            "--res", type=int, default=0, help="input side for checkpoints whose meta.json does not say (older runs)"
        )
