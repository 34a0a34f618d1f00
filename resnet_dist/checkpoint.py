"""Checkpoints: written atomically, loaded only through safe loaders.

Layout of one checkpoint folder (checkpoints/last, checkpoints/best):
  model.safetensors   weights of the unwrapped model (loadable without this project)
  ema.safetensors     with --ema: the averaged weights, under the same keys (BatchNorm buffers included)
  state.pt            optimizer, scheduler, grad-scaler state and counters: tensors and plain
                      containers only, read back with torch.load(weights_only=True)
  meta.json           epoch, step, metrics: human-readable

A checkpoint is first written to a temporary sibling folder, fsynced, then renamed into place; the
previous one is moved aside first and deleted last, so a kill at any moment leaves one complete
checkpoint (`find_checkpoint` falls back to the moved-aside one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from resnet_dist.errors import DataError, UsageError
from resnet_dist.filesafe import fsync_dir

# Re-exported until trainer.py imports it from filesafe, where it now lives (issue 14: merged separately).


def _write_file(path: Path, write) -> None:
    try:
        write(path)
    except OSError:
        raise
    except Exception as exc:  # safetensors reports a full disk as its own error type
        raise OSError(str(exc)) from exc
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    folder: Path, model: torch.nn.Module, state: dict, meta: dict, extra: dict[str, dict] | None = None
) -> None:
    """Atomically replace `folder` with a checkpoint of `model` (unwrapped) and training `state`; `extra`
    maps more safetensors file names to state dicts written in the same folder (ema.safetensors)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        _write_file(tmp / "model.safetensors", lambda p: save_file(weights, str(p)))
        for name, tensors in (extra or {}).items():
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            _write_file(tmp / name, lambda p, t=tensors: save_file(t, str(p)))
        _write_file(tmp / "state.pt", lambda p: torch.save(state, p))
        _write_file(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
        fsync_dir(tmp)
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_checkpoint(folder: Path) -> Path | None:
    """`folder` if complete, else the copy moved aside by an interrupted save, else None."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / "meta.json").is_file():
            return candidate
    return None


WEIGHTS_CHOICES = ("auto", "ema", "raw")


def load_weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    path = Path(folder) / name
    try:
        return load_file(str(path))
    except (OSError, Exception) as exc:  # safetensors raises its own error type for damaged headers
        raise DataError(f"{path}: cannot read weights ({exc})") from exc


def load_inference_weights(folder: Path, which: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """(weights, "ema" or "raw") of a checkpoint for evaluate, predict and export: the EMA weights
    (ema.safetensors) when present, unless `which` is "raw"; "ema" insists on them."""
    if which not in WEIGHTS_CHOICES:
        raise UsageError(f"--weights {which}: choose one of {', '.join(WEIGHTS_CHOICES)}")
    has_ema = (Path(folder) / "ema.safetensors").is_file()
    if which == "ema" and not has_ema:
        raise UsageError(f"--weights ema: {folder} has no ema.safetensors (the run was trained without --ema)")
    if has_ema and which != "raw":
        return load_weights(folder, "ema.safetensors"), "ema"
    return load_weights(folder), "raw"


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, state, meta) of a checkpoint folder, through safe loaders only."""
    folder = Path(folder)
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"{folder}: damaged checkpoint ({exc})") from exc
    return load_weights(folder), state, meta
