"""The scaling suite: 2 processes x 1 thread vs 1 process x 2 threads at the same global batch.

Each side is a subprocess running the hidden worker suite: the 2-process side under a real
`accelerate launch` (gloo). The worker also times one gradient-sized all-reduce on its own.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from resnet_dist.augment import BatchAugment
from resnet_dist.bench.common import CPU_DDP, ROOT, fast_precision, make_row, say
from resnet_dist.bench.step import build_net, fresh_accelerator, make_step
from resnet_dist.distributed import end_run
from resnet_dist.errors import UsageError
from resnet_dist.filesafe import write_json_atomic

WORKER = "scaling-worker"  # hidden suite: one side of the scaling suite, run in a subprocess
# The settings of this run that the workers are given, as the flags that set them.
PASSED_ON = ("model", "stem", "width", "step_batch", "step_size", "step_channels", "batches", "warmup", "repeats")


def worker_args(args, out: Path, threads: int, precision: str) -> list[str]:
    """`-m resnet_dist.bench scaling-worker ...`: one side of the comparison, writing its numbers to `out`."""
    passed = [x for name in PASSED_ON for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    return [
        "-m",
        "resnet_dist.bench",
        WORKER,
        "--json",
        str(out),
        "--threads",
        str(threads),
        "--precision",
        precision,
        *passed,
    ]


def scaling_suite(args, tmp: Path) -> list[dict]:
    """Two subprocesses at the same global batch: 1 process x 2 threads, then 2 x 1 under accelerate launch."""
    precision = fast_precision()
    # PET_STANDALONE=1 is torchrun's --standalone, which accelerate launch passes through: the rendezvous
    # binds a port the OS picks, so the bench cannot collide with another job's launch at a port.
    env = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1", PET_STANDALONE="1")
    one, two = tmp / "scaling-1x2.json", tmp / "scaling-2x1.json"
    run_checked([sys.executable, *worker_args(args, one, 2, precision)], dict(env, OMP_NUM_THREADS="2"))
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_DDP),
        "--num_processes",
        "2",
        "--mixed_precision",
        precision,
    ]
    run_checked([*launch, *worker_args(args, two, 1, precision)], dict(env, OMP_NUM_THREADS="1"))
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


def run_checked(cmd: list[str], env: dict) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({result.returncode}): {result.stderr.strip()[-1500:]}")


def scaling_worker(args) -> None:
    """One side of the scaling suite: this process's share of the global batch through train_step.

    The all-reduce is timed on its own: one fp32 buffer the size of all gradients (what DDP's buckets
    carry in total per step), with gloo. DDP overlaps part of it with backward, so it bounds the cost.
    """
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
    step = make_step(
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
            train_step(step, images[i % 4], labels[i % 4], g)
        return (time.perf_counter() - start) / n

    steps(args.warmup)
    step_s = statistics.median(steps(args.batches) for _ in range(args.repeats))
    numel = sum(p.numel() for p in model.parameters())
    allreduce_ms = time_allreduce(numel) if world > 1 else 0.0
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
    end_run(acc)


def time_allreduce(numel: int) -> float:
    """Milliseconds of one all-reduce of `numel` fp32 values: the median of 10, after 3 untimed."""
    import torch.distributed as dist

    buffer = torch.ones(numel)
    times = []
    for i in range(3 + 10):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000
