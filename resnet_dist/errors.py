"""One clear line and exit code 2 for bad input, never a traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn, Sequence


class UsageError(Exception):
    """Bad input the user can fix: the message is the whole explanation, on one line."""


class DataError(Exception):
    """Data that is missing, damaged or inconsistent with its index."""


def fail(message: str) -> NoReturn:
    raise UsageError(message)


def _say(message: str) -> None:
    """stderr line from rank 0 only: under a launcher every rank meets the same bad flag or Ctrl-C."""
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write(message + "\n")


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
    except (UsageError, DataError) as exc:
        _say(f"error: {one_line(exc)}")
        code = 2
    except KeyboardInterrupt:
        _say("interrupted")
        code = 130
    sys.exit(code or 0)
