"""The loader suite: ready-to-train img/s of our shard loader against the pipelines a user would otherwise write.

Our loader (ShardStream workers decode to uint8, the batch is augmented on the device) vs torchvision
ImageFolder with the notebooks' per-sample transforms, vs a plain WebDataset pipeline with the same
transforms, vs the ceiling (the same batch augmentation over in-memory uint8); plus the per-core
decode + collate rate, what one loader worker delivers.
"""

from __future__ import annotations

import functools
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resnet_dist.augment import BatchAugment
from resnet_dist.bench.common import KINDS, device, interleaved, load_split, make_row, say
from resnet_dist.bench.varsize import varsize_rows
from resnet_dist.errors import UsageError
from resnet_dist.index import DatasetIndex

# The baselines each worker count is compared with, in the order the rows come out.
BASELINES = {
    "imagefolder": "ImageFolder + per-sample transforms",
    "webdataset": "WebDataset decode + per-sample transforms",
    "memory": "ceiling: batch augmentation of in-memory uint8",
}


def extract_imagefolder(base: Path, index: DatasetIndex, split: str, dest: Path) -> Path:
    """The split's images as files, dest/CLASS/KEY.EXT, bytes unchanged: the same images ImageFolder reads."""
    for name in index.classes:
        (dest / name).mkdir(parents=True, exist_ok=True)
    for shard in index.splits[split].shards:
        with tarfile.open(base / shard.file) as tar:
            labels, images = {}, {}
            for member in tar:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                data = tar.extractfile(member).read()
                if ext == "cls":
                    labels[key] = int(data)
                else:
                    images[key] = (ext, data)
            for key, (ext, data) in images.items():
                (dest / index.classes[labels[key]] / f"{key}.{ext}").write_bytes(data)
    return dest


def notebook_transform(index: DatasetIndex, padding: int):
    """The reference notebooks' per-sample train transforms."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomCrop(tuple(index.image_size), padding=padding),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(index.mean, index.std),
        ]
    )


def pil_open(path: str, mode: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert(mode)


def ours_batches(
    base: Path, index: DatasetIndex, batch: int, workers: int, epoch: int, augment: BatchAugment
) -> Iterator:
    """Our path: ShardStream workers decode to uint8, the batch is augmented on the device."""
    from resnet_dist.data import ShardStream, make_loader

    stream = ShardStream(str(base), index, "train", batch_size=batch, rank=0, world_size=1, train=True, seed=epoch)
    stream.set_epoch(epoch)
    generator = torch.Generator().manual_seed(epoch)
    for images, labels, *_ in make_loader(stream, workers, pin_memory=torch.cuda.is_available()):
        yield augment.train(images.to(augment.mean.device, non_blocking=True), generator), labels


def decode_batches(base: Path, index: DatasetIndex, batch: int, epoch: int) -> Iterator:
    """Our worker's work alone (decode + collate uint8), in this process: the per-core rate."""
    from resnet_dist.data import ShardStream

    stream = ShardStream(str(base), index, "train", batch_size=batch, rank=0, world_size=1, train=True, seed=epoch)
    stream.set_epoch(epoch)
    yield from ((images, labels) for images, labels, *_ in stream)  # drop the lost/problems fields


def imagefolder_batches(
    root: Path, index: DatasetIndex, batch: int, workers: int, transform, shuffle: bool = True
) -> Iterator:
    """The notebook path: ImageFolder + `transform` per sample in the workers, default collate."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    mode = "L" if index.channels == 1 else "RGB"  # ImageFolder's default loader would make gray images RGB
    dataset = ImageFolder(str(root), transform=transform, loader=functools.partial(pil_open, mode=mode))
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
    )
    for images, labels in loader:
        yield images.to(device(), non_blocking=True), labels


def webdataset_batches(base: Path, index: DatasetIndex, batch: int, workers: int, transform) -> Iterator:
    """A plain WebDataset pipeline as its docs show it: shuffle, decode to PIL, `transform` per sample, batch."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    urls = [str(base / s.file) for s in index.splits["train"].shards]
    image = "png;jpg;jpeg"
    pipeline = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(1000)
        .decode("pill" if index.channels == 1 else "pil")
        .to_tuple(image, "cls")
        .map_tuple(transform, int)
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


def memory_batches(
    images: torch.Tensor, labels: torch.Tensor, batch: int, epoch: int, augment: BatchAugment
) -> Iterator:
    """The ceiling: the same batch augmentation over uint8 already in memory (no decode at all)."""
    generator = torch.Generator().manual_seed(epoch)
    order = torch.randperm(len(labels), generator=generator)
    for i in range(0, len(order) - batch + 1, batch):
        take = order[i : i + batch]
        yield augment.train(images[take].to(augment.mean.device, non_blocking=True), generator), labels[take]


