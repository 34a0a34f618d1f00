"""Time to accuracy: pack the data, train a recipe, and record test accuracy against wall time.

    python launch/time_to_accuracy.py --recipe fashion-mnist-15min --goal 94.0 --budget 15 --out results/fm-15min

The clock starts before the shards are packed and stops when the trainer has written its summary, so
the figure is everything a user waits for. The shards keep the full train split (no val carved out,
as in the dataset's published benchmark); test is evaluated after every epoch to draw the curve, and
the reported accuracy is the final weights' (no checkpoint is picked by test). Writes OUT/result.json
and OUT/curve.png; `--plot A B ... --to FILE` overlays the curves of finished results.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from resnet_dist.errors import OneLineParser, TrainingError, UsageError, run_cli
from resnet_dist.filesafe import save_figure, write_json_atomic
from resnet_dist.hardware import machine_record
from resnet_dist.recipes import RECIPES

HERE = Path(__file__).resolve().parent
CPU_CONFIG = HERE.parent / "accelerate_configs" / "cpu_ddp.yaml"


def parse(argv) -> argparse.Namespace:
    # No abbreviations: unknown flags go to the trainer, and --b must not silently become --budget.
    p = OneLineParser(prog="launch/time_to_accuracy.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--recipe", default="fashion-mnist-15min", choices=sorted(RECIPES))
    p.add_argument("--source", default="fashion-mnist", help="source for python -m resnet_dist.shard")
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="the source's files")
    p.add_argument("--out", type=Path, help="result folder (shards/, run/, result.json, curve.png)")
    p.add_argument("--goal", type=float, default=94.0, help="test top-1 %% to reach")
    p.add_argument("--budget", type=float, default=15.0, help="minutes allowed for the goal")
    p.add_argument(
        "--launch",
        default=f"{shlex.quote(accelerate_command())} launch --config_file {CPU_CONFIG} --mixed_precision bf16",
        help="launcher command line placed before launch/train.py",
    )
    p.add_argument("--plot", type=Path, nargs="+", help="only overlay the curves of these result folders")
    p.add_argument("--to", type=Path, help="with --plot: the PNG to write")
    args, args.train_flags = p.parse_known_args(argv)
    if args.plot is None and args.out is None:
        raise UsageError("--out is required: the result folder")
    if args.plot is not None and args.to is None:
        raise UsageError("--plot needs --to FILE.png")
    return args


def accelerate_command() -> str:
    """This Python's `accelerate` script, so `.venv/bin/python launch/...` works without an activated venv."""
    beside = Path(sys.executable).parent / "accelerate"
    return str(beside) if beside.exists() else "accelerate"


def run_step(cmd: list[str], what: str) -> None:
    """Run one stage with its output passed through; a failure is one line naming the stage."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    try:
        code = subprocess.run(cmd, env=os.environ | {"WANDB_SILENT": "true"}).returncode
    except OSError as exc:
        raise UsageError(f"cannot start {what}: {cmd[0]}: {exc.strerror or exc}") from exc
    if code != 0:
        raise TrainingError(f"{what} failed with exit code {code}; its own message is above")


def curve(history: list[dict], start: float, summary: dict, end: float) -> list[dict]:
    """(minutes since the clock started, test top-1 %) after each epoch, then at the end of the run."""
    points = [
        {"epoch": h["epoch"], "minutes": (h["time"] - start) / 60, "top1": 100 * h["val_top1"]}
        for h in history
        if "time" in h and h.get("val_top1") is not None
    ]
    points.append({"epoch": "end", "minutes": (end - start) / 60, "top1": 100 * summary["test_top1"]})
    return points


def first_reaching(points: list[dict], goal: float) -> dict | None:
    return next((p for p in points if p["top1"] >= goal), None)


def goal_met(points: list[dict], goal: float, budget: float) -> bool:
    """The finished run is at or above the goal, and finished within the budget."""
    end = points[-1]
    return end["top1"] >= goal and end["minutes"] <= budget


def measure(args) -> dict:
    out: Path = args.out
    if (out / "run").exists():
        raise UsageError(f"{out}/run exists: a timed run starts from nothing; choose another --out")
    machine = machine_record()  # before the clock: its load average is what the run started under
    start = time.time()
    shards = out / "shards"
    run_step(
        [
            sys.executable,
            "-m",
            "resnet_dist.shard",
            args.source,
            "--root",
            args.root,
            "--out",
            str(shards),
            "--workers",
            str(os.cpu_count() or 1),
            "--overwrite",
        ],
        "packing the shards",
    )
    packed = time.time()
    train = [
        *shlex.split(args.launch),
        str(HERE / "train.py"),
        "--recipe",
        args.recipe,
        "--data",
        str(shards),
        "--out",
        str(out / "run"),
        "--num-workers",
        "1",
        "--log-every",
        "100",
        *args.train_flags,
    ]
    run_step(train, "training")
    end = time.time()
    summary = json.loads((out / "run" / "summary.json").read_text())
    history = json.loads((out / "run" / "history.json").read_text())
    points = curve(history, start, summary, end)
    reached = first_reaching(points, args.goal)
    return {
        "recipe": args.recipe,
        "command": shlex.join(train),
        "goal_top1": args.goal,
        "budget_minutes": args.budget,
        "test_top1": 100 * summary["test_top1"],
        "wall_minutes": (end - start) / 60,
        "pack_minutes": (packed - start) / 60,
        "train_img_per_s": summary.get("train_img_per_s"),
        "reached_goal_at_minutes": reached and reached["minutes"],
        "met": goal_met(points, args.goal, args.budget),
        "curve": points,
        "machine": machine,
        "config": json.loads((out / "run" / "config.json").read_text()),
    }


def plot(results: list[dict], to: Path, labels: list[str]) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result, label in zip(results, labels):
        xs, ys = [p["minutes"] for p in result["curve"]], [p["top1"] for p in result["curve"]]
        ax.plot(xs, ys, marker="o", label=f"{label}: {result['test_top1']:.2f}% at {result['wall_minutes']:.1f} min")
    for result in {(r["goal_top1"], r["budget_minutes"]): r for r in results}.values():
        ax.axhline(result["goal_top1"], color="grey", lw=0.8, ls="--")
        ax.axvline(result["budget_minutes"], color="grey", lw=0.8, ls=":")
    ax.set_ylim(max(80.0, min(p["top1"] for r in results for p in r["curve"]) - 1), None)
    ax.set_xlabel("wall time since the clock started (min): packing, start-up, training, evaluation")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    to.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, to, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse(argv)
    if args.plot is not None:
        results = []
        for folder in args.plot:
            try:
                results.append(json.loads((folder / "result.json").read_text()))
            except (OSError, ValueError) as exc:
                raise UsageError(f"{folder}: no readable result.json ({exc})") from exc
        plot(results, args.to, [r["recipe"] for r in results])
        print(f"wrote {args.to}")
        return 0
    result = measure(args)
    write_json_atomic(args.out / "result.json", result)
    plot([result], args.out / "curve.png", [result["recipe"]])
    verdict = "met" if result["met"] else "missed"
    reached = result["reached_goal_at_minutes"]
    print(
        f"{result['recipe']}: test top-1 {result['test_top1']:.2f}% after {result['wall_minutes']:.1f} min "
        f"(goal {args.goal}% within {args.budget:g} min: {verdict}"
        f"{f'; first reached at {reached:.1f} min' if reached else ''}); {args.out / 'result.json'}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
