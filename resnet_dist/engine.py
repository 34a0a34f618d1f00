"""The device side of training: the Accelerator, one train step and exact evaluation.

`Step` holds exactly what a train step uses; nothing here knows the run around it (its state and
checkpoints are in run.py, the epoch and fit loops in trainer.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object

from resnet_dist.augment import BatchAugment, intra_op_threads
from resnet_dist.cache import CacheCounts
from resnet_dist.config import TrainConfig
from resnet_dist.data import ShardStream, make_loader
from resnet_dist.distributed import accelerate_backend, await_peers, check_world_size, join_attempt_group
from resnet_dist.ema import ModelEma
from resnet_dist.errors import UsageError
from resnet_dist.gpu_decode import batch_to_device
from resnet_dist.guard import StepGuard
from resnet_dist.hardware import cpu_has_bf16
from resnet_dist.mix import MixSpec, mix_batch


@dataclass
class GradClip:
    """--clip-grad-norm: the global gradient norm clipped before each optimizer step, and the last one seen."""

    max_norm: float = 0.0  # 0: off
    last_norm: torch.Tensor | None = None  # pre-clip norm at the last optimizer step (logged as train/grad_norm)

    def __call__(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        # Called on the sync step only: the gradients are then the whole accumulated (and all-reduced)
        # ones, so the norm is the global batch's. Accelerate unscales fp16 gradients first.
        if self.max_norm > 0:
            self.last_norm = accelerator.clip_grad_norm_(model.parameters(), self.max_norm).detach()


@dataclass(frozen=True)
class Step:
    """Exactly what one train step uses, built once by trainer.setup."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    augment: BatchAugment
    guard: StepGuard
    label_smoothing: float
    mix: MixSpec | None = None  # issue 13: mix (--mixup/--cutmix)
    clip: GradClip = field(default_factory=GradClip)  # issue 13: init
    ema: ModelEma | None = None  # issue 13: ema (--ema), moved after each real optimizer step


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
    join_attempt_group(accelerate_backend(on_cpu), group.timeout)  # a torchrun restart must not meet the dead
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


def seed_step(seed: int, epoch: int, batch: int, rank: int, generator: torch.Generator) -> None:
    """Seed dropout and augmentation from the step's coordinates: a resumed run draws the same numbers."""
    value = int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    generator.manual_seed(value)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()


def train_step(step: Step, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None):
    """One micro-batch: augment on the device, forward, backward; an optimizer step on the last of K."""
    acc = step.accelerator
    x = step.augment.train(images, generator)
    x, target, major = mix(step, x, labels, generator)  # mixing off: target = major = labels
    with acc.accumulate(step.model):
        with acc.autocast():
            logits = step.model(x)
            # Soft (N, K) targets compose with label smoothing as torchvision's reference does.
            loss = F.cross_entropy(logits, target, label_smoothing=step.label_smoothing)
        acc.backward(loss)
        step.guard.observe(loss)
        # Every rank reaches the same decision here: a NaN/inf loss anywhere skips the update everywhere.
        if acc.sync_gradients and step.guard.decide():
            step.clip(acc, step.model)
            step.optimizer.step()
            if not acc.optimizer_step_was_skipped:
                step.scheduler.step()
                update_ema(step)
        step.optimizer.zero_grad(set_to_none=True)
    # Train top-1 under mixing counts a hit on the label of larger weight (README: Mixup and CutMix).
    return loss.detach(), (logits.argmax(1) == major).sum()


def mix(step: Step, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None) -> tuple:
    """--mixup/--cutmix (resnet_dist.mix) with the batch transforms' intra-op threads on a CPU: a few
    elementwise passes, which torch's default threads slow down on a loaded machine (augment.intra_op_threads)."""
    with intra_op_threads(x.device, step.augment.cpu_threads):
        return mix_batch(x, labels, step.mix, generator)


def update_ema(step: Step) -> None:
    """After a real optimizer step only: not on accumulation micro-batches, not on a step the NaN guard or
    the grad scaler skipped (the weights did not move, so the average must not either)."""
    if step.ema is not None:
        step.ema.step(bare(step.accelerator, step.model))


