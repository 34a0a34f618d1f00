"""What the W&B run shows a cluster user beyond the per-step curves: epoch axes, per-rank throughput,
provenance of the code and data, end-of-run analysis of the test split and the checkpoints as artifacts.

Only the main process calls the logging functions here (DESIGN.md: W&B logs from one process);
`rank_throughput` and `run_provenance` are collectives, called by every rank. `wandb` is imported where
it is used: a run with --wandb-mode disabled never loads it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import subprocess
from pathlib import Path

import torch
from accelerate.utils import gather_object
from PIL import Image

from resnet_dist.cache import ShardCache
from resnet_dist.data import Lost, Piece, read_piece, sample_parts
from resnet_dist.errors import DataError
from resnet_dist.evaluate import per_class
from resnet_dist.filesafe import write_json_atomic
from resnet_dist.index import DatasetIndex, class_ids, shards_at
from resnet_dist.integrity import load_table
from resnet_dist.locations import local_path
from resnet_dist.storage import is_remote

PACKAGES = ("torch", "torchvision", "accelerate", "wandb", "resnet-dist")
# Metrics logged once per epoch, plotted against `epoch` rather than the optimizer step.
EPOCH_METRICS = ("val/*", "val_ema/*", "train/epoch_loss", "train/top1", "perf/epoch_*", "data/cache_*")
WORST = 16  # most confidently wrong test images in the table: enough to see a pattern, cheap to read back
# wandb.plot.confusion_matrix makes a table row per (true, predicted) pair: 100 classes make 10,000 rows,
# wandb.Table.MAX_ROWS, beyond which W&B truncates a table (warning, not error): a wrong matrix, so none.
CONFUSION_MAX_CLASSES = 100


def define_metrics(wandb_run) -> None:
    """Epoch-level metrics on an `epoch` axis; the summary keeps the best val top-1, not the last."""
    wandb_run.define_metric("epoch")
    for name in EPOCH_METRICS:
        wandb_run.define_metric(name, step_metric="epoch")
    wandb_run.define_metric("val/top1", step_metric="epoch", summary="max")
    wandb_run.define_metric("val_ema/top1", step_metric="epoch", summary="max")  # --ema: the average's


def rank_throughput(accelerator, images_per_s: float, data_wait: float) -> dict:
    """Every rank's img/s and data-wait fraction, on every rank (a collective), and which rank is slowest.

    A straggler (a slow GPU, a starved loader, a busy node) sets the pace of every synchronous step: the
    per-rank numbers show which one, where the all-rank mean would hide it."""
    mine = [round(images_per_s, 3), round(data_wait, 4)]
    everyone = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    rates = [r for r, _ in everyone]
    slowest = min(range(len(rates)), key=rates.__getitem__)
    return {"rank_img_per_s": rates, "rank_data_wait": [w for _, w in everyone], "slowest_rank": slowest}


def rank_metrics(ranks: dict, prefix: str, per_rank: bool) -> dict:
    """rank_throughput's numbers as W&B keys: PREFIX slowest/min/max, and rank/R/img_per_s, rank/R/data_wait."""
    out = {}
    for r, (rate, wait) in enumerate(zip(ranks["rank_img_per_s"], ranks["rank_data_wait"])):
        if per_rank:
            out[f"rank/{r}/img_per_s"], out[f"rank/{r}/data_wait"] = rate, wait
    return out | {
        f"{prefix}slowest_rank": ranks["slowest_rank"],
        f"{prefix}min_img_per_s_per_process": min(ranks["rank_img_per_s"]),
        f"{prefix}max_data_wait": max(ranks["rank_data_wait"]),
    }


