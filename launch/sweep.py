"""Run every combination of a few settings, one run after another, then compare them.

    python launch/sweep.py --data shards/c10 --out runs/wd --set weight_decay=5e-4,1e-4 \
        --launch "accelerate launch --config_file accelerate_configs/cpu_ddp.yaml" -- --epochs 100

Each variant is its own run folder under OUT, named by its settings (`weight_decay=0.0005`). A variant
with summary.json is finished and skipped; an interrupted one resumes, because the trainer resumes any
run folder holding a checkpoint. Flags after `--` go to every run unchanged (e.g. --recipe X). The
report over all variants lands in OUT/report (python -m resnet_dist.report).
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

from resnet_dist.config import TrainConfig
from resnet_dist.errors import OneLineParser, TrainingError, UsageError, run_cli
from resnet_dist.report import print_table, report

TRAIN = Path(__file__).resolve().parent / "train.py"
KINDS = {"int": int, "float": float, "str": str, "bool": None}


def parse_setting(text: str) -> tuple[str, list]:
    """KEY=V1,V2 -> (key, [typed values]); the key must be a TrainConfig field, the values its type."""
    if "=" not in text:
        raise UsageError(f"--set {text}: expected KEY=V1,V2,...")
    key, _, values = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if key not in fields or key in ("data", "out"):
        raise UsageError(
            f"--set {text}: {key!r} is not a training setting (one of "
            f"{', '.join(k for k in fields if k not in ('data', 'out'))})"
        )
    field = fields[key]
    kind = KINDS.get(field.type if isinstance(field.type, str) else getattr(field.type, "__name__", ""), str)
    typed = []
    for raw in values.split(","):
        raw = raw.strip()
        try:
            if kind is None:
                if raw.lower() not in ("true", "false", "on", "off", "1", "0"):
                    raise ValueError
                value = raw.lower() in ("true", "on", "1")
            else:
                value = kind(raw)
        except ValueError:
            raise UsageError(f"--set {text}: {raw!r} is not a valid {field.type} for {key}") from None
        choices = field.metadata.get("choices")
        if choices and value not in choices:
            raise UsageError(f"--set {text}: {key} must be one of {', '.join(choices)} (got {raw})")
        typed.append(value)
    if not raw or len(set(typed)) != len(typed):
        raise UsageError(f"--set {text}: empty or repeated values")
    return key, typed


def flags(key: str, value) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + key.replace("_", "-")]
    return [flag, str(value)]


def variant_name(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items())


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = OneLineParser(prog="launch/sweep.py", description="Run the cartesian product of settings, then report.")
    parser.add_argument("--data", required=True, help="shard folder or URL, passed to every run")
    parser.add_argument("--out", required=True, help="sweep folder: one run folder per variant, plus report/")
    parser.add_argument(
        "--set",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a training setting and its values; repeat for a grid",
    )
    parser.add_argument(
        "--launch",
        default="",
        help='launcher prefix, e.g. "accelerate launch --config_file '
        'accelerate_configs/cpu_ddp.yaml" (default: this Python, one process)',
    )
    args = parser.parse_args(argv)
    grid = dict(parse_setting(s) for s in args.set)
    for flag in extra:
        name = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
        if flag.startswith("--") and (name in grid or name in ("data", "out")):
            raise UsageError(f"{flag} after -- conflicts with --set/--data/--out")
    return args, grid, extra


def main(argv=None) -> int:
    args, grid, extra = parse_args(argv)
    launcher = shlex.split(args.launch) if args.launch else [sys.executable]
    out = Path(args.out)
    variants = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    run_dirs = []
    for i, settings in enumerate(variants, 1):
        run_dir = out / variant_name(settings)
        run_dirs.append(run_dir)
        if (run_dir / "summary.json").is_file():
            print(f"[{i}/{len(variants)}] {run_dir.name}: finished, skipped", flush=True)
            continue
        cmd = [
            *launcher,
            str(TRAIN),
            "--data",
            args.data,
            "--out",
            str(run_dir),
            *[f for k, v in settings.items() for f in flags(k, v)],
            *extra,
        ]
        print(f"[{i}/{len(variants)}] {run_dir.name}: {shlex.join(cmd)}", flush=True)
        code = subprocess.call(cmd)
        if code:
            raise TrainingError(f"variant {run_dir.name} failed (exit {code}); run the same sweep again to resume it")
    rows = report(run_dirs, out / "report")
    print_table(rows)
    print(f"report: {out / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
