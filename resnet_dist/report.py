"""python -m resnet_dist.report RUN_DIR [RUN_DIR ...] --out DIR: compare finished (or running) runs.

One row per run: model, parameters (counted from the checkpoint's weights), epochs, best and final val
top-1, test top-1, wall time, train throughput, weight decay and lr; printed with rich and written as
report.md and report.json. Overlaid curves: val_accuracy.png, generalization_gap.png (train top-1 minus
val top-1 per epoch) and loss.png (train solid, val dashed). This is the notebooks' "Simple CNN vs
ResNet-18" table and weight-decay ablation, made from run folders instead of by hand.

Only JSON files and safetensors headers are read: nothing in a run folder is unpickled.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from resnet_dist.checkpoint import find_checkpoint
from resnet_dist.errors import DataError, OneLineParser, UsageError, run_cli
from resnet_dist.filesafe import save_figure, write_json_atomic
from resnet_dist.models import build_model

# (key, header, kind) of each column, in order; kind says how to format it.
COLUMNS = [
    ("run", "run", "str"),
    ("model", "model", "str"),
    ("params", "params", "int"),
    ("epochs", "epochs", "int"),
    ("best_val_top1", "best val top-1", "pct"),
    ("final_val_top1", "final val top-1", "pct"),
    ("test_top1", "test top-1", "pct"),
    ("wall_seconds", "wall time", "secs"),
    ("train_img_per_s", "train img/s", "rate"),
    ("weight_decay", "weight decay", "num"),
    ("lr", "lr", "num"),
]


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def count_params(run_dir: Path, config: dict) -> int | None:
    """Parameter elements in the newest checkpoint's weights (buffers such as BN running stats excluded).

    The model is built from the run's config only to learn which tensor names are parameters; the sizes
    come from the safetensors header, so a different width or class count is counted as saved."""
    from safetensors import safe_open

    checkpoint = find_checkpoint(run_dir / "checkpoints" / "last") or find_checkpoint(run_dir / "checkpoints" / "best")
    if checkpoint is None or not (checkpoint / "model.safetensors").is_file():
        return None
    try:
        model = build_model(
            config.get("model", "resnet18"),
            num_classes=2,
            stem=config.get("stem", "cifar"),
            width=config.get("width") or None,
        )
        names = {name for name, _ in model.named_parameters()}
        total = 0
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
            for key in f.keys():
                if key in names:
                    n = 1
                    for dim in f.get_slice(key).get_shape():
                        n *= dim
                    total += n
        return total
    except Exception as exc:  # a damaged header or an unknown model: the rest of the row is still useful
        raise DataError(f"{checkpoint / 'model.safetensors'}: cannot count parameters ({exc})") from None


def load_run(run_dir: Path) -> dict:
    """The row and curves of one run folder; a folder that is not a run is refused in one line."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run folder")
    if not (run_dir / "config.json").is_file() or not (run_dir / "history.json").is_file():
        raise UsageError(
            f"{run_dir}: not a run folder (expected config.json and history.json written by launch/train.py)"
        )
    config = _json(run_dir / "config.json")
    history = _json(run_dir / "history.json")
    summary = _json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    if not isinstance(config, dict) or not isinstance(history, list) or not isinstance(summary, dict):
        raise DataError(f"{run_dir}: config.json, history.json or summary.json has an unexpected shape")
    vals = [h["val_top1"] for h in history if h.get("val_top1") is not None]
    test = summary.get("test_top1")
    if test is None and (run_dir / "eval-test" / "eval.json").is_file():
        test = _json(run_dir / "eval-test" / "eval.json").get("top1")
    row = {
        "run": run_dir.name,
        "path": str(run_dir),
        "model": config.get("model"),
        "params": count_params(run_dir, config),
        "epochs": summary.get("epochs_done", len(history)),
        "best_val_top1": summary.get("best_val_top1", max(vals) if vals else None),
        "final_val_top1": summary.get("final_val_top1", vals[-1] if vals else None),
        "test_top1": test,
        "wall_seconds": summary.get("wall_seconds"),
        "train_img_per_s": summary.get("train_img_per_s", history[-1].get("img_per_s") if history else None),
        "weight_decay": config.get("weight_decay"),
        "lr": config.get("lr"),
        "finished": bool(summary),
    }
    return {"row": row, "history": history}


def fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return {
        "str": lambda v: str(v),
        "int": lambda v: f"{v:,}",
        "pct": lambda v: f"{v:.2%}",
        "secs": lambda v: f"{v:,.1f} s",
        "rate": lambda v: f"{v:,.0f}",
        "num": lambda v: f"{v:g}",
    }[kind](value)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
        "| " + " | ".join("---" if kind == "str" else "---:" for _, _, kind in COLUMNS) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row[key], kind) for key, _, kind in COLUMNS) + " |")
    best = max((r for r in rows if r["best_val_top1"] is not None), key=lambda r: r["best_val_top1"], default=None)
    notes = []
    if best is not None:
        notes.append(f"Best val top-1: **{best['run']}** ({best['best_val_top1']:.2%}).")
    unfinished = [r["run"] for r in rows if not r["finished"]]
    if unfinished:
        notes.append(f"Not finished (no summary.json): {', '.join(unfinished)}.")
    notes.append(
        "Generalisation gap (train top-1 minus val top-1, per epoch) in generalization_gap.png; "
        "train top-1 is measured on augmented batches."
    )
    return "# Run comparison\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot_curves(out: Path, runs: list[dict]) -> list[Path]:
    """Overlaid per-epoch curves of every run; each PNG written to a temporary name, then renamed."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    def series(history, f):
        points = [(h["epoch"], f(h)) for h in history if h.get("epoch") is not None]
        return [(e, v) for e, v in points if v is not None]

    def val(h):
        return h.get("val_top1")

    def gap(h):
        return None if h.get("val_top1") is None or h.get("train_top1") is None else h["train_top1"] - h["val_top1"]

    figures = [
        ("val_accuracy", "val top-1", [("", val, "-")]),
        ("generalization_gap", "train top-1 - val top-1", [("", gap, "-")]),
        ("loss", "loss", [(" train", lambda h: h.get("train_loss"), "-"), (" val", lambda h: h.get("val_loss"), "--")]),
    ]
    written = []
    for name, ylabel, lines in figures:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            for suffix, f, style in lines:
                points = series(run["history"], f)
                if points:
                    ax.plot(
                        *zip(*points), style, marker="o", markersize=3, color=color, label=run["row"]["run"] + suffix
                    )
        if name == "generalization_gap":
            ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / f"{name}.png")
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


def print_table(rows: list[dict], footer: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="run comparison")
    for _, header, kind in COLUMNS:
        table.add_column(header, justify="left" if kind == "str" else "right")
    for row in rows:
        table.add_row(*(fmt(row[key], kind) for key, _, kind in COLUMNS))
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and pipes: no truncated columns
    console.print(table)
    if footer:
        console.print(footer)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m resnet_dist.report", description="Compare runs: table and curves.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by launch/train.py")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json and the PNG curves")
    return parser


def unique_names(paths: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell equal names apart."""
    depth = 1
    while depth < max(len(p.resolve().parts) for p in paths):
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(p) for p in paths]


def report(run_dirs: Sequence[str | Path], out: Path) -> list[dict]:
    runs = [load_run(Path(r)) for r in run_dirs]
    for run, name in zip(runs, unique_names([Path(r) for r in run_dirs])):
        run["row"]["run"] = name  # two runs both called "r" must not share a row name or a curve
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create ({exc.strerror})") from None
    rows = [run["row"] for run in runs]
    write_json_atomic(
        out / "report.json",
        {
            "columns": [key for key, _, _ in COLUMNS],
            "runs": rows,
            "history": {run["row"]["run"]: run["history"] for run in runs},
        },
    )
    tmp = out / ".report.md.tmp"
    tmp.write_text(markdown(rows))
    os.replace(tmp, out / "report.md")
    plot_curves(out, runs)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = report(args.runs, Path(args.out))
    print_table(
        rows, f"wrote {Path(args.out) / 'report.md'}, report.json, val_accuracy.png, generalization_gap.png, loss.png"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
