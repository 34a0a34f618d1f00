"""One run per run folder: the job's main process holds an advisory lock on RUN_DIR/run.lock for its life.

Two trainings on one `--out` would both write its checkpoints, history and W&B folder, each overwriting
the other's. An flock dies with the process that holds it, so a crashed or SIGKILLed run never blocks the
next one, and a torchrun restart (whose old processes are gone before the new ones start) takes it again.
Only the main process (global rank 0) locks: it alone writes the folder, and the other ranks of its job
learn its verdict through the process group, so they are never its rivals.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from accelerate.utils import broadcast_object_list

from resnet_dist.errors import UsageError

LOCK_NAME = "run.lock"
_held: dict[Path, int] = {}  # folder -> open, locked file descriptor; kept until this process ends


def claim_run_folder(run_dir: Path, accelerator) -> None:
    """Every rank calls it, after the process group forms: raises UsageError on every rank if another run
    holds `run_dir`, naming its host and pid (one line, said by rank 0)."""
    verdict = hold(run_dir) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        verdict = broadcast_object_list([verdict], from_process=0)[0]
    if verdict:
        raise UsageError(verdict)


def hold(run_dir: Path) -> str | None:
    """Lock `run_dir` for this process. None when this process holds it now; else why not, in one line."""
    folder = Path(run_dir).resolve()
    if folder in _held:
        return None  # this process already runs in it (setup called twice in one process)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated before it is ours: it names the holder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        return (
            f"--out {run_dir} is in use by another run ({holder}); wait for it to end or stop it, "
            "or choose another --out"
        )
    except OSError as exc:  # a file system without locks (some network mounts): run, but say it is unguarded
        os.close(fd)
        sys.stderr.write(f"warning: {path}: cannot lock ({exc.strerror or exc}); nothing stops a second run here\n")
        return None
    # The lock file itself is never deleted or replaced: a new inode would let a second run lock it too.
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _held[folder] = fd
    return None


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it; it writes just after locking, so wait a moment for it."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:  # caught mid-write
            info = None
        if isinstance(info, dict):
            return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"
        time.sleep(0.05)
    return "a process that is starting up"
