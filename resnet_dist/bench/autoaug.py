"""The augment suite: what --augment costs a loader worker per image, against the decode it adds to.

One thread (a loader worker's setting), the same encoded images: decode alone (data.decode_image, the
worker's decode of fixed-size shards) vs decode + TrivialAugmentWide vs decode + RandAugment(2, 9)
(autoaug.augment_image, seeding included), timed in turns. Rows are per-core rates (img/s); the ratio
below 1 is the share of the worker's rate left with the augmentation on.

And the device side of --mixup/--cutmix on this machine's device: BatchAugment.train + mix.mix_batch
(mixup 0.2, cutmix 1.0) vs BatchAugment.train alone on the same uint8 batch, one intra-op thread as
the trainer runs them on a CPU.
"""

from __future__ import annotations

import functools
import tarfile
import time
from pathlib import Path

import torch

from resnet_dist.bench.common import console, device, interleaved, make_row, say
from resnet_dist.errors import UsageError
from resnet_dist.index import DatasetIndex

IMAGES = 256  # encoded images timed per repeat


def encoded_images(base: Path, index: DatasetIndex, n: int) -> list[bytes]:
    """The first n image payloads of the train split's shards, as the workers receive them."""
    out: list[bytes] = []
    for shard in index.splits["train"].shards:
        with tarfile.open(base / shard.file) as tar:
            for member in tar:
                if member.name.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg"):
                    out.append(tar.extractfile(member).read())
                if len(out) == n:
                    return out
    return out


def rate(images: list[bytes], index: DatasetIndex, spec) -> float:
    """Images per second of decode (+ augment with `spec`) on this thread."""
    from resnet_dist.autoaug import augment_image
    from resnet_dist.data import decode_image

    size = tuple(index.image_size)
    t0 = time.perf_counter()
    for i, data in enumerate(images):
        array = decode_image(data, index.channels, size, "bench")
        if spec is not None:
            augment_image(array, spec, i)
    return len(images) / (time.perf_counter() - t0)


SPECS = {"decode": None, "trivialaugment": ("trivialaugment",), "randaugment": ("randaugment", 2, 9)}


def batch_rate(images: torch.Tensor, labels: torch.Tensor, index: DatasetIndex, spec, repeats: int = 5) -> float:
    """Images per second of the device's batch transforms (+ mixing with `spec`), best of `repeats`."""
    from resnet_dist.augment import BatchAugment
    from resnet_dist.mix import mix_batch

    augment = BatchAugment(index.mean, index.std, images.device)
    generator = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = augment.train(images, generator)
        if spec is not None:
            mix_batch(x, labels, spec, generator)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def mix_row(kind: str, index: DatasetIndex, repeats: int) -> dict:
    from resnet_dist.mix import MixSpec

    h, w = index.image_size
    n = 64 if h >= 128 else 128
    images = torch.randint(0, 256, (n, h, w, index.channels), dtype=torch.uint8, device=device())
    labels = torch.randint(0, index.num_classes, (n,), device=device())
    spec = MixSpec(0.2, 1.0, 1.0, 0.5, index.num_classes)
    batch_rate(images, labels, index, spec, 2)  # warm-up
    got = interleaved(
        {
            "plain": lambda: batch_rate(images, labels, index, None),
            "mix": lambda: batch_rate(images, labels, index, spec),
        },
        repeats,
    )
    row = make_row(
        "augment",
        f"{kind} device batch {n} + mixup/cutmix",
        got["mix"],
        got["plain"],
        "crop+flip+normalise alone",
        "img/s",
    )
    say([row])
    return row


def kind_rows(kind: str, base: Path, index: DatasetIndex, repeats: int) -> list[dict]:
    from resnet_dist.autoaug import AugmentSpec

    images = encoded_images(base, index, IMAGES)
    specs = {name: AugmentSpec(*spec) if spec else None for name, spec in SPECS.items()}
    for spec in specs.values():  # warm-up
        rate(images[:32], index, spec)
    got = interleaved({name: functools.partial(rate, images, index, spec) for name, spec in specs.items()}, repeats)
    rows = []
    for name in ("trivialaugment", "randaugment"):
        extra = {"us_per_image": 1e6 / got[name] - 1e6 / got["decode"], "decode_us": 1e6 / got["decode"]}
        case = f"{kind} decode+{name}"
        rows.append(make_row("augment", case, got[name], got["decode"], "decode alone", "img/s", **extra))
        say(rows[-1:])
    return [*rows, mix_row(kind, index, repeats)]


def augment_suite(args, data: dict[str, tuple[Path, DatasetIndex]]) -> list[dict]:
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        for kind, (base, index) in data.items():
            if index.image_size is None:
                raise UsageError(f"--data {base}: the augment suite times images of one size (these vary)")
            rows += kind_rows(kind, base, index, args.repeats)
    finally:
        torch.set_num_threads(threads)
    console.print("  (per core; ratio: the share of a worker's decode rate left with the augmentation on)")
    return rows
