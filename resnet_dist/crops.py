"""Per-sample crops for images of any size: what the loader workers make of each image.

A crop is a `Plan`: take a box of the source image, resize it to (out_h, out_w) with antialiasing,
cut a res x res window out of that, maybe mirror it. Training draws the box with RandomResizedCrop's
law; evaluation resizes the shorter side to res / crop_ratio and takes the centre (torchvision's
Resize + CenterCrop). The same plan runs on the CPU in a loader worker or, with --decode gpu, on the
GPU after a batched decode (resnet_dist.gpu_decode), so both decode paths see the same crops.

Reduced-size decoding: when the box holds at least 2x (4x, 8x) the pixels the resize keeps, a JPEG
is decoded at 1/2 (1/4, 1/8) scale by libjpeg's DCT scaling (PIL's `draft`), which skips most of the
inverse DCT and colour conversion; the box is mapped into the smaller image. FFCV and DALI decode
this way; the result differs from a full decode by resampling noise only (tests/test_crops.py).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from resnet_dist.errors import DataError

TRIES = 10  # torchvision's RandomResizedCrop.get_params tries 10 boxes, then falls back to the centre
DRAWS = 4 * TRIES + 1  # uniform numbers per sample: (area, aspect, top, left) per try, and the flip
RES_STEP = 32  # progressive resizing moves in multiples of 32 px (FFCV's rule)
REDUCTIONS = (8, 4, 2)  # the scales libjpeg decodes to, as PIL's draft offers them
SEED_TAG = 0xC409  # keeps the crop draws apart from the shuffle's, which share (seed, epoch, rank)


@dataclass(frozen=True)
class CropSpec:
    """What workers make of every image: `mode` rrc (train) or center (eval or train), `res` px square."""

    mode: str
    res: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_ratio: float = 0.875
    flip: bool = False


class Plan(NamedTuple):
    """Box (top, left, height, width) of the source -> resized to (out_h, out_w) -> res x res window at
    (crop_top, crop_left) -> mirrored if flip."""

    top: int
    left: int
    height: int
    width: int
    out_h: int
    out_w: int
    crop_top: int
    crop_left: int
    flip: bool


def rrc_box(height: int, width: int, u: np.ndarray, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws it, from uniforms u[TRIES, 4].

    Each try draws an area fraction uniformly in `scale` and a log-uniform aspect in `ratio`; the
    first box that fits wins, at a uniform position; if none fits, the centre crop of the largest
    box with an aspect inside `ratio`.
    """
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    aspect = np.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    w, h = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    fits = np.flatnonzero((w > 0) & (w <= width) & (h > 0) & (h <= height))
    if fits.size:
        k = fits[0]
        h_k, w_k = int(h[k]), int(w[k])
        return int(u[k, 2] * (height - h_k + 1)), int(u[k, 3] * (width - w_k + 1)), h_k, w_k
    shape = width / height
    if shape < min(ratio):
        w_c, h_c = width, int(round(width / min(ratio)))
    elif shape > max(ratio):
        h_c, w_c = height, int(round(height * max(ratio)))
    else:
        h_c, w_c = height, width
    return (height - h_c) // 2, (width - w_c) // 2, h_c, w_c


def rrc_plan(height: int, width: int, spec: CropSpec, u: np.ndarray) -> Plan:
    """A training plan from one sample's DRAWS uniforms."""
    top, left, h, w = rrc_box(height, width, u[: 4 * TRIES].reshape(TRIES, 4), spec.scale, spec.ratio)
    return Plan(top, left, h, w, spec.res, spec.res, 0, 0, bool(spec.flip and u[4 * TRIES] < 0.5))


