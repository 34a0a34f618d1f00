"""python -m resnet_dist.evaluate: a checkpoint's exact metrics on one split of a shard folder.

    python -m resnet_dist.evaluate --checkpoint runs/fm --data shards/fm --split test [--tta flip]
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml -m resnet_dist.evaluate ...

Only `meta.json` (JSON) and safetensors weights are read (`ema.safetensors` when the run kept an EMA and
--weights is not raw, else `model.safetensors`): the pickle-based `state.pt` of a checkpoint is never
opened, so evaluating a checkpoint from elsewhere cannot run code. Counting is exact across ranks
(each rank evaluates a contiguous slice, then one all-reduce of the sums and of the confusion matrix),
and precision/recall/F1 come from that all-reduced confusion matrix.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from resnet_dist.augment import BatchAugment
from resnet_dist.cache import ENV_CACHE, cache_dir, cache_line, check_limit, make_cache
from resnet_dist.checkpoint import load_inference_weights
from resnet_dist.config import TrainConfig
from resnet_dist.crops import eval_crop_spec
from resnet_dist.data import ShardStream
from resnet_dist.distributed import await_peers, check_world_size, end_run
from resnet_dist.engine import evaluate
from resnet_dist.errors import OneLineParser, UsageError, run_cli
from resnet_dist.filesafe import save_figure, write_json_atomic
from resnet_dist.index import DatasetIndex, shards_at
from resnet_dist.inference import (
    WEIGHT_NAMES,
    add_model_args,
    config_of,
    fill,
    read_meta,
    resolve_checkpoint,
    run_folder_of,
    stem_channels,
)
from resnet_dist.locations import check_location
from resnet_dist.models import model_for
from resnet_dist.storage import check_shards, is_remote, read_index

TTA_CHOICES = ("none", "flip")


# --- loading the checkpoint's model -----------------------------------------------------------------


def load_model(
    checkpoint: Path, meta: dict, index: DatasetIndex, data: str, weights: dict[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """The checkpoint's model, built from its own config, with `weights` (default: load_inference_weights'
    choice); refused if it does not fit the shards."""
    cfg = config_of(meta)
    if list(meta["classes"]) != list(index.classes):
        raise UsageError(
            f"checkpoint {checkpoint} was trained on {len(meta['classes'])} classes "
            f"({', '.join(map(str, meta['classes'][:5]))}{', ...' if len(meta['classes']) > 5 else ''}) "
            f"but {data} has {index.num_classes} ({', '.join(index.classes[:5])}"
            f"{', ...' if index.num_classes > 5 else ''})"
        )
    model = model_for(cfg, index.num_classes, index.channels)
    if weights is None:
        weights, _ = load_inference_weights(checkpoint)
    _, channels = stem_channels(model, weights)
    if channels != index.channels:
        raise UsageError(
            f"checkpoint {checkpoint} takes {channels}-channel images but {data} holds {index.channels}-channel images"
        )
    fill(model, weights, checkpoint, cfg)
    return model


def per_class(confusion, classes: list[str]) -> tuple[list[dict], dict]:
    """Per-class precision/recall/F1/support from a confusion matrix (rows: true, columns: predicted),
    and their unweighted (macro) means. A class never predicted has precision 0 (scikit-learn's default)."""
    c = np.asarray(confusion, dtype=np.float64)
    hits, predicted, support = np.diag(c), c.sum(0), c.sum(1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(hits), where=denom > 0)
    rows = [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    ]
    macro = {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}
    return rows, macro


# --- outputs --------------------------------------------------------------------------------------


def plot_confusion(path: Path, confusion, classes: list[str], title: str) -> None:
    """Rows normalised to the true class (so the diagonal is per-class recall); counts written in each
    cell when there are at most 20 classes. Written to a temporary file, then renamed."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(confusion, dtype=np.float64)
    rows = c.sum(1, keepdims=True)
    norm = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)
    k = len(classes)
    side = min(max(4.0, 0.5 * k + 2), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 50:
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{int(c[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def print_results(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # logs and pipes: no truncated columns
    head = (
        f"{result['split']} of {result['data']}{' with flip TTA' if result['tta'] == 'flip' else ''}, "
        f"{WEIGHT_NAMES[result['weights']]}: "
        f"top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  loss {result['loss']:.4f}  "
        f"on {result['count']:,} samples ({result['lost']} lost), {result['world_size']} process(es)"
    )
    table = Table(title=f"evaluation of {result['checkpoint']}")
    for name in ("class", "precision", "recall", "F1", "support"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for row in result["per_class"]:
        table.add_row(
            str(row["class"]),
            f"{row['precision']:.4f}",
            f"{row['recall']:.4f}",
            f"{row['f1']:.4f}",
            f"{row['support']:,}",
        )
    macro = result["macro"]
    table.add_row(
        "macro average",
        f"{macro['precision']:.4f}",
        f"{macro['recall']:.4f}",
        f"{macro['f1']:.4f}",
        f"{result['count']:,}",
        style="bold",
    )
    console.print(table)
    console.print(head)
    if is_remote(result["data"]):
        console.print(cache_line(result["cache"]))
    for problem in sorted(set(result["problems"])):
        console.print(f"warning: {problem}")
    console.print(f"wrote {Path(result['out']) / 'eval.json'} and {Path(result['out']) / 'confusion.png'}")


# --- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m resnet_dist.evaluate", description="Evaluate a checkpoint on one split of a shard folder."
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder (RUN_DIR/checkpoints/best) or a run folder (best, else last)",
    )
    parser.add_argument(
        "--data", required=True, help="shard folder or URL (http(s), s3, gs, az, hf) holding index.json"
    )
    parser.add_argument("--split", default="test", help="split of the shards to evaluate (default: test)")
    parser.add_argument(
        "--tta",
        default="none",
        choices=TTA_CHOICES,
        help="flip: average the softmax of each image and its horizontal mirror",
    )
    add_model_args(parser, res=False)
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval-SPLIT[-tta][-raw])")
    parser.add_argument("--batch-size", type=int, default=256, help="images per process per batch (default: 256)")
    parser.add_argument("--num-workers", type=int, default=2, help="loader worker processes per process (default: 2)")
    add_cache_args(parser)
    return parser


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    """The shard cache flags, as train has them (resnet_dist.config)."""
    parser.add_argument(
        "--cache-dir",
        default="",
        help=f"folder of the shard cache for remote --data (default: ${ENV_CACHE}, else ~/.cache/resnet-dist)",
    )
    parser.add_argument(
        "--cache-limit",
        type=float,
        default=0.0,
        help="GB the shard cache may hold, least-recently-used shards beyond it are deleted (default: 0, no limit)",
    )
    parser.add_argument("--no-cache", dest="cache", action="store_false", help="download remote shards each time")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive (got {args.batch_size})")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0 (got {args.num_workers})")
    check_limit(args.cache_limit)
    check_location(args.data, "--data")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint = resolve_checkpoint(Path(args.checkpoint))
    meta = read_meta(checkpoint)
    index = read_index(args.data)
    if args.split not in index.splits:
        raise UsageError(f"--split {args.split}: {args.data} has splits {', '.join(sorted(index.splits))}")
    weights, kind = load_inference_weights(checkpoint, args.weights)
    model = load_model(checkpoint, meta, index, args.data, weights)
    check_shards(args.data, index, [args.split])
    suffix = "-tta" if args.tta == "flip" else ""
    raw = "-raw" if args.weights == "raw" else ""  # beside, not over, the default (EMA when kept) evaluation
    out = Path(args.out) if args.out else run_folder_of(checkpoint) / f"eval-{args.split}{suffix}{raw}"

    await_peers()  # bounded: never a silent wait for a rank that is not coming
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    check_world_size(accelerator)
    cfg = config_of(meta)
    model = model.to(accelerator.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stream = eval_stream(args, index, accelerator, cfg)
    # The model saw the mean/std of the shards it was trained on: normalise with those.
    augment = BatchAugment(
        meta.get("mean", index.mean), meta.get("std", index.std), accelerator.device, channels_last=cfg.channels_last
    )
    metrics = evaluate(
        accelerator, model, stream, augment, args.num_workers, index.num_classes, tta_flip=args.tta == "flip"
    )
    rows, macro = per_class(metrics["confusion"], index.classes)
    result = {
        "checkpoint": str(checkpoint),
        "data": str(args.data),
        "split": args.split,
        "tta": args.tta,
        "weights": kind,
        "model": cfg.model,
        "epoch": meta.get("epoch"),
        "global_step": meta.get("global_step"),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "count": metrics["count"],
        "lost": metrics["lost"],
        "expected_count": index.splits[args.split].num_samples,
        "macro": macro,
        "per_class": rows,
        "classes": index.classes,
        "confusion": metrics["confusion"],
        "problems": sorted(set(metrics["problems"])),
        "cache": metrics["cache"].as_dict() | {"dir": cache_dir(stream.cache)},
        "out": str(out),
    }
    if accelerator.is_main_process:
        title = f"{cfg.model} on {args.split}{' (flip TTA)' if suffix else ''}: top-1 {metrics['top1']:.2%}"
        save_outputs(out, result, title)
    end_run(accelerator)
    return 0


def eval_stream(
    args: argparse.Namespace, index: DatasetIndex, accelerator: Accelerator, cfg: TrainConfig
) -> ShardStream:
    """This rank's slice of the split, remote shards through the shard cache, cropped as in training."""
    cache = make_cache(shards_at(args.data, index), args.cache, args.cache_dir, args.cache_limit)
    return ShardStream(
        args.data,
        index,
        args.split,
        batch_size=args.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        train=False,
        crop=eval_crop_spec(cfg, index.image_size),
        cache=cache,
    )


def save_outputs(out: Path, result: dict, title: str) -> None:
    """eval.json, confusion.png and the printed table (main process)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create ({exc.strerror})") from None
    write_json_atomic(out / "eval.json", result)
    plot_confusion(out / "confusion.png", result["confusion"], result["classes"], title)
    print_results(result)


if __name__ == "__main__":
    run_cli(main)
