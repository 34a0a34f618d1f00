"""Training and evaluation: the train step, one epoch, evaluation, and the fit loop around them."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object

from resnet_dist.augment import BatchAugment
from resnet_dist.checkpoint import save_checkpoint
from resnet_dist.config import TrainConfig
from resnet_dist.data import ShardStream, make_loader
from resnet_dist.distributed import await_peers, check_world_size
from resnet_dist.errors import TrainingError, UsageError
from resnet_dist.guard import StepGuard
from resnet_dist.hardware import cpu_has_bf16
from resnet_dist.index import DatasetIndex
from resnet_dist.tracking import Meter, Reporter


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    accelerator: Accelerator
    index: DatasetIndex
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    augment: BatchAugment
    train: ShardStream
    evals: dict[str, ShardStream]
    reporter: Reporter
    run_dir: Path
    val_split: str | None
    guard: StepGuard | None = None
    epoch: int = 0
    batch: int = 0  # micro-batches done in `epoch` (a multiple of grad_accum)
    global_step: int = 0  # optimizer steps done
    best_val: float = -1.0
    history: list[dict] = field(default_factory=list)
    wandb_id: str = ""
    lost_train: int = 0  # train samples that could not be read (replaced in their batch)
    problems: list[str] = field(default_factory=list)  # data problems not yet reported
    reported: set[str] = field(default_factory=set)

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return self.train.num_batches // self.cfg.grad_accum

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.accelerator.num_processes * self.cfg.grad_accum


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerate sets up DDP, mixed precision and accumulation; we only pick CPU explicitly."""
    on_cpu = not torch.cuda.is_available()
    ddp = DistributedDataParallelKwargs(
        gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: one copy less per step
        bucket_cap_mb=25,
    )  # torch's default; overlaps all-reduce with the backward pass
    # A dead or hung rank makes the others wait in a collective: this bounds the wait.
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))
    await_peers()  # a bounded wait for the other ranks first: torch's own is long, or endless on a wrong port
    accelerator = Accelerator(
        cpu=on_cpu,  # without it, a CPU-only launch of N processes gives N runs of world size 1
        mixed_precision=precision_override(cfg, on_cpu),
        dynamo_backend="inductor" if cfg.compile else None,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.wandb_mode == "disabled" else "wandb",
        project_dir=cfg.out,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[ddp, group],
    )
    check_world_size(accelerator)
    if on_cpu and accelerator.mixed_precision == "fp16":
        raise UsageError("fp16 mixed precision has no autocast on CPU; use --mixed_precision bf16 or no")
    return accelerator


def precision_override(cfg: TrainConfig, on_cpu: bool) -> str | None:
    """bf16 on a bf16-capable CPU when the launch asked for none (the faster path by default); else
    None, which leaves Accelerate's own choice (--mixed_precision / the config file) alone."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if on_cpu and cfg.cpu_bf16 == "auto" and launched == "no" and cpu_has_bf16():
        return "bf16"
    return None


def bare(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model without DDP or torch.compile wrappers: what checkpoints hold and evaluation runs."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def save(run: Run, name: str, metrics: dict | None = None) -> None:
    """Checkpoint `name` (last/best) from the main process; every rank waits so none runs ahead.

    A failed write (disk full, folder gone read-only) leaves the previous checkpoint as it was."""
    acc = run.accelerator
    if acc.is_main_process:
        state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
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
            save_checkpoint(folder, bare(acc, run.model), state, meta)
        except OSError as exc:
            raise TrainingError(
                f"cannot write checkpoint {folder}: {exc.strerror or exc}; the previous checkpoint is intact"
            ) from exc
    acc.wait_for_everyone()


def seed_step(seed: int, epoch: int, batch: int, rank: int, generator: torch.Generator) -> None:
    """Seed dropout and augmentation from the step's coordinates: a resumed run draws the same numbers."""
    value = int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    generator.manual_seed(value)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
    """One micro-batch: augment on the device, forward, backward; an optimizer step on the last of K."""
    acc, cfg = run.accelerator, run.cfg
    x = run.augment.train(images, generator)
    with acc.accumulate(run.model):
        with acc.autocast():
            logits = run.model(x)
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        acc.backward(loss)
        run.guard.observe(loss)
        # Every rank reaches the same decision here: a NaN/inf loss anywhere skips the update everywhere.
        if acc.sync_gradients and run.guard.decide():
            run.optimizer.step()
            if not acc.optimizer_step_was_skipped:
                run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), (logits.argmax(1) == labels).sum()