def center_plan(height: int, width: int, spec: CropSpec, u: np.ndarray | None = None) -> Plan:
    """torchvision's Resize(round(res / crop_ratio)) + CenterCrop(res): the same output size and window.

    With `u` and spec.flip (center-crop training) the last uniform mirrors it.
    """
    short = round(spec.res / spec.crop_ratio)
    if height <= width:
        out_h, out_w = short, int(short * width / height)
    else:
        out_h, out_w = int(short * height / width), short
    flip = bool(spec.flip and u is not None and u[4 * TRIES] < 0.5)
    top, left = int(round((out_h - spec.res) / 2.0)), int(round((out_w - spec.res) / 2.0))
    return Plan(0, 0, height, width, out_h, out_w, top, left, flip)


def make_plan(height: int, width: int, spec: CropSpec, u: np.ndarray | None) -> Plan:
    return rrc_plan(height, width, spec, u) if spec.mode == "rrc" else center_plan(height, width, spec, u)


def batch_draws(seed: int, epoch: int, batch: int, n: int) -> np.ndarray:
    """The uniforms of one batch's crops, [n, DRAWS]: a function of where the batch is in the run only
    (`batch`: the global micro-batch, data.micro_batch), so a resumed run, on another worker count,
    process count or accumulation, draws the same crops for the same batch."""
    return np.random.default_rng([seed, epoch, batch, SEED_TAG]).random((n, DRAWS))


def reduction(plan: Plan) -> int:
    """The largest DCT scale (8, 4, 2) at which the box still has at least the pixels it is resized to."""
    for s in REDUCTIONS:
        if plan.height >= s * plan.out_h and plan.width >= s * plan.out_w:
            return s
    return 1


# --- sizes from headers ---------------------------------------------------------------------------
# A plan needs the image's size before the pixels: read it from the header (a few microseconds)
# rather than opening the image with PIL (~30 us, a tenth of a small JPEG's decode).

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame segment; None if the markers do not lead to one."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in JPEG_SOF:
            if pos + 9 > end:
                return None
            return int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big")
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def image_size(data: bytes, where: str) -> tuple[int, int]:
    """(height, width) of an encoded image: from the JPEG or PNG header, else from PIL's lazy open."""
    size = None
    if data[:2] == b"\xff\xd8":
        size = jpeg_size(data)
    elif data[:8] == PNG_MAGIC and data[12:16] == b"IHDR":
        size = int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if size is None or min(size) <= 0:
        try:
            with Image.open(io.BytesIO(data)) as img:
                size = img.size[1], img.size[0]
        except Exception as exc:  # PIL raises many types for damaged data
            raise DataError(f"{where}: image does not decode ({exc})") from exc
    return size


# --- decode and resample --------------------------------------------------------------------------


