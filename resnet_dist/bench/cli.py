"""python -m resnet_dist.bench: every figure a ratio against what a user would otherwise run, side by side.

    python -m resnet_dist.bench SUITE [--data DIR ...] [--json OUT] [options]

Suites (docs/performance.md has the measured tables and what they mean):
  loader   ready-to-train img/s (decoded, cropped, flipped, normalised, on the device) of our shard loader
           vs torchvision ImageFolder with the notebooks' per-sample transforms, vs a plain WebDataset
           pipeline with the same transforms, vs the ceiling (the same batch augmentation over in-memory
           uint8); plus the per-core decode+collate rate (what one loader worker delivers).
  step     our train_step through Accelerate vs a plain PyTorch loop written like the notebooks (same
           model, batch, precision, in-memory data); bf16 + channels_last vs fp32 NCHW; --compile.
  e2e      one real training epoch streaming from shards (trainer.setup + engine.train_one_epoch) vs the
           same epoch over the split held in memory as uint8; the data-wait fraction.
  scaling  2 processes x 1 thread (a real `accelerate launch`, gloo) vs 1 process x 2 threads, same
           global batch; the time of one gradient-sized all-reduce.
  all      the four in turn.

Every row is {suite, case, ours, baseline, baseline_name, ratio, unit}: both sides timed in this run,
repeats interleaved (ours, baseline, ours, ...) so a load spike from other work hits both, each after
warm-up, the median kept. Data: each --data DIR is used for the image kind its index.json describes;
a kind named in --kinds without a --data gets synthetic shards made with `python -m resnet_dist.shard
synthetic` (PNG; JPEG for the jpeg kinds) in a temporary folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from resnet_dist.augment import BatchAugment
from resnet_dist.errors import OneLineParser, UsageError, run_cli
from resnet_dist.hardware import cpu_has_bf16, load_average, machine_record
from resnet_dist.index import DatasetIndex
from resnet_dist.storage import read_index

SUITES = ("loader", "step", "e2e", "scaling")
ROW_KEYS = ("suite", "case", "ours", "baseline", "baseline_name", "ratio", "unit")
ROOT = Path(__file__).resolve().parents[2]
CPU_DDP = ROOT / "accelerate_configs" / "cpu_ddp.yaml"
WORKER = "scaling-worker"  # hidden suite: one side of the scaling suite, run in a subprocess
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 150)  # logs: no wrapping


@dataclass(frozen=True)
class Kind:
    """An image kind the suites cover, and how its synthetic stand-in is made."""

    name: str
    size: int
    channels: int
    format: str  # png | jpeg, as the shard tool writes it
    samples: int  # synthetic train samples when no --data is given (enough for warm-up + timed batches)
    batch: int  # loader batch size for this kind when --batch-size is not given


KINDS = {
    "gray28": Kind("gray28", 28, 1, "png", 4096, 128),  # Fashion-MNIST-like
    "rgb32": Kind("rgb32", 32, 3, "png", 4096, 128),  # CIFAR-like
    "jpeg64": Kind("jpeg64", 64, 3, "jpeg", 4096, 128),  # Tiny-ImageNet-like
    "jpeg224": Kind(
        "jpeg224", 224, 3, "jpeg", 1536, 32
    ),  # ImageNet-sized: the per-core decode rate for the GPU estimate
}
DEFAULT_KINDS = "gray28,rgb32,jpeg64"


# --- rows, statistics, precision -----------------------------------------------------------------


def make_row(suite: str, case: str, ours: float, baseline: float, baseline_name: str, unit: str, **extra) -> dict:
    """One result: both sides and their ratio (ours / baseline, so > 1 means ours is faster)."""
    if not (ours > 0 and baseline > 0):
        raise RuntimeError(f"{suite}/{case}: non-positive measurement (ours {ours}, baseline {baseline})")
    return {
        "suite": suite,
        "case": case,
        "ours": ours,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "ratio": ours / baseline,
        "unit": unit,
        **({"extra": extra} if extra else {}),
    }


def interleaved(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each timer over `repeats` rounds, the timers taking turns within a round."""
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            samples[name].append(timer())
    return {name: statistics.median(values) for name, values in samples.items()}


