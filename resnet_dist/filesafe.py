"""Writing files so that a reader, or a kill at any moment, never finds half of one.

Each writer goes through a temporary file in the destination's own folder (a rename is atomic only
within one file system), then `os.replace` puts it over the destination in one step.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def fsync_dir(folder: Path, best_effort: bool = False) -> None:
    """Make the renames in `folder` durable: a rename reaches the disk only with the directory entry itself.

    best_effort: say nothing when the folder cannot be opened or synced, as some network and FUSE file
    systems refuse; the data files themselves were synced already.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj, compact: bool = False, shared: bool = False) -> Path:
    """JSON written to a temporary file (.NAME.XXXX.tmp) in the same folder, fsynced, then renamed over `path`;
    nothing left on failure. compact: no indentation (large tables); shared: readable by every user (mkstemp's
    0600 would hide a dataset's files from the other users of the shards)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if shared:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, **({"separators": (",", ":")} if compact else {"indent": 2}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """A matplotlib figure saved as `path` (PNG): drawn into .NAME.tmp.png beside it, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix tells matplotlib the format
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