def eval_scores(model: torch.nn.Module, images: torch.Tensor, augment: BatchAugment, tta_flip: bool) -> torch.Tensor:
    """Class scores usable as logits: plain logits, or with flip TTA the log of the mean softmax of each
    image and its mirror (cross-entropy of log-probabilities is their negative log-likelihood)."""
    if not tta_flip:
        return model(augment.eval(images)).float()
    both = torch.cat([images, images.flip(2)])  # uint8 NHWC: dim 2 is width
    probs = model(augment.eval(both)).float().softmax(1).view(2, len(images), -1).mean(0)
    return probs.clamp_min(1e-12).log()


def share_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating.

    DDP broadcasts them at the start of each training forward, and then every rank updates its own
    copy with its own batch; without this, each rank would evaluate its slice with slightly different
    statistics from the ones the checkpoint (rank 0's) holds."""
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    stream: ShardStream,
    augment: BatchAugment,
    num_workers: int,
    num_classes: int,
    tta_flip: bool = False,
    worst: int = 0,
) -> dict:
    """Exact metrics over a split: each rank counts its own slice, then one all-reduce of the sums.

    The unwrapped model runs in eval mode, so no collective happens per batch and ranks may run
    different numbers of batches. worst=K also returns (on every rank) the K most confidently wrong
    samples of the split as (confidence, position in the split's file order, true, predicted).
    """
    model = bare(accelerator, model)
    share_buffers(accelerator, model)
    was_training = model.training
    model.eval()
    device = accelerator.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top-1, top-5, count, lost
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    problems, fetched, wrong = [], CacheCounts(), []
    loader = make_loader(stream, num_workers, pin_memory=device.type == "cuda")
    for i, (images, labels, lost, batch_problems, batch_fetched) in enumerate(loader):
        images, labels, gpu_lost, gpu_problems = batch_to_device(images, labels, device, False, stream.strict)
        fetched += batch_fetched
        sums[4] += lost + gpu_lost
        problems += batch_problems + gpu_problems
        if labels.numel() == 0:
            continue
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
        if worst and not (lost or gpu_lost):  # with a sample lost, positions in the batch are unknown
            wrong = most_wrong(wrong, logits, labels, batch_start(stream, num_workers, i), worst)
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
        "cache": reduce_counts(accelerator, fetched),
        "worst": gather_worst(accelerator, wrong, worst) if worst else [],
    }


def reduce_counts(accelerator: Accelerator, counts: CacheCounts) -> CacheCounts:
    """Shard cache counts summed over ranks (int64: byte counts pass float32's exact range at 16 MB)."""
    total = accelerator.reduce(torch.tensor(counts.as_tuple(), dtype=torch.int64, device=accelerator.device), "sum")
    return CacheCounts(*(int(x) for x in total.tolist()))


def batch_start(stream: ShardStream, num_workers: int, i: int) -> int:
    """Position in the split (file order) of the first sample of the i-th batch an eval loader yields.

    The DataLoader takes batches from its workers in turn; worker w makes batches w, w + W, ... from a
    contiguous run of the rank's slice (ShardStream.__iter__), so batch i is the (i // W)-th of worker i % W."""
    workers = max(num_workers, 1)
    w, j = i % workers, i // workers
    first = sum(len(range(v, stream.num_batches, workers)) for v in range(w))
    return stream.rank_start + (first + j) * stream.batch_size


def most_wrong(kept: list, logits: torch.Tensor, labels: torch.Tensor, start: int, k: int) -> list:
    """The k most confident wrong predictions among `kept` and this batch's: (confidence, position, true, pred)."""
    conf, pred = logits.float().softmax(1).max(1)
    bad = (pred != labels).nonzero().flatten()
    bad = bad[conf[bad].argsort(descending=True)[:k]].tolist()
    new = [(conf[b].item(), start + b, labels[b].item(), pred[b].item()) for b in bad]
    return sorted(kept + new, key=lambda t: (-t[0], t[1]))[:k]


def gather_worst(accelerator: Accelerator, wrong: list, k: int) -> list:
    """Every rank's k most confidently wrong, merged (a collective: every rank calls it)."""
    everyone = gather_object([wrong]) if accelerator.num_processes > 1 else [wrong]
    return sorted((t for part in everyone for t in part), key=lambda t: (-t[0], t[1]))[:k]
