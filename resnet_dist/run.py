"""A training run's state and its checkpoints: `Run`, and `save`/`restore`, which write it and read it back.

What `save` writes is exactly what `restore` needs to continue the run bitwise: weights, optimizer,
schedule, grad scaler, counters and history, plus the settings a resumed run must share.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from resnet_dist.cache import CacheCounts
from resnet_dist.checkpoint import load_checkpoint, load_weights, save_checkpoint
from resnet_dist.config import TrainConfig
from resnet_dist.data import ShardStream
from resnet_dist.engine import Step, bare
from resnet_dist.errors import TrainingError, UsageError
from resnet_dist.index import DatasetIndex
from resnet_dist.tracking import Reporter

# Settings a resumed run must share with its checkpoint: they fix the model, the data order or the
# schedule, so changing them would silently make a different run. Not among them: the world size,
# --batch-size, --grad-accum and --num-workers, since a step's samples depend only on the global batch
# they make (data.py); `check_global_batch` checks that one.
RESUME_MUST_MATCH = (
    "data",
    "model",
    "stem",
    "width",
    "dropout",
    "epochs",
    "optimizer",
    "schedule",
    "seed",
    "shuffle_block",
    "sync_bn",
    "train_crop",
    "res",
    "res_schedule",
    "rrc_scale",
    "rrc_ratio",
    # issue 13: mix
    "mixup",
    "cutmix",
    "mix_prob",
    "mix_switch_prob",
    "augment",
    "randaugment_n",
    "randaugment_m",
    # issue 13: init (the parameter groups must match for the optimizer state to load)
    "init_from",
    "freeze_backbone",
    "unfreeze_epoch",
    "backbone_lr_mult",
    "wd_norm_bias",
    "clip_grad_norm",
    "ema",  # issue 13: the average's decay, warm-up and period, and which val top-1 picks `best`
    "ema_warmup",
    "ema_every",
    "best_by",
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
    batch: int = 0  # this rank's micro-batches done in `epoch` (a multiple of grad_accum)
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
    init_note: str = ""  # issue 13: init; what --init-from loaded and adapted (announced once)

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
            "ema": step.ema.counters() if step.ema else None,
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
            # predict and export prepare images without the shards: the run's input, from here
            "image_size": list(run.index.image_size) if run.index.image_size else None,
            "channels": run.index.channels,
            "ema": {"decay": step.ema.decay, "updates": step.ema.updates} if step.ema else None,
        }
        folder = run.run_dir / "checkpoints" / name
        try:
            extra = {"ema.safetensors": step.ema.state_dict()} if step.ema else None
            save_checkpoint(folder, bare(acc, step.model), state, meta, extra)
        except OSError as exc:
            raise TrainingError(
                f"cannot write checkpoint {folder}: {exc.strerror or exc}; the previous checkpoint is intact"
            ) from exc
    acc.wait_for_everyone()


def restore(run: Run, folder: Path) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule, counters, history. The world size, loader
    workers and the split of the global batch may differ from the checkpoint's; the global batch only
    with --scale-lr linear (`rescale`)."""
    step = run.step
    acc = step.accelerator
    weights, state, meta = load_checkpoint(folder)
    saved = meta.get("config", {})
    changed = [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != getattr(run.cfg, k)]
    if changed:
        raise UsageError(
            f"{run.run_dir} holds a run with other settings ({', '.join(changed)}): "
            f"choose another --out for a new run, or repeat its settings to resume it"
        )
    old_accum = saved.get("grad_accum", run.cfg.grad_accum)
    old = (saved.get("batch_size", run.cfg.batch_size), meta.get("world_size", acc.num_processes), old_accum)
    check_global_batch(run, old)
    bare(acc, step.model).load_state_dict(weights)
    restore_ema(run, folder, state)
    step.optimizer.load_state_dict(state["optimizer"])
    fresh = copy.deepcopy(step.scheduler.state_dict())  # its step count and phases: this launch's global batch
    step.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])
    run.epoch, run.global_step = state["epoch"], state["global_step"]
    steps_in_epoch = state["batch"] // old_accum  # whole optimizer steps: a checkpoint is taken after one
    if math.prod(old) != run.global_batch:
        steps_in_epoch = rescale(run, steps_in_epoch, math.prod(old), fresh)
    run.batch = steps_in_epoch * run.cfg.grad_accum
    run.best_val, run.history, run.wandb_id = state["best_val"], list(state["history"]), meta["wandb_id"]
    run.reporter.line(
        f"resumed from {folder}: epoch {run.epoch + 1}, micro-batch {run.batch}, optimizer step {run.global_step}"
    )


def restore_ema(run: Run, folder: Path, state: dict) -> None:
    """The average as saved, bitwise. A checkpoint without one is refused with --ema rather than starting
    the average mid-run: the resumed run would silently differ from the uninterrupted one it continues."""
    ema = run.step.ema
    if ema is None:
        return
    if state.get("ema") is None:
        raise UsageError(
            f"{folder} was saved by a run without --ema: resume it without --ema, or start a new run "
            f"(another --out) with it"
        )
    ema.load(load_weights(folder, "ema.safetensors"), state["ema"])


def describe(batch: int, world: int, accum: int) -> str:
    return f"{batch * world * accum} ({batch} x {world} processes x {accum} accumulation)"


def check_global_batch(run: Run, old: tuple[int, int, int]) -> None:
    """A resume on another global batch is another run's sample order and lr, so only on request."""
    cfg = run.cfg
    new = (cfg.batch_size, run.step.accelerator.num_processes, cfg.grad_accum)
    if math.prod(old) != math.prod(new) and cfg.scale_lr != "linear":
        raise UsageError(
            f"{run.run_dir} holds a run with a global batch of {describe(*old)}, this launch makes "
            f"{describe(*new)}: keep the global batch to resume it (processes, --batch-size, --grad-accum and "
            f"--num-workers may change), or add --scale-lr linear to resume on the new one"
        )


def rescale(run: Run, steps_in_epoch: int, old_batch: int, fresh: dict) -> int:
    """Resume on another global batch (--scale-lr linear): the lr times new/old; the epoch goes on from
    the first step of the new batch that starts at or after the sample position reached,
    ceil(steps_in_epoch x old / new) (the samples before it, fewer than one new global batch, are not
    trained on this epoch); the optimizer step count and the schedule become the ones a run on the new
    batch from the start would have there. `fresh`: the scheduler's state as this launch built it (its
    total steps and phases follow the new batch), the checkpoint's being loaded. Returns the new steps
    done in the epoch."""
    new_batch, step = run.global_batch, run.step
    per_epoch = run.train.num_batches // run.cfg.grad_accum
    done = min(-(-steps_in_epoch * old_batch // new_batch), per_epoch)
    run.global_step = run.epoch * per_epoch + done
    ratio = new_batch / old_batch
    for group in step.optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] *= ratio
    scheduler = step.scheduler
    base_lrs = [lr * ratio for lr in scheduler.base_lrs]
    scheduler.load_state_dict(fresh)
    scheduler.base_lrs, scheduler.last_epoch = base_lrs, run.global_step
    with warnings.catch_warnings():  # get_lr outside step() warns; here it is what step() would set
        warnings.simplefilter("ignore")
        lrs = scheduler.get_lr()
    for group, lr in zip(step.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    run.reporter.line(
        f"global batch {old_batch} -> {new_batch}: lr x {ratio:g} (--scale-lr linear); the epoch goes on at "
        f"sample position {done * new_batch} (step {done} of {per_epoch}), optimizer step {run.global_step}"
    )
    return done