def train_one_epoch(run: Run) -> dict:
    """Train from micro-batch `run.batch` to the end of `run.epoch` (or until --max-steps)."""
    acc, cfg = run.accelerator, run.cfg
    run.model.train()
    run.train.set_epoch(run.epoch, run.batch)
    loader = make_loader(run.train, cfg.num_workers, pin_memory=acc.device.type == "cuda")
    generator = torch.Generator()
    meter, window = Meter(), Meter()
    loss_sum = torch.zeros((), device=acc.device)
    correct = torch.zeros((), dtype=torch.int64, device=acc.device)
    seen = 0
    run.reporter.start_epoch(run.epoch, cfg.epochs, run.train.num_batches, run.batch)
    it = iter(loader)
    try:
        while run.batch < run.train.num_batches and not run_is_done(run) and not run.guard.stop_requested:
            t0 = time.perf_counter()
            images, labels, lost, problems = next(it)
            run.lost_train += lost
            run.problems += problems
            images = images.to(acc.device, non_blocking=True)
            labels = labels.to(acc.device, non_blocking=True)
            wait = time.perf_counter() - t0
            meter.add_wait(wait)
            window.add_wait(wait)
            seed_step(cfg.seed, run.epoch, run.batch, acc.process_index, generator)
            loss, hits = train_step(run, images, labels, generator)
            loss_sum += loss * labels.shape[0]
            correct += hits
            seen += labels.shape[0]
            meter.add_images(labels.shape[0])
            window.add_images(labels.shape[0])
            run.batch += 1
            run.reporter.step(1)
            if acc.sync_gradients:
                after_optimizer_step(run, loss, window)
    finally:
        del it, loader  # stop the loader workers now, also when a step raised
    run.reporter.end_epoch()
    totals = acc.reduce(
        torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(seen), device=acc.device)]),
        reduction="sum",
    )
    n = max(totals[2].item(), 1.0)
    return {
        "train_loss": totals[0].item() / n,
        "train_top1": totals[1].item() / n,
        "img_per_s": meter.rate * acc.num_processes,
        "data_wait": meter.wait_fraction,
        "epoch_seconds": meter.elapsed,
    }


def after_optimizer_step(run: Run, loss: torch.Tensor, window: Meter) -> None:
    """Count the step; stop if diverged; log and checkpoint on schedule (every rank at the same steps)."""
    cfg = run.cfg
    run.global_step += 1
    run.guard.check_divergence(run.global_step)
    if run.global_step % cfg.log_every == 0:
        log_train(run, loss, window)
        window.reset()
    if cfg.checkpoint_every and run.global_step % cfg.checkpoint_every == 0:
        save(run, "last")


def run_is_done(run: Run) -> bool:
    return bool(run.cfg.max_steps) and run.global_step >= run.cfg.max_steps


def log_train(run: Run, loss: torch.Tensor, window: Meter) -> None:
    """Per-step metrics. Every rank takes part in the reduce; only the main process logs."""
    acc = run.accelerator
    mean_loss = acc.reduce(loss.float(), reduction="mean").item()
    lr = run.optimizer.param_groups[0]["lr"]
    metrics = {
        "train/loss": mean_loss,
        "train/lr": lr,
        "perf/img_per_s": window.rate * acc.num_processes,
        "perf/img_per_s_per_process": window.rate,
        "perf/data_wait_fraction": window.wait_fraction,
        "epoch": run.epoch + run.batch / run.train.num_batches,
    }
    acc.log(metrics, step=run.global_step)
    report_problems(run)
    stats = (
        f"loss {mean_loss:.4f}  lr {lr:.4g}  {metrics['perf/img_per_s']:.0f} img/s  "
        f"data wait {window.wait_fraction:.0%}"
    )
    run.reporter.step(0, stats)
    run.reporter.log_line(f"epoch {run.epoch + 1} step {run.global_step}: {stats}")


def report_problems(run: Run) -> None:
    """Data problems every rank met since the last call: one warning each, from the main process.

    A collective: every rank calls it at the same points (log steps and epoch ends)."""
    everyone = gather_object([run.problems]) if run.accelerator.num_processes > 1 else [run.problems]
    run.problems = []
    for problem in sorted({p for problems in everyone for p in problems} - run.reported):
        run.reported.add(problem)
        run.reporter.line(f"warning: {problem}")


def eval_scores(model: torch.nn.Module, images: torch.Tensor, augment: BatchAugment, tta_flip: bool) -> torch.Tensor:
    """Class scores usable as logits: plain logits, or with flip TTA the log of the mean softmax of each
    image and its mirror (cross-entropy of log-probabilities is their negative log-likelihood)."""
    if not tta_flip:
        return model(augment.eval(images)).float()
    both = torch.cat([images, images.flip(2)])  # uint8 NHWC: dim 2 is width
    probs = model(augment.eval(both)).float().softmax(1).view(2, len(images), -1).mean(0)
    return probs.clamp_min(1e-12).log()


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    stream: ShardStream,
    augment: BatchAugment,
    num_workers: int,
    num_classes: int,
    tta_flip: bool = False,
) -> dict:
    """Exact metrics over a split: each rank counts its own slice, then one all-reduce of the sums.

    The unwrapped model runs in eval mode, so no collective happens per batch and ranks may run
    different numbers of batches.
    """
    model = bare(accelerator, model)
    was_training = model.training
    model.eval()
    device = accelerator.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top-1, top-5, count, lost
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    problems = []
    for images, labels, lost, batch_problems in make_loader(stream, num_workers, pin_memory=device.type == "cuda"):
        sums[4] += lost
        problems += batch_problems
        if labels.numel() == 0:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with accelerator.autocast():
            logits = eval_scores(model, images, augment, tta_flip)
        sums[:4] += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                topk_correct(logits, labels, 1).double(),
                topk_correct(logits, labels, 5).double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
            ]
        )
        confusion.index_put_((labels, logits.argmax(1)), torch.ones_like(labels), accumulate=True)
    model.train(was_training)
    sums = accelerator.reduce(sums, reduction="sum")
    confusion = accelerator.reduce(confusion, reduction="sum")
    n = max(sums[3].item(), 1.0)
    return {
        "loss": sums[0].item() / n,
        "top1": sums[1].item() / n,
        "top5": sums[2].item() / n,
        "count": int(sums[3].item()),
        "lost": int(sums[4].item()),
        "problems": problems,
        "confusion": confusion.cpu().tolist(),
    }