def git_state(root: Path) -> dict:
    """The commit the code runs from and whether it has uncommitted changes; nulls outside a git checkout.

    `root` itself must be the checkout: an installed package under a venv that sits inside some other
    repository would otherwise report that repository's commit."""
    if not (root / ".git").exists():  # a folder in a checkout, a file in a worktree
        return {"git_commit": None, "git_dirty": None}
    try:
        run = dict(cwd=root, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip())
        return {"git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None  # resnet-dist run from a checkout without `pip install -e .`
    return found


def device_names(accelerator) -> list[str]:
    """Every rank's device, by name: a mixed or wrong allocation shows in the config."""
    dev = accelerator.device
    mine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} ({os.cpu_count()} cores)"
    return gather_object([mine]) if accelerator.num_processes > 1 else [mine]


def run_provenance(accelerator) -> dict:
    """Config entries for the code and machines a run used; every rank calls it (device_names gathers),
    the main process alone asks git, whose config is the one logged."""
    devices = device_names(accelerator)
    if not accelerator.is_main_process:
        return {}
    root = Path(__file__).resolve().parents[1]
    return git_state(root) | {"versions": versions(), "devices": devices, "world_size": accelerator.num_processes}


def stage_artifacts_in(run_dir: Path) -> None:
    """Offline artifacts are copied to a staging folder until `wandb sync`; W&B's default is in the
    user's home (~/.local/share/wandb), where a cluster's scratch run folder would not find it. Keep it
    in the run folder unless the user chose one (WANDB_DATA_DIR)."""
    os.environ.setdefault("WANDB_DATA_DIR", str(Path(run_dir) / "wandb" / "data"))


def artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.") or "shards"


def log_dataset(wandb_run, data: str, index_bytes: bytes) -> None:
    """index.json as a `dataset` artifact, so a model traces back to its data; for remote shards (http(s),
    s3, gs, az, hf) a reference to it, nothing uploaded and no store contacted (checksum=False: W&B would
    need credentials to hash it), with the sha256 of the bytes the run read in the metadata."""
    import wandb

    name = artifact_name("shards-" + data.rstrip("/").rsplit("/", 1)[-1])
    meta = {"data": data, "index_sha256": hashlib.sha256(index_bytes).hexdigest()}
    artifact = wandb.Artifact(name, type="dataset", metadata=meta)
    if is_remote(data):
        artifact.add_reference(data.rstrip("/") + "/index.json", name="index.json", checksum=False)
    else:
        artifact.add_file(str(Path(local_path(data)) / "index.json"), name="index.json")
    wandb_run.log_artifact(artifact)


def log_checkpoints(wandb_run, run_dir: Path, run_id: str) -> list[str]:
    """checkpoints/best and checkpoints/last as versions of one `model` artifact, aliased best and latest.

    Logged once, at the end of the run: a copy per epoch would cost a checkpoint's size every epoch (offline,
    W&B stages a copy of each until `wandb sync`). Returns the aliases logged."""
    import wandb

    logged = []
    for folder, alias in (("best", "best"), ("last", "latest")):
        path = Path(run_dir) / "checkpoints" / folder
        if not (path / "meta.json").is_file():
            continue
        artifact = wandb.Artifact(f"model-{run_id}", type="model", metadata={"checkpoint": folder})
        artifact.add_dir(str(path))
        wandb_run.log_artifact(artifact, aliases=[alias])
        logged.append(alias)
    return logged


