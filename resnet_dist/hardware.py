"""What the machine offers that changes the fastest way to train on it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX-512-BF16 or AMX). Without them oneDNN emulates bf16 and autocast
    makes training slower, not faster; with them it ran 2.3-2.4x faster here (docs/performance.md)."""
    return bool(cpu_flags() & BF16_FLAGS)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages: a timing taken on a busy machine says so beside it."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_record() -> dict:
    """The machine and software versions a measurement was taken with, stored beside the numbers."""
    import importlib.metadata

    import accelerate
    import torch
    import torchvision

    flags = cpu_flags()
    try:  # only the bench's baseline needs it (the [bench] extra)
        webdataset = importlib.metadata.version("webdataset")
    except importlib.metadata.PackageNotFoundError:
        webdataset = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "webdataset": webdataset,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_hardware": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_start": load_average(),
    }
