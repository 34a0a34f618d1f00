"""python -m resnet_dist.export: a checkpoint as a file that runs without this package.

    python -m resnet_dist.export --checkpoint runs/fm --format onnx --out fm.onnx
    python -m resnet_dist.export --checkpoint runs/fm --format torchscript --out fm.pt

The input contract is the same for both formats: float32 NCHW in [0, 1] (what torchvision's ToTensor
gives: pixel / 255), at the run's channels and resolution, any batch size. The run's mean/std
normalisation is inside the file, so a user cannot forget it or apply another dataset's. The output is
the logits, one row per image. MODEL_CARD.md beside the file says what the model is and how to feed it.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import nn

from resnet_dist.errors import OneLineParser, UsageError, run_cli
from resnet_dist.filesafe import fsync_dir
from resnet_dist.inference import (
    WEIGHT_NAMES,
    InputSpec,
    add_model_args,
    input_spec,
    load_for_inference,
    read_meta,
    resolve_checkpoint,
    run_folder_of,
)
from resnet_dist.model_card import model_card

FORMATS = ("onnx", "torchscript")
OPSET = 18  # not torch 2.14's default (20): an older opset more runtimes read; checked with onnxruntime 1.32


class Normalized(nn.Module):
    """The model behind the run's normalisation: [0, 1] pixels in, logits out."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) float in [0, 1] -> (N, classes)
        return self.model((images - self.mean) / self.std)


def example(spec: InputSpec, n: int = 2) -> torch.Tensor:
    # Batch 2, not 1: torch.export specialises a size-1 dimension and would fix the batch axis.
    return torch.rand(n, spec.channels, *spec.size, generator=torch.Generator().manual_seed(0))


def write_onnx(module: nn.Module, spec: InputSpec, path: Path) -> None:
    """torch.export-based exporter (torch.onnx's default since 2.9; the TorchScript-based one is deprecated)."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"--format onnx needs {' and '.join(missing)}: pip install 'resnet-dist[export]'")
    batch = torch.export.Dim("batch", min=1)
    with redirect_stdout(io.StringIO()), warnings.catch_warnings():  # its progress lines: not the user's
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example(spec),),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            dynamo=True,
        )
        program.save(str(path), external_data=False)


def write_torchscript(module: nn.Module, spec: InputSpec, path: Path) -> None:
    """torch.jit.trace: the ResNets have no data-dependent control flow. Deprecated (with a warning) in
    torch 2.14 but still working; the warning is the user's to know (README), not to repeat here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example(spec))
        torch.jit.save(traced, str(path))


def write_atomic(path: Path, write) -> None:
    """write(tmp) beside `path`, fsync, rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from the other users a plain write allows
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m resnet_dist.export", description="Export a checkpoint to ONNX or TorchScript."
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder or a run folder (its best, else last checkpoint)"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx (onnxruntime) or torchscript (torch)")
    parser.add_argument("--out", required=True, help="the file to write; MODEL_CARD.md is written beside it")
    add_model_args(parser)
    return parser


def check_out(out: Path) -> None:
    """--out names a file; its folder is made if missing (as train's and shard's --out are)."""
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; name the file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the folder {out.parent} ({exc.strerror or exc})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {out.parent}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.res < 0:
        raise UsageError(f"--res must be >= 0 (got {args.res})")
    out = Path(args.out)
    check_out(out)
    checkpoint = resolve_checkpoint(Path(args.checkpoint))
    meta = read_meta(checkpoint)
    model, kind = load_for_inference(checkpoint, meta, args.weights)
    spec = input_spec(meta, model, args.res)
    module = Normalized(model, spec.mean, spec.std).eval()
    write = write_onnx if args.format == "onnx" else write_torchscript
    try:
        write_atomic(out, lambda tmp: write(module, spec, tmp))
        card = model_card(checkpoint, run_folder_of(checkpoint), meta, spec, kind, args.format, out.name)
        write_atomic(out.parent / "MODEL_CARD.md", lambda tmp: tmp.write_text(card))
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    what = f"{args.format}, {WEIGHT_NAMES[kind]} of {checkpoint}"
    sys.stdout.write(f"wrote {out} ({what}) and {out.parent / 'MODEL_CARD.md'}\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
