"""The e2e suite: one real training epoch streaming from shards vs the same epoch over the split in memory.

The trainer's own setup and train_one_epoch (its loader worker processes included) against the same
batches taken from uint8 already in memory, through the same train_step; plus the data-wait fraction.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from resnet_dist.bench.common import fast_precision, interleaved, load_split, make_row, say
from resnet_dist.distributed import end_run
from resnet_dist.index import DatasetIndex


@contextmanager
def launcher_precision(precision: str) -> Iterator[None]:
    """What `accelerate launch --mixed_precision X` does for the trainer: the env var its Accelerator reads."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    saved = os.environ.get("ACCELERATE_MIXED_PRECISION")
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = saved


def e2e_suite(args, data: dict, tmp: Path) -> list[dict]:
    rows = []
    for kind_name, (base, index) in data.items():
        rows.append(e2e_kind(args, kind_name, base, index, tmp / f"e2e-{kind_name}"))
        say(rows[-1:])
    return rows


def e2e_config(args, base: Path, out: Path):
    from resnet_dist.config import TrainConfig

    return TrainConfig(
        data=str(base),
        out=str(out),
        model=args.model,
        stem=args.stem,
        width=args.width,
        batch_size=args.step_batch,
        num_workers=args.e2e_workers,
        epochs=10**6,
        wandb_mode="disabled",
    )


def e2e_kind(args, kind_name: str, base: Path, index: DatasetIndex, out: Path) -> dict:
    """The trainer's own epoch (setup + train_one_epoch, streaming, its worker processes) vs the same
    epoch's batches taken from the split held in memory as uint8, through the same train_step."""
    from resnet_dist.engine import seed_step, train_step
    from resnet_dist.tracking import Reporter
    from resnet_dist.trainer import setup, train_one_epoch

    cfg = e2e_config(args, base, out)
    with launcher_precision(fast_precision()):
        run = setup(cfg)
    run.reporter = Reporter(False)  # the bench prints its own table
    images, labels = load_split(base, index, "train")
    device = run.step.accelerator.device  # the in-memory side holds the split where the step runs (airbench)
    images, labels = images.to(device), labels.to(device)
    batches = run.train.num_batches
    generator = torch.Generator()

    def memory_epoch() -> float:
        run.step.model.train()
        start = time.perf_counter()
        for b in range(batches):
            take = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            seed_step(cfg.seed, run.epoch, b, 0, generator)
            train_step(run.step, images[take], labels[take], generator)
        return batches * cfg.batch_size / (time.perf_counter() - start)

    waits: list[float] = []

    def streaming_epoch() -> float:
        run.batch = 0
        metrics = train_one_epoch(run)
        run.epoch += 1
        waits.append(metrics["data_wait"])
        return metrics["img_per_s"]

    for _ in range(min(args.warmup, batches)):  # warm-up: first calls allocate and pick kernels
        train_step(run.step, images[: cfg.batch_size], labels[: cfg.batch_size], generator)
    rates = interleaved({"stream": streaming_epoch, "memory": memory_epoch}, args.repeats)
    end_run(run.step.accelerator)
    return make_row(
        "e2e",
        f"{kind_name} epoch ({batches} x {cfg.batch_size} images)",
        rates["stream"],
        rates["memory"],
        "same epoch on in-memory uint8",
        "img/s",
        data_wait=round(statistics.median(waits), 4),
        workers=args.e2e_workers,
        precision=run.step.accelerator.mixed_precision,
        model=f"{args.model} width {args.width or 'default'}",
    )
