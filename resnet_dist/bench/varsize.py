"""The loader suite's case for images of any size (photo224): ImageNet's workload at 224 px.

Ours: ShardStream workers read each JPEG's size from its header, draw a RandomResizedCrop, decode (at
1/2, 1/4 or 1/8 scale where the crop allows) and resample to a uint8 224x224 crop; the training
process normalises the batch. Against torchvision's reference pipeline (ImageFolder over the same
JPEG files + RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize in DataLoader
workers) and a plain WebDataset pipeline over the same shards with the same transforms. Evaluation:
ours (resize the shorter side to 256, centre 224, in the workers) against Resize(256) + CenterCrop(224)
+ ToTensor + Normalize. "per core" runs each pipeline in this process with one thread: images per
CPU-second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path

import torch

from resnet_dist.augment import BatchAugment
from resnet_dist.bench.common import device, interleaved, make_row, say
from resnet_dist.crops import CropSpec
from resnet_dist.index import DatasetIndex

RES, EVAL_RESIZE = 224, 256
NAMES = {
    "reference": "torchvision reference: ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize",
    "webdataset": "WebDataset + the same per-sample transforms",
    "reference eval": "torchvision reference: ImageFolder + Resize(256) + CenterCrop(224) + ToTensor + Normalize",
}


def reference_transform(index: DatasetIndex, train: bool):
    from torchvision import transforms as T

    crop = [T.RandomResizedCrop(RES), T.RandomHorizontalFlip()] if train else [T.Resize(EVAL_RESIZE), T.CenterCrop(RES)]
    return T.Compose([*crop, T.ToTensor(), T.Normalize(index.mean, index.std)])


def ours(base: Path, index: DatasetIndex, batch: int, workers: int, epoch: int, train: bool) -> Iterator:
    """Crops made in the workers (uint8), normalised here, as the trainer does it."""
    from resnet_dist.data import ShardStream, make_loader

    spec = CropSpec("rrc", RES, flip=True) if train else CropSpec("center", RES, crop_ratio=RES / EVAL_RESIZE)
    split = "train"  # the eval rows crop the train images the eval way: the same files on both sides
    stream = ShardStream(
        str(base), index, split, batch_size=batch, rank=0, world_size=1, train=train, seed=epoch, crop=spec
    )
    stream.set_epoch(epoch)
    augment = BatchAugment(index.mean, index.std, device(), padding=0, flip=False)
    for images, labels, *_ in make_loader(stream, workers, pin_memory=torch.cuda.is_available()):
        yield augment.eval(images.to(device(), non_blocking=True)), labels


def reference(tree: Path, index: DatasetIndex, batch: int, workers: int, train: bool) -> Iterator:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(tree), transform=reference_transform(index, train))
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=train,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
    )
    for images, labels in loader:
        yield images.to(device(), non_blocking=True), labels


def webdataset(base: Path, index: DatasetIndex, batch: int, workers: int) -> Iterator:
    import webdataset as wds
    from torch.utils.data import DataLoader

    urls = [str(base / s.file) for s in index.splits["train"].shards]
    pipeline = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg;jpeg;png", "cls")
        .map_tuple(reference_transform(index, True), int)
        .batched(batch, partial=False)
    )
    loader = DataLoader(
        pipeline,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
    )
    for images, labels in loader:
        yield images.to(device(), non_blocking=True), labels


def one_thread(timer: Callable[[], float]) -> Callable[[], float]:
    """The timer run with one intra-op thread: what one core does (the DataLoader's workers have one too)."""

    def run() -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return timer()
        finally:
            torch.set_num_threads(before)

    return run


def pipeline_timers(args, base: Path, index: DatasetIndex, tree: Path, workers: int) -> dict[str, Callable[[], float]]:
    from resnet_dist.bench.loader import time_batches

    batch, w, n, epochs = args.batch_size or 64, args.warmup, args.batches, count(1)
    timers = {
        "ours": lambda: time_batches(ours(base, index, batch, workers, next(epochs), True), w, n),
        "reference": lambda: time_batches(reference(tree, index, batch, workers, True), w, n),
        "webdataset": lambda: time_batches(webdataset(base, index, batch, workers), w, n),
        "ours eval": lambda: time_batches(ours(base, index, batch, workers, 0, False), w, n),
        "reference eval": lambda: time_batches(reference(tree, index, batch, workers, False), w, n),
    }
    return timers if workers else {name: one_thread(timer) for name, timer in timers.items()}


def varsize_rows(args, kind: str, base: Path, index: DatasetIndex, tree: Path) -> list[dict]:
    """Train and eval rows: per core, then through the DataLoader with each --workers count."""
    rows = []
    for workers in (0, *[w for w in args.workers if w]):
        rates = interleaved(pipeline_timers(args, base, index, tree, workers), args.repeats)
        case = f"{kind} per core" if not workers else f"{kind} {workers} worker{'s' if workers != 1 else ''}"
        for baseline in ("reference", "webdataset"):
            rows.append(make_row("loader", f"{case}, train", rates["ours"], rates[baseline], NAMES[baseline], "img/s"))
        eval_name = NAMES["reference eval"]
        rows.append(
            make_row("loader", f"{case}, eval", rates["ours eval"], rates["reference eval"], eval_name, "img/s")
        )
        say(rows[-3:])
    return rows
