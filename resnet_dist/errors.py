"""One clear line and exit code 2 for bad input, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn


class UsageError(Exception):
    """Bad input the user can fix: the message is the whole explanation, on one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's complaints become a UsageError: one line and exit 2, like every other bad input."""

    def error(self, message: str):
        raise UsageError(message)


class DataError(Exception):
    """Data that is missing, damaged or inconsistent with its index."""


class TrainingError(Exception):
    """A run that cannot go on (diverged, a rank stopped answering, the disk is full): exit code 1."""


class Interrupted(Exception):
    """Stopped by a signal after saving a checkpoint: exit 128 + signal number, as a shell reports it,
    unless `exit_code` says otherwise (0 for a requeue: see guard.REQUEUE_SIGNAL)."""

    def __init__(self, message: str, signum: int, exit_code: int | None = None):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum if exit_code is None else exit_code


def _say(message: str, every_rank: bool = False) -> None:
    """A stderr line. Under a launcher every rank meets the same bad flag or Ctrl-C, so by default rank 0
    alone speaks; data and training errors can be one rank's own, so each rank says those, naming itself."""
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        sys.stderr.write(message + "\n")
    elif every_rank:
        sys.stderr.write(f"[rank {rank}] {message}\n")


def one_line(exc: Exception) -> str:
    """The message of `exc`; for an error re-raised from a DataLoader worker, the worker's own message
    (torch re-raises it with the worker's whole traceback prepended)."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a command's main(); turn expected failures into one stderr line and a non-zero exit."""
    try:
        code = main(argv)
    except UsageError as exc:
        _say(f"error: {one_line(exc)}")
        code = 2
    except DataError as exc:
        _say(f"error: {one_line(exc)}", every_rank=True)
        code = 2
    except TrainingError as exc:
        _say(f"error: {one_line(exc)}", every_rank=True)
        code = 1
    except Interrupted as exc:
        _say(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted")
        code = 130
    except Exception:  # a bug: its traceback is worth having, then the same prompt exit
        traceback.print_exc()
        code = 1
    if code and _others_involved():
        # After a failure, a normal interpreter exit can wait forever: on peers blocked in a collective with
        # this rank, or on loader workers that ignore SIGTERM (see guard.ignore_stop_signals). Leave at
        # once; a launcher sees the exit code and stops the other ranks.
        sys.stdout.flush()
        sys.stderr.flush()
        _release_workers()
        os._exit(code)
    sys.exit(code or 0)


def _release_workers() -> None:
    """Before os._exit: kill loader workers (they ignore SIGTERM) and unlink the named semaphores of their
    queues. Under a forkserver those are named and tracked; left to the resource tracker, it prints a
    'leaked semaphore objects' warning after our one error line. Multiprocessing's exit finalizers
    (priority >= 0) are what a normal exit runs to unlink them; the joins it would also do are skipped."""
    import multiprocessing
    import multiprocessing.util

    for child in multiprocessing.active_children():
        child.kill()
    multiprocessing.util._run_finalizers(0)


def _others_involved() -> bool:
    """A process group, or child processes (loader workers) still alive."""
    import multiprocessing

    dist = sys.modules.get("torch.distributed")
    return bool(dist and dist.is_available() and dist.is_initialized()) or bool(multiprocessing.active_children())
