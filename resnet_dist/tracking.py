"""What a run tells people: rich console and progress, W&B (through Accelerate), history, plots.

Only the main process prints or writes; every other rank gets a Reporter that stays silent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from resnet_dist.filesafe import save_figure, write_json_atomic


class Meter:
    """Wall time split into waiting for data and the rest, and images seen, since the last reset."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.wait, self.images = time.perf_counter(), 0.0, 0

    def add_wait(self, seconds: float) -> None:
        self.wait += seconds

    def add_images(self, n: int) -> None:
        self.images += n

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    @property
    def wait_fraction(self) -> float:
        return self.wait / self.elapsed

    @property
    def rate(self) -> float:
        return self.images / self.elapsed


def wandb_init_kwargs(run_dir: Path, mode: str, run_id: str, name: str, system_stats: bool = True) -> dict:
    """W&B settings: the run folder lives inside RUN_DIR; a resumed run keeps its id."""
    return {
        "wandb": {
            "dir": str(run_dir),
            "mode": mode,
            "id": run_id,
            "name": name,
            "resume": "allow",
            "settings": {"console": "off", "x_disable_stats": not system_stats},
        }
    }


class Reporter:
    """Console output of the main process; a silent stand-in on other ranks."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=True) if enabled else None
        self.interactive = bool(self.console and self.console.is_terminal)
        self.progress: Progress | None = None
        self.task = None

    def line(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if not (self.enabled and self.interactive):
            return
        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, stats="")

    def step(self, advance: int, stats: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=advance, **({"stats": stats} if stats else {}))

    def log_line(self, stats: str) -> None:
        """Periodic train line; in a terminal the progress bar shows it instead (no duplicate output)."""
        if self.enabled and not self.interactive:
            self.console.print(stats)

    def end_epoch(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def table(self, title: str, rows: dict) -> None:
        if not self.enabled:
            return
        table = Table(title=title, show_header=False)
        for key, value in rows.items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        self.console.print(table)


def write_history(run_dir: Path, history: list[dict]) -> None:
    write_json_atomic(run_dir / "history.json", history)


def plot_history(run_dir: Path, history: list[dict]) -> None:
    """loss.png, accuracy.png and lr.png in RUN_DIR/plots: the curves the notebooks drew by hand."""
    if not history:
        return
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    plots = Path(run_dir) / "plots"
    plots.mkdir(exist_ok=True)
    epochs = [h["epoch"] for h in history]
    figures = {
        "loss": [("train_loss", "train"), ("val_loss", "val")],
        "accuracy": [("train_top1", "train top-1"), ("val_top1", "val top-1"), ("val_top5", "val top-5")],
        "lr": [("lr", "learning rate (end of epoch)")],
    }
    for name, series in figures.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in series:
            points = [(e, h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, plots / f"{name}.png")
        plt.close(fig)