def decode_reduced(data: bytes, channels: int, s: int, where: str) -> tuple[np.ndarray, int]:
    """A JPEG decoded at 1/s scale by libjpeg (uint8 HxWxC), and the scale it actually got (1 if the
    decoder could not scale)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            img.draft(img.mode, (width // s, height // s))
            got = img.size
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for damaged data
        raise DataError(f"{where}: image does not decode ({exc})") from exc
    if got != (-(-width // s), -(-height // s)):
        s = 1 if got == (width, height) else s
    return (array[:, :, None] if array.ndim == 2 else array), s


def resize_crop(image: torch.Tensor, plan: Plan, res: int, s: int = 1, float_math: bool | None = None) -> torch.Tensor:
    """Run a plan on a uint8 (C, H, W) image decoded at 1/s scale; uint8 (C, res, res) out.

    Resampling is bilinear with antialiasing (PIL's and torchvision's antialias=True filter): uint8
    arithmetic on the CPU (torch's vectorised path, within 1 level of PIL), float elsewhere (CUDA has
    no uint8 antialias kernel), rounded back to uint8.
    """
    _, h_img, w_img = image.shape
    top, left = min(round(plan.top / s), h_img - 1), min(round(plan.left / s), w_img - 1)
    bottom = min(max(round((plan.top + plan.height) / s), top + 1), h_img)
    right = min(max(round((plan.left + plan.width) / s), left + 1), w_img)
    box = image[:, top:bottom, left:right]
    if box.shape[1:] != (plan.out_h, plan.out_w):
        x = box[None]
        float_math = image.device.type != "cpu" if float_math is None else float_math
        if float_math:
            x = x.float()
        x = F.interpolate(x, size=(plan.out_h, plan.out_w), mode="bilinear", antialias=True, align_corners=False)
        box = (x.round().clamp(0, 255).to(torch.uint8) if float_math else x)[0]
    window = box[:, plan.crop_top : plan.crop_top + res, plan.crop_left : plan.crop_left + res]
    return window.flip(2) if plan.flip else window


# --- progressive resizing -------------------------------------------------------------------------


@dataclass(frozen=True)
class ResSchedule:
    """--res-schedule START:END[:EPOCHS]: START up to epoch `hold`, END from epoch `reach` (0-based),
    linear in between, rounded to multiples of 32 (FFCV's min_res, max_res, start_ramp, end_ramp)."""

    start: int
    end: int
    hold: int
    reach: int | None  # None: the run's last epoch

    def at(self, epoch: int, epochs: int) -> int:
        reach = epochs - 1 if self.reach is None else self.reach
        if epoch >= reach:
            return self.end
        if epoch <= self.hold:
            return self.start
        value = np.interp(epoch, [self.hold, reach], [self.start, self.end])
        return int(np.round(value / RES_STEP)) * RES_STEP


def parse_res_schedule(text: str) -> ResSchedule:
    """START:END, START:END:N (END reached at 0-based epoch N) or START:END:A-B (START through epoch A,
    END from epoch B). ValueError with the reason on anything else."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError("expected START:END or START:END:EPOCHS")
    try:
        start, end = int(parts[0]), int(parts[1])
        hold, reach = 0, None
        if len(parts) == 3:
            a, _, b = parts[2].rpartition("-")
            hold, reach = (int(a) if a else 0), int(b)
    except ValueError:
        raise ValueError("START, END and EPOCHS must be integers") from None
    if min(start, end) < RES_STEP or start % RES_STEP or end % RES_STEP:
        raise ValueError(f"START and END must be positive multiples of {RES_STEP}")
    if reach is not None and not 0 <= hold < reach:
        raise ValueError("EPOCHS must be N > 0 or A-B with 0 <= A < B")
    return ResSchedule(start, end, hold, reach)


# --- from the training config ---------------------------------------------------------------------


def parse_range(text: str) -> tuple[float, float]:
    """'0.08,1' or '3/4,4/3' -> (low, high); ValueError if it is not two numbers."""
    values = [float(Fraction(part.strip())) for part in text.split(",")]
    if len(values) != 2:
        raise ValueError(text)
    return values[0], values[1]


def train_res(cfg, image_size: tuple[int, int] | None, epoch: int) -> int:
    """The side of epoch `epoch`'s training crops: the schedule's, else --res, else the images' one size."""
    if cfg.res_schedule:
        return parse_res_schedule(cfg.res_schedule).at(epoch, cfg.epochs)
    if cfg.res:
        return cfg.res
    return min(image_size) if image_size else 0


def train_crop_spec(cfg, image_size: tuple[int, int] | None, epoch: int = 0) -> CropSpec | None:
    """What the workers make of a train image (None: --train-crop pad, decoded as it is)."""
    if cfg.train_crop == "pad":
        return None
    return CropSpec(
        cfg.train_crop,
        train_res(cfg, image_size, epoch),
        parse_range(cfg.rrc_scale),
        parse_range(cfg.rrc_ratio),
        cfg.crop_ratio,
        cfg.flip,
    )


def eval_crop_spec(cfg, image_size: tuple[int, int] | None) -> CropSpec | None:
    """Evaluation's centre crop at --eval-res, else the last training resolution (None: --train-crop pad)."""
    if cfg.train_crop == "pad":
        return None
    return CropSpec("center", cfg.eval_res or train_res(cfg, image_size, cfg.epochs - 1), crop_ratio=cfg.crop_ratio)
