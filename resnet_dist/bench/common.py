"""What every suite shares: the image kinds, result rows and their statistics, the data, progress lines."""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from resnet_dist.errors import UsageError
from resnet_dist.hardware import cpu_has_bf16, load_average
from resnet_dist.index import DatasetIndex
from resnet_dist.storage import read_index

ROOT = Path(__file__).resolve().parents[2]
CPU_DDP = ROOT / "accelerate_configs" / "cpu_ddp.yaml"
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
    # ImageNet-sized: the per-core decode rate for the GPU estimate
    "jpeg224": Kind("jpeg224", 224, 3, "jpeg", 1536, 32),
}
DEFAULT_KINDS = "gray28,rgb32,jpeg64"
# ImageNet's workload: real photographs of varying size (150-600 px sides) as JPEG, cropped to 224 px
# (resnet_dist.bench.photos, resnet_dist.bench.varsize); not synthetic, so not a Kind.
PHOTO = "photo224"
PHOTO_SAMPLES = 1024


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


def kind_of(index: DatasetIndex) -> str:
    """The kind name an index describes: one of KINDS when it matches, else a descriptive name."""
    if index.image_size is None:
        return f"varsize-{index.format}"
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


def make_photos(folder: Path, samples: int) -> Path:
    """Real photographs of varying size as JPEG files, packed as they are by the imagefolder CLI."""
    from resnet_dist.bench.photos import photo_jpegs, write_imagefolder

    tree = write_imagefolder(photo_jpegs(samples, seed=0), folder / "photo-tree")
    out = folder / f"photos-{PHOTO}"
    cmd = [sys.executable, "-m", "resnet_dist.shard", "imagefolder", "--root", str(tree), "--out", str(out)]
    result = subprocess.run(
        [*cmd, "--shard-size", str(max(1, -(-samples // 8))), "--workers", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"packing the photographs failed: {result.stderr.strip()[-500:]}")
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
        if name == PHOTO and name not in found:
            path = make_photos(tmp, samples or PHOTO_SAMPLES)
            found[name] = (path, read_index(str(path)))
        elif name not in found:
            path = make_synthetic(KINDS[name], tmp, samples)
            found[name] = (path, read_index(str(path)))
    return found


def load_split(base: Path, index: DatasetIndex, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split decoded to uint8 NHWC in memory, through our own reader."""
    from resnet_dist.data import ShardStream

    stream = ShardStream(str(base), index, split, batch_size=1024, rank=0, world_size=1, train=False)
    images, labels = zip(*((x, y) for x, y, *_ in stream))  # each batch: images, labels, lost, problems
    return torch.cat(images), torch.cat(labels)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.3g}"


def say(rows: list[dict]) -> None:
    """Progress: each row as soon as it is measured (the table comes at the end)."""
    for r in rows:
        console.print(
            f"  {r['suite']}: {r['case']}: {fmt(r['ours'])} vs {fmt(r['baseline'])} {r['unit']} "
            f"({r['baseline_name']}) -> {r['ratio']:.2f}x   load {load_average()[0]}"
        )
