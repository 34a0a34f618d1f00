"""--decode gpu: loader workers send JPEG bytes and crop plans; the training process decodes a whole
batch at once with nvJPEG (torchvision.io.decode_jpeg(device="cuda")) and runs the plans on the GPU.

The workers still read the shards, check them, shuffle, read each image's size from its header and
draw its crop (resnet_dist.crops), so the batches hold the same samples with the same crops as with
CPU decoding; only the pixels' path differs. What leaves a worker is the encoded bytes (a 400x350
JPEG is ~30 KB against 150 KB of decoded 224 px pixels), and the CPU cost per image is the header
read instead of the decode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from itertools import cycle, islice

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from resnet_dist.crops import Plan, resize_crop
from resnet_dist.errors import DataError


@dataclass
class EncodedBatch:
    """A batch of encoded JPEGs (uint8 1-D tensors) and the crop plan of each; `res` px out."""

    payloads: list[torch.Tensor]
    plans: list[Plan]
    res: int
    channels: int
    where: list[str]

    def __len__(self) -> int:
        return len(self.payloads)

    def pin_memory(self, device=None) -> EncodedBatch:
        """The DataLoader pins what it returns; these bytes reach the GPU through nvJPEG, so as they are."""
        return self


def encoded_batch(items: list, res: int, channels: int) -> tuple[EncodedBatch, torch.Tensor]:
    """Worker side: (Encoded, label) items -> an EncodedBatch and int64 labels."""
    payloads = [torch.frombuffer(bytearray(e.data), dtype=torch.uint8) for e, _ in items]
    batch = EncodedBatch(payloads, [e.plan for e, _ in items], res, channels, [e.where for e, _ in items])
    return batch, torch.tensor([label for _, label in items], dtype=torch.int64)


def decode_images(batch: EncodedBatch, decode: Callable) -> tuple[list[torch.Tensor | None], list[str]]:
    """Decode the batch in one call; if that fails, one image at a time, so one bad JPEG costs only itself."""
    mode = ImageReadMode.GRAY if batch.channels == 1 else ImageReadMode.RGB
    try:
        return list(decode(batch.payloads, mode=mode)), []
    except RuntimeError:
        pass
    images, problems = [], []
    for payload, where in zip(batch.payloads, batch.where):
        try:
            images.append(decode(payload, mode=mode))
        except RuntimeError as exc:
            images.append(None)
            problems.append(f"{where}: image does not decode on the GPU ({str(exc).splitlines()[0]}); sample skipped")
    return images, problems


def decode_batch(
    batch: EncodedBatch,
    labels: torch.Tensor,
    device: torch.device,
    train: bool,
    strict: bool = False,
    decode: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, list[str]]:
    """(uint8 NHWC on `device`, labels, lost, problems): the batch decoded and cropped on the device.

    `decode` is decode_jpeg on `device` unless given (the CPU tests pass the CPU decoder: everything but
    the nvJPEG call runs as on a GPU). Images that do not decode are lost as in the workers: a train
    batch is refilled from its good images, an eval batch shrinks.
    """
    decode = decode or functools.partial(decode_jpeg, device=device)
    images, problems = decode_images(batch, decode)
    if problems and strict:
        raise DataError(problems[0])
    good = [i for i, image in enumerate(images) if image is not None]
    if train and len(good) < len(images):
        if not good:
            raise DataError(f"no readable sample to train on ({problems[0]})")
        good += list(islice(cycle(good), len(images) - len(good)))
    out = torch.empty((len(good), batch.res, batch.res, batch.channels), dtype=torch.uint8, device=device)
    for row, i in enumerate(good):
        out[row] = resize_crop(images[i].to(device), batch.plans[i], batch.res).permute(1, 2, 0)
    return out, labels[good].to(device, non_blocking=True), len(problems), problems


def batch_to_device(images, labels: torch.Tensor, device: torch.device, train: bool, strict: bool = False):
    """(images, labels, lost, problems) on the device, whichever form the loader delivered them in."""
    if isinstance(images, EncodedBatch):
        return decode_batch(images, labels, device, train, strict)
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True), 0, []
