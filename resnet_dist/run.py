"""A training run's state and its checkpoints: `Run`, and `save`/`restore`, which write it and read it back.

What `save` writes is exactly what `restore` needs to continue the run bitwise: weights, optimizer,
schedule, grad scaler, counters and history, plus the settings a resumed run must share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from resnet_dist.cache import CacheCounts
from resnet_dist.checkpoint import load_checkpoint, save_checkpoint
from resnet_dist.config import TrainConfig
from resnet_dist.data import ShardStream
from resnet_dist.engine import Step, bare
from resnet_dist.errors import TrainingError, UsageError
from resnet_dist.index import DatasetIndex
from resnet_dist.tracking import Reporter

# Settings a resumed run must share with its checkpoint: they fix the model, the data order or the
# schedule, so changing them would silently make a different run.
RESUME_MUST_MATCH = (
    "data",
    "model",
    "stem",
    "width",
    "dropout",
    "epochs",
    "batch_size",
    "grad_accum",
    "optimizer",
    "schedule",
    "seed",
    "num_workers",
    "shuffle_block",
    "sync_bn",
    "train_crop",
    "res",
    "res_schedule",
    "rrc_scale",
    "rrc_ratio",
)


@dataclass
class Run:
    """Everything the loop needs, built once by trainer.setup; the step's parts live in `step` only."""

    cfg: TrainConfig
    step: Step
    index: DatasetIndex
    train: ShardStream
    evals: dict[str, ShardStream]
    reporter: Reporter
    run_dir: Path
    val_split: str | None
    epoch: int = 0
    batch: int = 0  # micro-batches done in `epoch` (a multiple of grad_accum)
    global_step: int = 0  # optimizer steps done
    best_val: float = -1.0
    history: list[dict] = field(default_factory=list)
    wandb_id: str = ""
    wandb_steps: object = None  # dashboard.StepLog: what W&B logging skips after a crash (trainer.setup)
    lost_train: int = 0  # train samples that could not be read (replaced in their batch)
    problems: list[str] = field(default_factory=list)  # data problems not yet reported
    reported: set[str] = field(default_factory=set)
    # Shard reads of this invocation, all ranks: not checkpointed, so a resumed run reports its own.
    cache: CacheCounts = field(default_factory=CacheCounts)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.step.accelerator.num_processes * self.cfg.grad_accum


def save(run: Run, name: str, metrics: dict | None = None) -> None:
    """Checkpoint `name` (last/best) from the main process; every rank waits so none runs ahead.

    A failed write (disk full, folder gone read-only) leaves the previous checkpoint as it was."""
    step = run.step
    acc = step.accelerator
    if acc.is_main_process:
        state = {
            "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "epoch": run.epoch,
            "batch": run.batch,
            "global_step": run.global_step,
            "best_val": run.best_val,
            "history": run.history,
        }
        meta = {
            "epoch": run.epoch,
            "batch": run.batch,
            "global_step": run.global_step,
            "world_size": acc.num_processes,
            "wandb_id": run.wandb_id,
            "metrics": metrics or {},
            "config": run.cfg.to_dict(),
            "classes": run.index.classes,
            "mean": run.index.mean,
            "std": run.index.std,
        }
        folder = run.run_dir / "checkpoints" / name
        try:
            save_checkpoint(folder, bare(acc, step.model), state, meta)
        except OSError as exc:
            raise TrainingError(
                f"cannot write checkpoint {folder}: {exc.strerror or exc}; the previous checkpoint is intact"
            ) from exc
    acc.wait_for_everyone()


def restore(run: Run, folder: Path) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule, counters, history."""
    step = run.step
    acc = step.accelerator
    weights, state, meta = load_checkpoint(folder)
    saved = meta.get("config", {})
    changed = [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != getattr(run.cfg, k)]
    if meta.get("world_size") != acc.num_processes:
        changed.append(f"world size ({meta.get('world_size')} -> {acc.num_processes})")
    if changed:
        raise UsageError(
            f"{run.run_dir} holds a run with other settings ({', '.join(changed)}): "
            f"choose another --out for a new run, or repeat its settings to resume it"
        )
    bare(acc, step.model).load_state_dict(weights)
    step.optimizer.load_state_dict(state["optimizer"])
    step.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])
    run.epoch, run.batch, run.global_step = state["epoch"], state["batch"], state["global_step"]
    run.best_val, run.history, run.wandb_id = state["best_val"], list(state["history"]), meta["wandb_id"]
    run.reporter.line(
        f"resumed from {folder}: epoch {run.epoch + 1}, micro-batch {run.batch}, optimizer step {run.global_step}"
    )
