"""launch/train.py with a fault at a chosen optimizer step, for tests/test_restarts.py. Run under `accelerate
launch` with the trainer's own arguments; the fault comes from the environment, so the library needs no hook:

  FAULT_KILL=RANK:STEP   that rank SIGKILLs itself after optimizer step STEP, in torchrun's first attempt only
                         (TORCHELASTIC_RESTART_COUNT 0): a crash that a restart should recover from.
  FAULT_PAUSE=STEP:FILE  rank 0 writes FILE after optimizer step STEP, then waits (the run stays alive, holding
                         its folder) until FILE is deleted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from resnet_dist import trainer
from resnet_dist.errors import run_cli


def at_step(run) -> None:
    rank, attempt = int(os.environ.get("RANK", "0")), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    kill = os.environ.get("FAULT_KILL")
    if kill and attempt == "0" and [rank, run.global_step] == [int(x) for x in kill.split(":")]:
        print(f"FAULT: rank {rank} SIGKILLs itself after optimizer step {run.global_step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get("FAULT_PAUSE")
    if pause and rank == 0 and run.global_step == int(pause.split(":", 1)[0]):
        flag = Path(pause.split(":", 1)[1])
        flag.write_text(str(os.getpid()))
        while flag.exists():
            time.sleep(0.1)


def main() -> None:
    real = trainer.after_optimizer_step

    def after_optimizer_step(run, loss, window) -> None:
        real(run, loss, window)  # the step is counted (and checkpointed on schedule) first
        at_step(run)

    trainer.after_optimizer_step = after_optimizer_step  # train_one_epoch looks it up in the module each step
    run_cli(trainer.main, sys.argv[1:])


if __name__ == "__main__":
    main()
