"""What stops a run cleanly: preemption signals, non-finite losses, and a rank that stopped answering.

All ranks must take the same decision at the same optimizer step, or DDP hangs at the next
all-reduce. So each rank only records what it saw; once per optimizer step one small all-reduce
of [non-finite loss seen, stop requested] turns the local observations into a shared decision.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from resnet_dist.errors import TrainingError


class Diverged(TrainingError):
    """Too many non-finite steps in a row: the run stops, after saving its last good state."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# SIGUSR1 is the scheduler's "you will be requeued" notice (SLURM: #SBATCH --signal=B:USR1@120, which
# launch/slurm.sbatch forwards to the ranks): checkpoint at the next step like SIGTERM, then exit 0, so
# that neither torchrun (a failed rank: a report, or a restart under --max_restarts) nor srun
# (--kill-on-bad-exit) treats the stop as a failure; the batch script requeues the job itself.
REQUEUE_SIGNAL = signal.SIGUSR1


# Under `accelerate launch` one Ctrl-C reaches a rank twice: from the terminal (the whole process group)
# and again forwarded by torchrun, milliseconds later. Only a SIGINT this long after the first is a
# second Ctrl-C; a person pressing it again takes longer.
SECOND_CTRL_C_AFTER = 1.0  # seconds


class StopRequest:
    """Records SIGTERM/SIGINT/SIGUSR1 instead of dying mid-step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum: int | None = None  # the first stop signal: it names the stop and the exit code
        self.requeue = False  # SIGUSR1 seen, first or not: the job is requeued, whatever else came
        self._ctrl_c_at: float | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._ctrl_c_at is not None and now - self._ctrl_c_at >= SECOND_CTRL_C_AFTER:
                raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the checkpoint
            if self._ctrl_c_at is None:
                self._ctrl_c_at = now
        self.requeue = self.requeue or signum == REQUEUE_SIGNAL
        if self.signum is None:
            self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group; workers must outlive it until
    their training process has finished its step and shut them down."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StepGuard:
    """Shared per-step decisions: skip a non-finite step, stop after too many, stop on a signal."""

    def __init__(self, accelerator, stop: StopRequest, max_bad_steps: int):
        self.accelerator, self.stop, self.max_bad_steps = accelerator, stop, max_bad_steps
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        self.bad_steps = 0  # skipped steps in the whole run
        self.bad_in_row = 0
        self.stop_requested = False
        self.requeue_requested = False  # some rank saw SIGUSR1: every rank stops as requeued

    def observe(self, loss: torch.Tensor) -> None:
        """Note a micro-batch's loss; no host sync here."""
        self.nonfinite |= ~torch.isfinite(loss.detach())

    def decide(self) -> bool:
        """At an optimizer step: True if every rank may apply it. One all-reduce, one host sync."""
        flags = [float(self.stop.signum is not None), float(self.stop.requeue)]
        local = torch.cat([self.nonfinite.float().view(1), torch.tensor(flags, device=self.nonfinite.device)])
        nonfinite, stop, requeue = self.accelerator.reduce(local, reduction="sum").tolist()
        self.nonfinite.zero_()
        self.stop_requested = self.stop_requested or stop > 0
        self.requeue_requested = self.requeue_requested or requeue > 0
        if nonfinite == 0:
            self.bad_in_row = 0
            return True
        self.bad_steps += 1
        self.bad_in_row += 1
        return False

    def stop_signal(self) -> int:
        """The signal the whole job stops for: SIGUSR1 if any rank saw it (the job is requeued), else this
        rank's own, else SIGTERM (only another rank received one)."""
        if self.requeue_requested:
            return REQUEUE_SIGNAL
        return self.stop.signum or signal.SIGTERM

    def check_divergence(self, step: int) -> None:
        if self.max_bad_steps and self.bad_in_row >= self.max_bad_steps:
            raise Diverged(
                f"the loss was NaN or infinite for {self.bad_in_row} optimizer steps in a row "
                f"(up to step {step}); stopped. Lower --lr or check the data; the last good "
                f"state is in checkpoints/last"
            )


def name_silent_ranks(rank: int, world_size: int, wait_s: float = 3.0) -> str:
    """After a collective timed out: which ranks still answer. Every live rank leaves its mark in the
    launcher's key-value store (the TCPStore torchrun serves at MASTER_ADDR:MASTER_PORT); whoever has
    left none after `wait_s` is frozen or gone."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world_size < 2 or not addr or not port:
        return "see the other ranks' logs"
    try:
        store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=wait_s + 5))
        prefix = f"resnet_dist/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/alive-after-timeout"
        store.set(f"{prefix}/{rank}", "1")
        time.sleep(wait_s)
        silent = [r for r in range(world_size) if not store.check([f"{prefix}/{r}"])]
    except Exception as exc:  # the store itself may be gone with the launcher
        return f"could not ask the other ranks ({exc})"
    if not silent:
        return "every rank answers again (a slow collective, not a dead one)"
    return f"rank {', '.join(map(str, silent))} stopped answering"


def is_collective_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)
