"""Batch transforms on the training device: uint8 NHWC in, normalised float NCHW out.

Per-sample transforms in loader workers (the notebooks' RandomCrop/RandomHorizontalFlip/ToTensor/
Normalize) cost more CPU than decoding; one gather over the whole batch on the device costs almost
nothing (airbench, FFCV and timm's prefetcher do the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def crop_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of each zero-padded image back to its size, and a random horizontal flip.

    images: uint8 (N, H, W, C). Equivalent to torchvision's RandomCrop(size, padding) followed by
    RandomHorizontalFlip(), drawn independently per sample, in one indexing op.
    """
    if padding <= 0 and not flip:
        return images  # nothing to draw: the gather below would only copy
    n, h, w, _ = images.shape
    device = images.device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if padding > 0:
        images = F.pad(images, (0, 0, padding, padding, padding, padding))  # (C, W, H) pads, zeros
        shift = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator, device="cpu").to(device)
        rows, cols = rows + shift[0], cols + shift[1]
    if flip:
        mirrored = torch.rand(n, 1, generator=generator, device="cpu").to(device) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)


def normalize(
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (N, H, W, C) -> (x / 255 - mean) / std as (N, C, H, W).

    The NHWC buffer permuted to NCHW *is* channels_last memory, so that layout costs no copy.
    mean, std: (C,) on the [0, 1] scale, as index.json stores them.

    Computed on rows of W x C values, with scale and shift repeated along a row: a per-channel
    broadcast over the innermost dimension of 3 does not vectorise, and was 3x slower on a CPU
    (59 vs 18 ms for 64 x 224 x 224 x 3, one thread; the uint8 -> float conversion alone takes 15).
    """
    n, h, w, c = images.shape
    x = images.reshape(n * h, w * c).to(dtype, copy=True)  # never the caller's tensor: x is changed in place
    mean, std = mean.expand(c), std.expand(c)  # a single value serves every channel
    x.mul_((1.0 / (255.0 * std)).to(dtype).repeat(w)).add_((-mean / std).to(dtype).repeat(w))
    x = x.view(n, h, w, c).permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def random_erase(
    x: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    scale=(0.02, 0.33),
    ratio=(0.3, 3.3),
    tries: int = 10,
) -> torch.Tensor:
    """Zero a random rectangle of each normalised image with probability p (0 is the dataset mean).

    x: float (N, C, H, W). The same draw as torchvision's RandomErasing(p, scale, ratio, value=0) per
    sample: up to `tries` (area, aspect) draws, the first whose rectangle fits strictly inside the image
    wins, and an image where none fits is left whole; all samples and tries are drawn at once.
    """
    n, _, h, w = x.shape
    draw = torch.rand(5, n, tries, generator=generator, device="cpu")  # area, aspect, top, left; row 4: p
    area = h * w * (scale[0] + (scale[1] - scale[0]) * draw[0])
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draw[1])
    eh, ew = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (eh < h) & (ew < w)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    eh, ew = pick(eh), pick(ew)
    top, left = torch.floor(pick(draw[2]) * (h - eh + 1)), torch.floor(pick(draw[3]) * (w - ew + 1))
    erase = fits.any(1) & (draw[4, :, 0] < p)
    # Only the 5 numbers per image cross to the device; the (N, H, W) mask is built there.
    top, eh, left, ew, erase = (t.to(x.device).view(n, 1, 1) for t in (top, eh, left, ew, erase))
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & erase
    return x.masked_fill(inside.unsqueeze(1), 0.0)


@contextmanager
def intra_op_threads(device: torch.device, threads: int) -> Iterator[None]:
    """Run the block with `threads` intra-op threads when `device` is the CPU (0: leave torch's setting).

    The batch transforms are gathers and elementwise passes over a few MB: one thread does them in about
    a millisecond, while torch's default of one thread per core makes every op wait for all cores; on
    a loaded machine (loader workers, other processes) that wait grows to tens of milliseconds per batch
    (docs/performance.md, section 7). The model's step keeps its threads.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or threads <= 0 or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BatchAugment:
    """The train-time (crop + flip + normalise [+ erase]) and eval-time (normalise) transforms of one dataset.

    On a CPU device they run with `cpu_threads` intra-op threads (1 by default; 0 keeps torch's own
    setting): see intra_op_threads.
    """

    def __init__(
        self,
        mean,
        std,
        device: torch.device,
        padding: int = 4,
        flip: bool = True,
        channels_last: bool = True,
        erase: float = 0.0,
        cpu_threads: int = 1,
    ):
        self.erase, self.cpu_threads = erase, cpu_threads
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device)
        self.padding, self.flip, self.channels_last = padding, flip, channels_last

    def train(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        with intra_op_threads(self.mean.device, self.cpu_threads):
            x = crop_flip(images, self.padding, self.flip, generator)
            x = normalize(x, self.mean, self.std, self.channels_last)
            return random_erase(x, self.erase, generator) if self.erase > 0 else x

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        with intra_op_threads(self.mean.device, self.cpu_threads):
            return normalize(images, self.mean, self.std, self.channels_last)
