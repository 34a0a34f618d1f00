"""python -m resnet_dist.bench: every figure a ratio against what a user would otherwise run, side by side.

    python -m resnet_dist.bench SUITE [--data DIR ...] [--json OUT] [options]

Suites (docs/performance.md has the measured tables and what they mean):
  loader   ready-to-train img/s (decoded, cropped, flipped, normalised, on the device) of our shard loader
           vs torchvision ImageFolder with the notebooks' per-sample transforms, vs a plain WebDataset
           pipeline with the same transforms, vs the ceiling (the same batch augmentation over in-memory
           uint8); plus the per-core decode+collate rate (what one loader worker delivers).
  step     our train_step through Accelerate vs a plain PyTorch loop written like the notebooks (same
           model, batch, precision, in-memory data); bf16 + channels_last vs fp32 NCHW; --compile.
  e2e      one real training epoch streaming from shards (trainer.setup + trainer.train_one_epoch) vs the
           same epoch over the split held in memory as uint8; the data-wait fraction.
  scaling  2 processes x 1 thread (a real `accelerate launch`, gloo) vs 1 process x 2 threads, same
           global batch; the time of one gradient-sized all-reduce.
  augment  what --augment costs a loader worker: decode + TrivialAugmentWide / RandAugment vs decode alone,
           per image on one thread (default kinds gray28,jpeg224).
  all      the first four in turn.

Every row is {suite, case, ours, baseline, baseline_name, ratio, unit}: both sides timed in this run,
repeats interleaved (ours, baseline, ours, ...) so a load spike from other work hits both, each after
warm-up, the median kept. Data: each --data DIR is used for the image kind its index.json describes;
a kind named in --kinds without a --data gets synthetic shards made with `python -m resnet_dist.shard
synthetic` (PNG; JPEG for the jpeg kinds) in a temporary folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from resnet_dist.bench.autoaug import augment_suite
from resnet_dist.bench.common import DEFAULT_KINDS, KINDS, PHOTO, console, fmt, resolve_data
from resnet_dist.bench.e2e import e2e_suite
from resnet_dist.bench.loader import loader_suite
from resnet_dist.bench.scaling import WORKER, scaling_suite, scaling_worker
from resnet_dist.bench.step import step_suite
from resnet_dist.errors import OneLineParser, UsageError
from resnet_dist.filesafe import write_json_atomic
from resnet_dist.hardware import load_average, machine_record
from resnet_dist.locations import check_location
from resnet_dist.storage import is_remote

SUITES = ("loader", "step", "e2e", "scaling")


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
    unknown = [k for k in kinds if k not in KINDS and k != PHOTO]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind {unknown[0]!r} (choose from {', '.join([*KINDS, PHOTO])})")
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
        "suite",
        choices=(*SUITES, "augment", "all", WORKER),
        metavar="SUITE",
        help="loader | step | e2e | scaling | augment | all",
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
    add_model_options(p)
    return p


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The options of the suites that train: step, e2e and scaling (and the hidden worker's own two)."""
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
    if args.suite in ("loader", "all") and importlib.util.find_spec("webdataset") is None:
        raise UsageError("the loader suite's WebDataset baseline needs webdataset: pip install 'resnet-dist[bench]'")
    for folder in args.data:
        if is_remote(check_location(folder, "--data")):
            raise UsageError(f"--data {folder}: the bench reads local shard folders; copy the shards here first")
        if not (Path(folder) / "index.json").is_file():
            raise UsageError(f"--data {folder}: no index.json there (make shards with python -m resnet_dist.shard)")


def suite_kinds(args, suite: str) -> list[str]:
    if args.kinds is not None:
        return args.kinds
    if args.data:
        return []
    if suite == "augment":
        return ["gray28", "jpeg224"]
    return DEFAULT_KINDS.split(",") if suite == "loader" else ["rgb32"]


def run_suites(args, suites: Sequence[str], tmp: Path) -> list[dict]:
    rows = []
    for suite in suites:
        console.print(f"[bold]{suite}[/]  (load {load_average()})")
        if suite in ("loader", "e2e"):
            data = resolve_data(args.data, suite_kinds(args, suite), args.samples, tmp / suite)
            rows += (loader_suite if suite == "loader" else e2e_suite)(args, data, tmp)
        elif suite == "augment":
            rows += augment_suite(args, resolve_data(args.data, suite_kinds(args, suite), args.samples, tmp / suite))
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
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, {"machine": machine, "rows": rows, "argv": list(argv or sys.argv[1:])})
        console.print(f"wrote {args.json}")
    return 0
