"""Write checkpoint 1, then start checkpoint 2 and SIGKILL this process at its N-th file-system step
(fsync, rename), the way a power cut or an OOM kill lands at any moment. Usage: RUN_DIR N."""

import os
import signal
import sys
from pathlib import Path

import torch

from resnet_dist import checkpoint

run_dir, kill_at = Path(sys.argv[1]), int(sys.argv[2])
folder = run_dir / "checkpoints" / "last"


def save(version: int) -> None:
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.full((1000,), float(version)))
    checkpoint.save_checkpoint(folder, model, {"step": version}, {"version": version})


save(1)
calls = 0


def dying(real):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return wrapper


os.fsync, os.replace = dying(os.fsync), dying(os.replace)
save(2)