def log_test_analysis(
    wandb_run, test: dict, index: DatasetIndex, data: str, step: int, cache: ShardCache | None = None
) -> None:
    """The test split's confusion matrix, per-class precision/recall/F1 and most confidently wrong images."""
    import wandb

    classes = list(index.classes)
    confusion = test["confusion"]
    truth = [t for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
    preds = [p for row in confusion for p, n in enumerate(row) for _ in range(n)]
    rows, _ = per_class(confusion, classes)
    columns = ["class", "precision", "recall", "f1", "support"]
    logged = {
        "test/per_class": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
        "test/most_confidently_wrong": worst_table(test["worst"], index, data, cache),
    }
    if len(classes) <= CONFUSION_MAX_CLASSES:
        logged["test/confusion_matrix"] = wandb.plot.confusion_matrix(y_true=truth, preds=preds, class_names=classes)
    wandb_run.log(logged, step=step)


def worst_table(worst: list, index: DatasetIndex, data: str, cache: ShardCache | None = None):
    """(confidence, position, true, predicted) rows as a table with each image, its key and its origin."""
    import wandb

    columns = ["image", "true", "predicted", "confidence", "key", "shard", "origin"]
    table = wandb.Table(columns=columns)
    positions = [pos for _, pos, _, _ in worst]
    found = locate(index.splits["test"].shards, positions)
    samples = read_samples(index, data, positions, found, cache)
    for (conf, pos, true, pred), (shard, _) in zip(worst, found):
        image, key, origin = samples.get(pos, (None, None, None))
        table.add_data(image, index.classes[true], index.classes[pred], conf, key, shard.file, origin)
    return table


def locate(shards: list, positions: list[int]) -> list[tuple]:
    """(shard, index within it) of each position of a split read in file order (eval order)."""
    out = []
    for pos in positions:
        offset = 0
        for shard in shards:
            if pos < offset + shard.num_samples:
                out.append((shard, pos - offset))
                break
            offset += shard.num_samples
    return out


def read_samples(
    index: DatasetIndex, data: str, positions: list[int], found: list[tuple], cache: ShardCache | None = None
) -> dict:
    """position -> (wandb.Image, key, origin) for the located samples: each shard read once, only the span
    holding its wanted samples kept; origins from its per-sample table when the shards carry one. Remote
    shards through the run's shard `cache`, which the test evaluation just filled: no second download."""
    import wandb

    by_shard: dict[str, list] = {}
    for pos, (shard, k) in zip(positions, found):
        by_shard.setdefault(shard.file, []).append((pos, shard, k))
    out = {}
    for wanted in by_shard.values():
        shard = wanted[0][1]
        lo, hi = min(k for _, _, k in wanted), max(k for _, _, k in wanted)
        try:
            piece = Piece(shard, lo, hi - lo + 1)
            items = read_piece(shards_at(data, index), piece, strict=False, tables=data, cache=cache)
        except DataError:
            continue  # the table is an extra: a shard that cannot be read again leaves its rows without images
        origins = _origins(data, shard)
        for pos, _, k in wanted:
            item = items[k - lo]
            if isinstance(item, Lost):
                continue
            try:
                image_bytes, _, _ = sample_parts(item, index.label, class_ids(index))
                image = wandb.Image(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
            except (DataError, OSError):  # PIL's UnidentifiedImageError is an OSError
                image = None
            out[pos] = (image, item.get("__key__"), origins[k] if origins else None)
    return out


def _origins(data: str, shard) -> list | None:
    """The shard's per-sample origins, if it has a trustworthy table; None otherwise (provenance is optional)."""
    if shard.samples is None:
        return None
    try:
        return load_table(data, shard).origins
    except DataError:
        return None


class StepLog:
    """Logs to W&B at optimizer steps no earlier attempt of this run folder has logged.

    W&B keeps one value per step and drops a step at or below the last one it has (with a warning). A run
    that crashed after its last checkpoint logged steps that the resumed attempt does again: those are
    skipped here, so each step is logged once across the offline run folders of all attempts, and the
    values kept are the first attempt's (resume is exact, so the repeated steps reproduce them).
    RUN_DIR/wandb/logged-step.json holds the last step logged; a step logged twice within one attempt
    (the train row and the epoch row of the same step) is one W&B row, as before."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / "wandb" / "logged-step.json"
        self.enabled = enabled  # the main process with W&B on: others neither log nor keep the file
        self.before = self._read() if enabled else -1
        self.last = self.before

    def _read(self) -> int:
        try:
            return int(json.loads(self.path.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1  # a new run folder (or a damaged marker: W&B then drops repeats itself)

    def log(self, accelerator, metrics: dict, step: int) -> None:
        if step <= self.before:
            return
        accelerator.log(metrics, step=step)
        if self.enabled and step > self.last:
            self.last = step
            write_json_atomic(self.path, {"step": step})