def time_batches(batches: Iterator, warmup: int, count: int) -> float:
    """Images per second over `count` batches after `warmup` (worker start-up and first fills excluded)."""
    try:
        for _ in range(warmup):
            next(batches)
        start, images = time.perf_counter(), 0
        for _ in range(count):
            x, _ = next(batches)
            images += x.shape[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return images / (time.perf_counter() - start)
    except StopIteration:
        raise UsageError(
            f"the data ran out before {warmup} + {count} batches: use fewer --batches, a smaller "
            f"--batch-size or more --samples"
        ) from None
    finally:
        batches.close()  # shuts the DataLoader's workers down now, not at garbage collection


@dataclass
class KindData:
    """One image kind, ready for every pipeline the suite times."""

    base: Path  # the shard folder
    index: DatasetIndex
    batch: int
    augment: BatchAugment
    tree: Path  # the train split as an ImageFolder tree
    images: torch.Tensor  # the train split decoded to uint8, in memory
    labels: torch.Tensor
    # A fresh epoch (new order, new worker processes) per timing.
    epochs: Iterator[int] = field(default_factory=lambda: iter(range(1, 1 << 30)))


def prepare(args, kind_name: str, base: Path, index: DatasetIndex, tmp: Path) -> KindData:
    batch = args.batch_size or KINDS.get(kind_name, KINDS["rgb32"]).batch
    augment = BatchAugment(index.mean, index.std, device(), args.padding)
    tree = extract_imagefolder(base, index, "train", tmp / f"imagefolder-{kind_name}")
    images, labels = load_split(base, index, "train")
    return KindData(base, index, batch, augment, tree, images, labels)


def pipeline_timers(args, d: KindData, workers: int) -> dict[str, Callable[[], float]]:
    """One timer per pipeline, each over a fresh loader with `workers` worker processes."""
    w, n = args.warmup, args.batches
    per_sample = notebook_transform(d.index, args.padding)
    return {
        "ours": lambda: time_batches(ours_batches(d.base, d.index, d.batch, workers, next(d.epochs), d.augment), w, n),
        "imagefolder": lambda: time_batches(imagefolder_batches(d.tree, d.index, d.batch, workers, per_sample), w, n),
        "webdataset": lambda: time_batches(webdataset_batches(d.base, d.index, d.batch, workers, per_sample), w, n),
        "memory": lambda: time_batches(memory_batches(d.images, d.labels, d.batch, next(d.epochs), d.augment), w, n),
    }


def worker_rows(args, kind_name: str, d: KindData, workers: int) -> list[dict]:
    rates = interleaved(pipeline_timers(args, d, workers), args.repeats)
    case = f"{kind_name} {workers} worker{'s' if workers != 1 else ''}"
    return [make_row("loader", case, rates["ours"], rates[name], what, "img/s") for name, what in BASELINES.items()]


def per_core_row(args, kind_name: str, d: KindData) -> dict:
    """Our worker's work alone vs ImageFolder's, both in this process: what one core delivers."""
    w, n = args.warmup, args.batches
    per_sample = notebook_transform(d.index, args.padding)
    timers = {
        "ours": lambda: time_batches(decode_batches(d.base, d.index, d.batch, next(d.epochs)), w, n),
        "imagefolder": lambda: time_batches(imagefolder_batches(d.tree, d.index, d.batch, 0, per_sample), w, n),
    }
    rates = interleaved(timers, args.repeats)
    return make_row(
        "loader",
        f"{kind_name} per core",
        rates["ours"],
        rates["imagefolder"],
        "ImageFolder + per-sample transforms, in process",
        "img/s",
        note="ours: decode + collate to uint8 only (augmentation runs on the device)",
    )


def loader_suite(args, data: dict, tmp: Path) -> list[dict]:
    rows = []
    for kind_name, (base, index) in data.items():
        if index.image_size is None:  # images of any size: the 224 px crop pipelines
            tree = extract_imagefolder(base, index, "train", tmp / f"imagefolder-{kind_name}")
            rows += varsize_rows(args, kind_name, base, index, tree)
            continue
        d = prepare(args, kind_name, base, index, tmp)
        for workers in args.workers:
            rows += worker_rows(args, kind_name, d, workers)
            say(rows[-3:])
        rows.append(per_core_row(args, kind_name, d))
        say(rows[-1:])
    return rows
