"""Write checkpoint 1, then start checkpoint 2 and SIGKILL this process at its N-th file-system step
(fsync, rename), the way a power cut or an OOM kill lands at any moment. Usage: RUN_DIR N.

With N = 0 nothing is killed: checkpoint 2 completes and the script prints how many steps it made.
tests/test_faults.py imports `save` and `file_system_steps` to count them before it picks the N to try.
"""

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from resnet_dist import checkpoint


def save(folder: Path, version: int) -> None:
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.full((1000,), float(version)))
    checkpoint.save_checkpoint(folder, model, {"step": version}, {"version": version})


@contextmanager
def file_system_steps(kill_at: int = 0) -> Iterator[list[int]]:
    """Count the os.fsync and os.replace calls made inside; SIGKILL this process at call `kill_at` (0: never)."""
    calls = [0]
    real = os.fsync, os.replace

    def dying(step):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(*args, **kwargs)

        return wrapper

    os.fsync, os.replace = dying(os.fsync), dying(os.replace)
    try:
        yield calls
    finally:
        os.fsync, os.replace = real


def main(run_dir: Path, kill_at: int) -> None:
    folder = run_dir / "checkpoints" / "last"
    save(folder, 1)
    with file_system_steps(kill_at) as calls:
        save(folder, 2)
    print(f"{calls[0]} file-system steps")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
