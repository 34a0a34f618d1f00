"""python -m resnet_dist.predict: a checkpoint's top-k classes for image files.

    python -m resnet_dist.predict --checkpoint runs/fm photo.png more/ [--top-k 5] [--json|--csv]

Each image is prepared exactly as evaluate prepares the run's evaluation images (inference.prepare:
the same decoder, mode conversion, resize, centre crop and mean/std), so a file holding a shard's image
gets evaluate's prediction. Results go to stdout, one line (or CSV row) per image, or one JSON document;
warnings and the summary go to stderr. A file that cannot be read or decoded is a warning, never the end
of the run. One process, on CUDA when there is one, else the CPU; no `accelerate launch` needed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from resnet_dist.augment import BatchAugment
from resnet_dist.engine import eval_scores
from resnet_dist.errors import DataError, OneLineParser, UsageError, run_cli
from resnet_dist.inference import (
    WEIGHT_NAMES,
    InputSpec,
    add_model_args,
    config_of,
    input_spec,
    load_for_inference,
    prepare,
    read_meta,
    resolve_checkpoint,
)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TTA_CHOICES = ("none", "flip")


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Files as given (whatever their suffix), and the image files under each folder, recursively, sorted."""
    found = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            found.append(path)  # a missing file is reported with the unreadable ones
    return found


def prepared(files: list[Path], spec: InputSpec, warn) -> Iterator[tuple[Path, np.ndarray]]:
    """(file, uint8 HxWxC) for each file that reads and decodes; warn(line) for each one that does not."""
    for path in files:
        try:
            data = path.read_bytes()
            yield path, prepare(data, spec, str(path))
        except OSError as exc:
            warn(f"warning: {path}: cannot read ({exc.strerror or exc}); skipped")
        except DataError as exc:
            warn(f"warning: {exc}; skipped")


def chunks(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def probabilities(model, augment: BatchAugment, images: list[np.ndarray], tta: bool) -> torch.Tensor:
    """Softmax over classes of a batch, through evaluate's own scoring (engine.eval_scores)."""
    batch = torch.from_numpy(np.stack(images)).to(augment.mean.device)
    return eval_scores(model, batch, augment, tta).float().softmax(1).cpu()


def top_k(probs: torch.Tensor, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    values, ids = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(str(classes[i]), float(p)) for p, i in zip(row_p, row_i)] for row_p, row_i in zip(values, ids)]


# --- output ---------------------------------------------------------------------------------------


class Writer:
    """Text lines or CSV rows as each batch is done; one JSON document at the end."""

    def __init__(self, fmt: str, k: int, head: dict):
        self.fmt, self.k, self.head, self.rows = fmt, k, head, []
        if fmt == "csv":
            self.csv = csv.writer(sys.stdout, lineterminator="\n")
            self.csv.writerow(["file"] + [f"{name}_{r}" for r in range(1, k + 1) for name in ("class", "probability")])

    def add(self, path: Path, top: list[tuple[str, float]]) -> None:
        if self.fmt == "json":
            self.rows.append({"file": str(path), "top": [{"class": c, "probability": p} for c, p in top]})
        elif self.fmt == "csv":
            self.csv.writerow([str(path)] + [v for c, p in top for v in (c, f"{p:.6f}")])
        else:
            sys.stdout.write(f"{path}: " + ", ".join(f"{c} {p:.4f}" for c, p in top) + "\n")

    def finish(self, unreadable: list[str]) -> None:
        if self.fmt == "json":
            json.dump(self.head | {"predictions": self.rows, "unreadable": unreadable}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        sys.stdout.flush()


# --- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m resnet_dist.predict", description="Top-k classes of image files.")
    parser.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder or a run folder (its best, else last checkpoint)"
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders (searched recursively)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="fmt", action="store_const", const="json", help="one JSON document on stdout")
    fmt.add_argument(
        "--csv", dest="fmt", action="store_const", const="csv", help="CSV on stdout: header, a row per image"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument(
        "--tta", default="none", choices=TTA_CHOICES, help="flip: average the softmax with the mirror's"
    )
    add_model_args(parser)
    parser.set_defaults(fmt="text")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive (got {value})")
    if args.res < 0:
        raise UsageError(f"--res must be >= 0 (got {args.res})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint = resolve_checkpoint(Path(args.checkpoint))
    meta = read_meta(checkpoint)
    model, kind = load_for_inference(checkpoint, meta, args.weights)
    spec = input_spec(meta, model, args.res)
    files = find_images(args.inputs)
    if not files:
        raise UsageError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(args.inputs)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels_last = config_of(meta).channels_last
    model = model.to(device)
    if channels_last:  # as evaluate runs it
        model = model.to(memory_format=torch.channels_last)
    augment = BatchAugment(spec.mean, spec.std, device, channels_last=channels_last)
    sys.stderr.write(f"predicting with the {WEIGHT_NAMES[kind]} of {checkpoint} on {device}: {spec.describe()}\n")
    head = {"checkpoint": str(checkpoint), "weights": kind, "tta": args.tta, "classes": meta["classes"]}
    writer, unreadable, done = Writer(args.fmt, min(args.top_k, len(meta["classes"])), head), [], 0

    def warn(line: str) -> None:
        unreadable.append(line.removeprefix("warning: "))
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    for batch in chunks(prepared(files, spec, warn), args.batch_size):
        probs = probabilities(model, augment, [image for _, image in batch], args.tta == "flip")
        for (path, _), top in zip(batch, top_k(probs, meta["classes"], args.top_k)):
            writer.add(path, top)
        done += len(batch)
    writer.finish(unreadable)
    sys.stderr.write(f"{done} image(s) predicted, {len(unreadable)} unreadable\n")
    if not done:  # exit 1 (as the issue asks): the command was well formed, its files were not images
        sys.stderr.write(f"error: none of the {len(files)} file(s) could be read as an image\n")
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