def fast_precision() -> str:
    """bf16 where the CPU has native bf16 dot products (AVX-512-BF16 or AMX), else fp32.

    Without them, oneDNN emulates bf16 and autocast makes training slower, not faster.
    """
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_bf16() else "no"


# --- data: synthetic shards, the ImageFolder tree, the split in memory ----------------------------


def kind_of(index: DatasetIndex) -> str:
    """The kind name an index describes: one of KINDS when it matches, else a descriptive name."""
    h, w = index.image_size
    for kind in KINDS.values():
        if (kind.size, kind.size, kind.channels, kind.format) == (h, w, index.channels, index.format):
            return kind.name
    return f"{'gray' if index.channels == 1 else 'rgb'}{h}x{w}-{index.format}"


def make_synthetic(kind: Kind, folder: Path, samples: int | None) -> Path:
    """Synthetic shards of `kind` through the real shard CLI; 8 shards so any worker count gets some."""
    n = samples or kind.samples
    out = folder / f"synthetic-{kind.name}"
    cmd = [
        sys.executable,
        "-m",
        "resnet_dist.shard",
        "synthetic",
        "--out",
        str(out),
        "--num-classes",
        "10",
        "--image-size",
        str(kind.size),
        "--channels",
        str(kind.channels),
        "--num-samples",
        str(n),
        "--shard-size",
        str(max(1, -(-n // 8))),
        "--format",
        kind.format,
        "--workers",
        "2",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"making synthetic {kind.name} shards failed: {result.stderr.strip()[-500:]}")
    return out


def resolve_data(
    data: list[str], kinds: list[str], samples: int | None, tmp: Path
) -> dict[str, tuple[Path, DatasetIndex]]:
    """kind name -> (shard folder, index): the --data folders first, synthetic shards for the other kinds."""
    found: dict[str, tuple[Path, DatasetIndex]] = {}
    for folder in data:
        index = read_index(folder)
        if "train" not in index.splits:
            raise UsageError(f"{folder}: index.json has no train split")
        found[kind_of(index)] = (Path(folder), index)
    for name in kinds:
        if name not in found:
            path = make_synthetic(KINDS[name], tmp, samples)
            found[name] = (path, read_index(str(path)))
    return found


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


def load_split(base: Path, index: DatasetIndex, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split decoded to uint8 NHWC in memory, through our own reader."""
    from resnet_dist.data import ShardStream

    stream = ShardStream(str(base), index, split, batch_size=1024, rank=0, world_size=1, train=False)
    images, labels = zip(*((x, y) for x, y, *_ in stream))  # each batch: images, labels, lost, problems
    return torch.cat(images), torch.cat(labels)


# --- loader suite ---------------------------------------------------------------------------------


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


def imagefolder_batches(root: Path, index: DatasetIndex, batch: int, workers: int, padding: int) -> Iterator:
    """The notebook path: ImageFolder + per-sample transforms in the workers, default collate."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    mode = "L" if index.channels == 1 else "RGB"  # ImageFolder's default loader would make gray images RGB
    dataset = ImageFolder(
        str(root), transform=notebook_transform(index, padding), loader=functools.partial(pil_open, mode=mode)
    )
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
    )
    for images, labels in loader:
        yield images.to(device(), non_blocking=True), labels


def webdataset_batches(base: Path, index: DatasetIndex, batch: int, workers: int, padding: int) -> Iterator:
    """A plain WebDataset pipeline as its docs show it: shuffle, decode to PIL, per-sample transforms, batch."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    urls = [str(base / s.file) for s in index.splits["train"].shards]
    image = "png;jpg;jpeg"
    pipeline = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(1000)
        .decode("pill" if index.channels == 1 else "pil")
        .to_tuple(image, "cls")
        .map_tuple(notebook_transform(index, padding), int)
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


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def loader_suite(args, data: dict, tmp: Path) -> list[dict]:
    rows = []
    for kind_name, (base, index) in data.items():
        batch = args.batch_size or KINDS.get(kind_name, KINDS["rgb32"]).batch
        augment = BatchAugment(index.mean, index.std, device(), args.padding)
        tree = extract_imagefolder(base, index, "train", tmp / f"imagefolder-{kind_name}")
        images, labels = load_split(base, index, "train")
        w, n = args.warmup, args.batches
        epochs = iter(range(1, 1 << 30))  # a fresh epoch (new order, new worker processes) per timing
        for workers in args.workers:
            rates = interleaved(
                {
                    "ours": lambda: time_batches(
                        ours_batches(base, index, batch, workers, next(epochs), augment), w, n
                    ),
                    "imagefolder": lambda: time_batches(
                        imagefolder_batches(tree, index, batch, workers, args.padding), w, n
                    ),
                    "webdataset": lambda: time_batches(
                        webdataset_batches(base, index, batch, workers, args.padding), w, n
                    ),
                    "memory": lambda: time_batches(memory_batches(images, labels, batch, next(epochs), augment), w, n),
                },
                args.repeats,
            )
            case = f"{kind_name} {workers} worker{'s' if workers != 1 else ''}"
            rows += [
                make_row(
                    "loader", case, rates["ours"], rates["imagefolder"], "ImageFolder + per-sample transforms", "img/s"
                ),
                make_row(
                    "loader",
                    case,
                    rates["ours"],
                    rates["webdataset"],
                    "WebDataset decode + per-sample transforms",
                    "img/s",
                ),
                make_row(
                    "loader",
                    case,
                    rates["ours"],
                    rates["memory"],
                    "ceiling: batch augmentation of in-memory uint8",
                    "img/s",
                ),
            ]
            say(rows[-3:])
        rates = interleaved(
            {
                "ours": lambda: time_batches(decode_batches(base, index, batch, next(epochs)), w, n),
                "imagefolder": lambda: time_batches(imagefolder_batches(tree, index, batch, 0, args.padding), w, n),
            },
            args.repeats,
        )
        note = "ours: decode + collate to uint8 only (augmentation runs on the device)"
        rows.append(
            make_row(
                "loader",
                f"{kind_name} per core",
                rates["ours"],
                rates["imagefolder"],
                "ImageFolder + per-sample transforms, in process",
                "img/s",
                note=note,
            )
        )
        say(rows[-1:])
    return rows


# --- step suite -----------------------------------------------------------------------------------


@dataclass
class StepSetup:
    """One way of running the training step: ours (through Accelerate) or the notebook loop."""

    precision: str  # "no" (fp32) | "bf16"
    channels_last: bool
    compile: bool = False


def build_net(args, num_classes: int, channels: int, channels_last: bool) -> torch.nn.Module:
    from resnet_dist.models import build_model

    torch.manual_seed(0)
    model = build_model(
        args.model, num_classes=num_classes, in_channels=channels, stem=args.stem, width=args.width or None
    )
    return model.to(device(), memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def fresh_accelerator(precision: str):
    """A new Accelerator with `precision`: Accelerate keeps one global state, so it is reset first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=precision, step_scheduler_with_optimizer=False
    )


def run_like(acc, model, optimizer, scheduler, augment: BatchAugment) -> SimpleNamespace:
    """What engine.train_step reads of a Run (the trainer's own Run needs shards and a run folder)."""
    from resnet_dist.guard import StepGuard, StopRequest

    return SimpleNamespace(
        accelerator=acc,
        cfg=SimpleNamespace(label_smoothing=0.0),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        augment=augment,
        guard=StepGuard(acc, StopRequest(), max_bad_steps=0),  # timed as the trainer runs it
    )


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


def our_step_timer(
    args, setup: StepSetup, images: torch.Tensor, labels: torch.Tensor, mean, std
) -> Callable[[], float]:
    """Times engine.train_step, the trainer's own step, with a Run-like object around a prepared model."""
    from resnet_dist.engine import train_step

    model = build_net(args, 10, images.shape[-1], setup.channels_last)
    if setup.compile:
        model = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(0)

    def timed(steps: int) -> float:
        acc = fresh_accelerator(setup.precision)
        net, opt = acc.prepare(model, optimizer)
        run = run_like(acc, net, opt, scheduler, BatchAugment(mean, std, acc.device, 4, True, setup.channels_last))
        net.train()
        start = time.perf_counter()
        for i in range(steps):
            loss, _ = train_step(run, images[i % len(images)], labels[i % len(labels)], generator)
        loss.item()  # wait for the last step on asynchronous devices
        return steps * images.shape[1] / (time.perf_counter() - start)

    return timed


def notebook_step_timer(
    args, setup: StepSetup, images: torch.Tensor, labels: torch.Tensor, mean, std
) -> Callable[[], float]:
    """The notebooks' loop: batches already augmented and normalised (their DataLoader did it), then
    zero_grad, forward, loss, backward, step. Autocast/channels_last only when `setup` asks."""
    model = build_net(args, 10, images.shape[-1], setup.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
    ready = [
        ((x.permute(0, 3, 1, 2).float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
        .contiguous(memory_format=fmt)
        .to(device())
        for x in images
    ]
    targets = [y.to(device()) for y in labels]
    autocast = dict(device_type=device().type, dtype=torch.bfloat16, enabled=setup.precision == "bf16")

    def timed(steps: int) -> float:
        model.train()
        start = time.perf_counter()
        for i in range(steps):
            x, y = ready[i % len(ready)], targets[i % len(targets)]
            optimizer.zero_grad()
            with torch.autocast(**autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        loss.item()
        return steps * x.shape[0] / (time.perf_counter() - start)

    return timed


def step_data(args, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A few distinct uint8 NHWC batches and labels, in memory (the step suite measures compute only)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, args.step_batch, size, size, channels), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (4, args.step_batch), generator=g)
    return images, labels, torch.full((channels,), 0.5), torch.full((channels,), 0.25)


def step_suite(args) -> list[dict]:
    images, labels, mean, std = step_data(args, args.step_channels, args.step_size)
    fast = fast_precision()
    setups = {"ours fp32": StepSetup("no", False), "notebook fp32": StepSetup("no", False)}
    if fast == "bf16":
        setups |= {"ours fast": StepSetup("bf16", True), "notebook fast": StepSetup("bf16", True)}
    timers = {
        name: (our_step_timer if name.startswith("ours") else notebook_step_timer)(args, s, images, labels, mean, std)
        for name, s in setups.items()
    }
    for timer in timers.values():
        timer(args.warmup)
    rates = interleaved({name: functools.partial(timer, args.batches) for name, timer in timers.items()}, args.repeats)
    model = f"{args.model} width {args.width or 'default'}, {args.step_size}x{args.step_size}x{args.step_channels}, batch {args.step_batch}"
    rows = [
        make_row(
            "step",
            "overhead, fp32 NCHW",
            rates["ours fp32"],
            rates["notebook fp32"],
            "plain PyTorch loop, fp32 NCHW",
            "img/s",
            model=model,
        )
    ]
    if fast == "bf16":
        rows += [
            make_row(
                "step",
                "overhead, bf16 + channels_last",
                rates["ours fast"],
                rates["notebook fast"],
                "plain PyTorch loop, bf16 autocast + channels_last",
                "img/s",
                model=model,
            ),
            make_row(
                "step",
                "fast defaults (bf16 + channels_last)",
                rates["ours fast"],
                rates["notebook fp32"],
                "plain PyTorch loop, fp32 NCHW (the notebooks)",
                "img/s",
                model=model,
            ),
        ]
    say(rows)
    if args.compile:
        rows += compile_rows(
            args, setups["ours fast" if fast == "bf16" else "ours fp32"], images, labels, mean, std, model
        )
    return rows


def compile_rows(args, eager: StepSetup, images, labels, mean, std, model: str) -> list[dict]:
    """torch.compile'd train step vs the same step eager; the compile time is reported beside it."""
    compiled = StepSetup(eager.precision, eager.channels_last, compile=True)
    timers = {
        "eager": our_step_timer(args, eager, images, labels, mean, std),
        "compiled": our_step_timer(args, compiled, images, labels, mean, std),
    }
    start = time.perf_counter()
    try:
        timers["compiled"](1)  # the first call compiles forward and backward
        compile_seconds = time.perf_counter() - start
        timers["compiled"](args.warmup)
    except Exception as exc:  # compile failures come in many types; report them, do not hide them
        message = f"torch.compile failed after {time.perf_counter() - start:.0f} s: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        console.print(f"[yellow]{message}[/]")
        return [{"suite": "step", "case": "torch.compile", "failed": message}]
    timers["eager"](args.warmup)
    rates = interleaved({name: functools.partial(t, args.batches) for name, t in timers.items()}, args.repeats)
    rows = [
        make_row(
            "step",
            f"torch.compile ({'bf16 + channels_last' if eager.precision == 'bf16' else 'fp32'})",
            rates["compiled"],
            rates["eager"],
            "our step, eager",
            "img/s",
            model=model,
            compile_seconds=round(compile_seconds, 1),
        )
    ]
    say(rows)
    return rows


# --- e2e suite ------------------------------------------------------------------------------------


def e2e_suite(args, data: dict, tmp: Path) -> list[dict]:
    rows = []
    for kind_name, (base, index) in data.items():
        rows.append(e2e_kind(args, kind_name, base, index, tmp / f"e2e-{kind_name}"))
        say(rows[-1:])
    return rows


def e2e_kind(args, kind_name: str, base: Path, index: DatasetIndex, out: Path) -> dict:
    """The trainer's own epoch (setup + train_one_epoch, streaming, its worker processes) vs the same
    epoch's batches taken from the split held in memory as uint8, through the same train_step."""
    from resnet_dist.config import TrainConfig
    from resnet_dist.engine import seed_step, train_one_epoch, train_step
    from resnet_dist.tracking import Reporter
    from resnet_dist.trainer import setup

    cfg = TrainConfig(
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
    with launcher_precision(fast_precision()):
        run = setup(cfg)
    run.reporter = Reporter(False)  # the bench prints its own table
    images, labels = load_split(base, index, "train")
    batches = run.train.num_batches
    generator = torch.Generator()

    def memory_epoch() -> float:
        run.model.train()
        start = time.perf_counter()
        for b in range(batches):
            take = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            seed_step(cfg.seed, run.epoch, b, 0, generator)
            train_step(run, images[take], labels[take], generator)
        return batches * cfg.batch_size / (time.perf_counter() - start)

    waits: list[float] = []

    def streaming_epoch() -> float:
        run.batch = 0
        metrics = train_one_epoch(run)
        run.epoch += 1
        waits.append(metrics["data_wait"])
        return metrics["img_per_s"]

    for b in range(min(args.warmup, batches)):  # warm-up: first calls allocate and pick kernels
        train_step(run, images[: cfg.batch_size], labels[: cfg.batch_size], generator)
    rates = interleaved({"stream": streaming_epoch, "memory": memory_epoch}, args.repeats)
    run.accelerator.end_training()
    return make_row(
        "e2e",
        f"{kind_name} epoch ({batches} x {cfg.batch_size} images)",
        rates["stream"],
        rates["memory"],
        "same epoch on in-memory uint8",
        "img/s",
        data_wait=round(statistics.median(waits), 4),
        workers=args.e2e_workers,
        precision=run.accelerator.mixed_precision,
        model=f"{args.model} width {args.width or 'default'}",
    )


# --- scaling suite --------------------------------------------------------------------------------


def scaling_suite(args, tmp: Path) -> list[dict]:
    """Two subprocesses at the same global batch: 1 process x 2 threads, then 2 x 1 under accelerate launch."""
    common = [
        "--model",
        args.model,
        "--stem",
        args.stem,
        "--width",
        str(args.width),
        "--step-batch",
        str(args.step_batch),
        "--step-size",
        str(args.step_size),
        "--step-channels",
        str(args.step_channels),
        "--batches",
        str(args.batches),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
    ]
    precision = fast_precision()
    env = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    one = tmp / "scaling-1x2.json"
    single = [
        sys.executable,
        "-m",
        "resnet_dist.bench",
        WORKER,
        "--json",
        str(one),
        "--threads",
        "2",
        "--precision",
        precision,
        *common,
    ]
    run_checked(single, dict(env, OMP_NUM_THREADS="2"))
    two = tmp / "scaling-2x1.json"
    launched = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_DDP),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        precision,
        "-m",
        "resnet_dist.bench",
        WORKER,
        "--json",
        str(two),
        "--threads",
        "1",
        "--precision",
        precision,
        *common,
    ]
    run_checked(launched, dict(env, OMP_NUM_THREADS="1"))
    a, b = json.loads(two.read_text()), json.loads(one.read_text())
    rows = [
        make_row(
            "scaling",
            f"2 processes x 1 thread vs 1 x 2, global batch {args.step_batch}",
            a["img_per_s"],
            b["img_per_s"],
            "1 process x 2 threads",
            "img/s",
            world_size=a["world_size"],
            allreduce_ms=a["allreduce_ms"],
            step_ms=a["step_ms"],
            gradient_mb=a["gradient_mb"],
            allreduce_fraction=round(a["allreduce_ms"] / a["step_ms"], 4),
            precision=precision,
        )
    ]
    say(rows)
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_checked(cmd: list[str], env: dict) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({result.returncode}): {result.stderr.strip()[-1500:]}")


def scaling_worker(args) -> None:
    """One side of the scaling suite: this process's share of the global batch through train_step.

    The all-reduce is timed on its own: one fp32 buffer the size of all gradients (what DDP's buckets
    carry in total per step), with gloo. DDP overlaps part of it with backward, so it bounds the cost.
    """
    import torch.distributed as dist

    from resnet_dist.engine import train_step

    torch.set_num_threads(args.threads)
    acc = fresh_accelerator(args.precision)
    world = acc.num_processes
    if args.step_batch % world:
        raise UsageError(f"--step-batch {args.step_batch} does not split over {world} processes")
    per_rank = args.step_batch // world
    g = torch.Generator().manual_seed(acc.process_index)
    images = torch.randint(
        0, 256, (4, per_rank, args.step_size, args.step_size, args.step_channels), dtype=torch.uint8, generator=g
    )
    labels = torch.randint(0, 10, (4, per_rank), generator=g)
    channels_last = args.precision == "bf16"
    model = build_net(args, 10, args.step_channels, channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    net, opt = acc.prepare(model, optimizer)
    mean, std = torch.full((args.step_channels,), 0.5), torch.full((args.step_channels,), 0.25)
    run = run_like(
        acc,
        net,
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        BatchAugment(mean, std, acc.device, 4, True, channels_last),
    )

    def steps(n: int) -> float:
        acc.wait_for_everyone()
        start = time.perf_counter()
        for i in range(n):
            train_step(run, images[i % 4], labels[i % 4], g)
        return (time.perf_counter() - start) / n

    steps(args.warmup)
    step_s = statistics.median(steps(args.batches) for _ in range(args.repeats))
    numel = sum(p.numel() for p in model.parameters())
    allreduce_ms = 0.0
    if world > 1:
        buffer = torch.ones(numel)
        times = []
        for i in range(3 + 10):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            if i >= 3:
                times.append(time.perf_counter() - start)
        allreduce_ms = statistics.median(times) * 1000
    if acc.is_main_process:
        write_json_atomic(
            Path(args.json),
            {
                "img_per_s": args.step_batch / step_s,
                "step_ms": step_s * 1000,
                "allreduce_ms": allreduce_ms,
                "world_size": world,
                "gradient_mb": numel * 4 / 2**20,
                "threads": torch.get_num_threads(),
            },
        )
    acc.end_training()


# --- output ---------------------------------------------------------------------------------------


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.3g}"


def say(rows: list[dict]) -> None:
    """Progress: each row as soon as it is measured (the table comes at the end)."""
    for r in rows:
        console.print(
            f"  {r['suite']}: {r['case']}: {fmt(r['ours'])} vs {fmt(r['baseline'])} {r['unit']} "
            f"({r['baseline_name']}) -> {r['ratio']:.2f}x   load {load_average()[0]}"
        )


def table(rows: list[dict], machine: dict) -> Table:
    t = Table(
        title=f"resnet-dist bench: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"load {machine['load_start'][0]} -> {machine['load_end'][0]}"
    )
    for col in ("suite", "case", "ours", "baseline", "vs", "ratio"):
        t.add_column(col, justify="right" if col in ("ours", "baseline", "ratio") else "left")
    for r in rows:
        if "failed" in r:
            t.add_row(r["suite"], r["case"], "-", "-", r["failed"], "-")
        else:
            t.add_row(
                r["suite"],
                r["case"],
                f"{fmt(r['ours'])} {r['unit']}",
                fmt(r["baseline"]),
                r["baseline_name"],
                f"{r['ratio']:.2f}x",
            )
    return t


# --- command line ---------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def kind_list(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind {unknown[0]!r} (choose from {', '.join(KINDS)})")
    return kinds


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m resnet_dist.bench",
        description="Benchmark the loader, the train step, a whole epoch and 2-process scaling, each "
        "against the alternative a user would otherwise run, side by side in one run.",
    )
    p.add_argument(
        "suite", choices=(*SUITES, "all", WORKER), metavar="SUITE", help="loader | step | e2e | scaling | all"
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="DIR",
        help="shard folder (repeatable); used for the kind its index.json describes",
    )
    p.add_argument(
        "--kinds",
        type=kind_list,
        default=None,
        help=f"image kinds for loader/e2e, synthetic when no --data matches ({', '.join(KINDS)}; "
        f"default loader: {DEFAULT_KINDS}, e2e: rgb32; with --data: only those)",
    )
    p.add_argument("--json", metavar="OUT", help="write the rows and the machine record here (atomically)")
    p.add_argument(
        "--repeats", type=positive, default=3, help="timed repeats per measurement; the median is kept (default 3)"
    )
    p.add_argument(
        "--batches",
        type=positive,
        default=20,
        help="timed batches (loader) or steps (step, scaling) per repeat (default 20)",
    )
    p.add_argument("--warmup", type=positive, default=3, help="untimed batches / steps before timing (default 3)")
    p.add_argument(
        "--workers", type=int_list, default=[1, 2], help="loader worker counts, comma-separated (default 1,2)"
    )
    p.add_argument("--batch-size", type=positive, default=None, help="loader batch size (default 128; 32 for jpeg224)")
    p.add_argument(
        "--samples", type=positive, default=None, help="train samples of synthetic shards (default 4096; jpeg224 1536)"
    )
    p.add_argument("--padding", type=int, default=4, help="random-crop padding, all pipelines (default 4)")
    p.add_argument("--model", default="resnet18", help="step/e2e/scaling model (default resnet18)")
    p.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"), help="model stem (default cifar)")
    p.add_argument("--width", type=int, default=0, help="model base width; 0: its own (64 for ResNets)")
    p.add_argument(
        "--step-batch", type=positive, default=128, help="step/e2e batch; scaling global batch (default 128)"
    )
    p.add_argument("--step-size", type=positive, default=32, help="step/scaling image size (default 32)")
    p.add_argument(
        "--step-channels", type=int, default=3, choices=(1, 3), help="step/scaling image channels (default 3)"
    )
    p.add_argument(
        "--e2e-workers", type=int, default=2, help="loader workers of the e2e epoch (default 2, the trainer's)"
    )
    p.add_argument(
        "--compile", action="store_true", help="step: also time torch.compile (compiling takes minutes on a CPU)"
    )
    p.add_argument("--threads", type=positive, default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    return p


def check(args) -> None:
    from resnet_dist.models import MODELS

    if args.model not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)} (got {args.model!r})")
    if args.width < 0:
        raise UsageError(f"--width must be >= 0 (got {args.width})")
    if not 0 <= args.padding < 16:
        raise UsageError(f"--padding must be in [0, 16) (got {args.padding})")
    if args.e2e_workers < 0:
        raise UsageError(f"--e2e-workers must be >= 0 (got {args.e2e_workers})")
    for folder in args.data:
        if not (Path(folder) / "index.json").is_file():
            raise UsageError(f"--data {folder}: no index.json there (make shards with python -m resnet_dist.shard)")


def suite_kinds(args, suite: str) -> list[str]:
    if args.kinds is not None:
        return args.kinds
    if args.data:
        return []
    return DEFAULT_KINDS.split(",") if suite == "loader" else ["rgb32"]


def run_suites(args, suites: Sequence[str], tmp: Path) -> list[dict]:
    rows = []
    for suite in suites:
        console.print(f"[bold]{suite}[/]  (load {load_average()})")
        if suite in ("loader", "e2e"):
            data = resolve_data(args.data, suite_kinds(args, suite), args.samples, tmp / suite)
            rows += (loader_suite if suite == "loader" else e2e_suite)(args, data, tmp)
        elif suite == "step":
            rows += step_suite(args)
        else:
            rows += scaling_suite(args, tmp)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check(args)
    if args.suite == WORKER:
        scaling_worker(args)
        return 0
    os.environ.setdefault("WANDB_SILENT", "true")
    machine = machine_record()
    suites = SUITES if args.suite == "all" else (args.suite,)
    with tempfile.TemporaryDirectory(prefix="resnet-dist-bench-") as tmp:
        rows = run_suites(args, suites, Path(tmp))
    machine["load_end"] = load_average()
    console.print(table(rows, machine))
    if args.json:
        write_json_atomic(Path(args.json), {"machine": machine, "rows": rows, "argv": list(argv or sys.argv[1:])})
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
