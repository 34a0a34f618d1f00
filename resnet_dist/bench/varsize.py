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


def ours(
    base: Path, index: DatasetIndex, batch: int, workers: int, epoch: int, train: bool, normalise: bool = True
) -> Iterator:
    """Crops made in the workers (uint8), normalised here as the trainer does it (normalise=False: the
    workers' share alone, what a GPU run leaves on the CPU)."""
    from resnet_dist.data import ShardStream, make_loader

    spec = CropSpec("rrc", RES, flip=True) if train else CropSpec("center", RES, crop_ratio=RES / EVAL_RESIZE)
    split = "train"  # the eval rows crop the train images the eval way: the same files on both sides
    stream = ShardStream(
        str(base), index, split, batch_size=batch, rank=0, world_size=1, train=train, seed=epoch, crop=spec
    )
    stream.set_epoch(epoch)
    augment = BatchAugment(index.mean, index.std, device(), padding=0, flip=False)
    for images, labels, *_ in make_loader(stream, workers, pin_memory=torch.cuda.is_available()):
        yield (augment.eval(images.to(device(), non_blocking=True)) if normalise else images), labels


def gpu_worker_side(base: Path, index: DatasetIndex, batch: int, epoch: int) -> Iterator:
    """--decode gpu's CPU share alone: read, check, header, crop plan, bytes out (nvJPEG's decode not counted)."""
    from resnet_dist.data import ShardStream

    spec = CropSpec("rrc", RES, flip=True)
    stream = ShardStream(
        str(base),
        index,
        "train",
        batch_size=batch,
        rank=0,
        world_size=1,
        train=True,
        seed=epoch,
        crop=spec,
        decode="gpu",
    )
    stream.set_epoch(epoch)
    for encoded, labels, *_ in stream:
        yield torch.empty(len(encoded)), labels  # time_batches counts images by the first dimension


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
    from resnet_dist.bench.loader import imagefolder_batches, time_batches, webdataset_batches

    def reference(train: bool) -> Iterator:  # torchvision's reference pipeline over the same JPEG files
        return imagefolder_batches(tree, index, batch, workers, reference_transform(index, train), shuffle=train)

    batch, w, n, epochs = args.batch_size or 64, args.warmup, args.batches, count(1)
    timers = {
        "ours": lambda: time_batches(ours(base, index, batch, workers, next(epochs), True), w, n),
        "reference": lambda: time_batches(reference(True), w, n),
        "webdataset": lambda: time_batches(
            webdataset_batches(base, index, batch, workers, reference_transform(index, True)), w, n
        ),
        "ours eval": lambda: time_batches(ours(base, index, batch, workers, 0, False), w, n),
        "reference eval": lambda: time_batches(reference(False), w, n),
    }
    if workers:
        return timers
    timers |= {
        "ours uint8": lambda: time_batches(ours(base, index, batch, 0, next(epochs), True, False), w, n),
        "ours eval uint8": lambda: time_batches(ours(base, index, batch, 0, 0, False, False), w, n),
        "ours gpu": lambda: time_batches(gpu_worker_side(base, index, batch, next(epochs)), w, n),
    }
    return {name: one_thread(timer) for name, timer in timers.items()}


# Per core, as the other kinds' per-core rows: ours is what one loader worker does (uint8 crops out; the
# training device normalises); "+ normalise on the CPU" adds what a CPU-only run also pays.
PER_CORE = (
    ("train", "ours uint8", "reference", "ours: the workers' share, decode + crop + flip to uint8"),
    ("train", "ours uint8", "webdataset", "ours: the workers' share, decode + crop + flip to uint8"),
    ("eval", "ours eval uint8", "reference eval", "ours: the workers' share, decode + resize + centre crop"),
    ("train, + normalise on the CPU", "ours", "reference", "ours: as a CPU-only run does it"),
    ("eval, + normalise on the CPU", "ours eval", "reference eval", "ours: as a CPU-only run does it"),
    (
        "train, --decode gpu worker side",
        "ours gpu",
        "reference",
        "ours: the CPU side of --decode gpu only (JPEG decode and resize happen on the GPU, not timed here)",
    ),
)
THROUGH_LOADER = (
    ("train", "ours", "reference", "ours: crops in the workers, normalised in the training process"),
    ("train", "ours", "webdataset", "ours: crops in the workers, normalised in the training process"),
    ("eval", "ours eval", "reference eval", "ours: crops in the workers, normalised in the training process"),
)


def varsize_rows(args, kind: str, base: Path, index: DatasetIndex, tree: Path) -> list[dict]:
    """Train and eval rows: per core, then through the DataLoader with each --workers count."""
    rows = []
    for workers in (0, *[w for w in args.workers if w]):
        rates = interleaved(pipeline_timers(args, base, index, tree, workers), args.repeats)
        case = f"{kind} per core" if not workers else f"{kind} {workers} worker{'s' if workers != 1 else ''}"
        for what, mine, theirs, note in PER_CORE if not workers else THROUGH_LOADER:
            rows.append(
                make_row("loader", f"{case}, {what}", rates[mine], rates[theirs], NAMES[theirs], "img/s", note=note)
            )
        say(rows[-len(PER_CORE if not workers else THROUGH_LOADER) :])
    return rows
