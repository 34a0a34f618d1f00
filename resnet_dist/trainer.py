"""The fit loop: set a run up (or resume it), train epoch by epoch, evaluate, checkpoint, report."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import torch
from accelerate.utils import gather_object

from resnet_dist import dashboard
from resnet_dist.augment import BatchAugment
from resnet_dist.autoaug import augment_spec
from resnet_dist.cache import CacheCounts, cache_dir, cache_line, make_cache
from resnet_dist.checkpoint import find_checkpoint
from resnet_dist.config import TrainConfig, parse_args
from resnet_dist.crops import eval_crop_spec, train_crop_spec, train_res
from resnet_dist.data import ShardStream, make_loader, micro_batch
from resnet_dist.distributed import convert_sync_batchnorm, end_run
from resnet_dist.ema import make_ema
from resnet_dist.engine import (
    GradClip,
    Step,
    bare,
    evaluate,
    make_accelerator,
    precision_override,
    reduce_counts,
    seed_step,
    train_step,
)
from resnet_dist.errors import Interrupted, TrainingError, UsageError
from resnet_dist.filesafe import write_json_atomic
from resnet_dist.gpu_decode import batch_to_device
from resnet_dist.guard import (
    REQUEUE_SIGNAL,
    Diverged,
    StepGuard,
    StopRequest,
    is_collective_timeout,
    name_silent_ranks,
)
from resnet_dist.index import shards_at
from resnet_dist.mix import mix_spec
from resnet_dist.models import count_parameters, model_for
from resnet_dist.optim import build_optimizer, build_scheduler, param_groups
from resnet_dist.pretrained import backbone_eval, backbone_frozen, init_from, set_backbone_trainable
from resnet_dist.recipes import RECIPES, scaled_lr
from resnet_dist.run import Run, restore, save
from resnet_dist.runlock import claim_run_folder
from resnet_dist.storage import check_shards, read_bytes, read_index
from resnet_dist.tracking import Meter, Reporter, plot_history, wandb_init_kwargs, write_history


def pick_splits(cfg: TrainConfig, splits: dict) -> tuple[str | None, list[str]]:
    """(split that picks the best checkpoint, splits evaluated): val if there is one, else test."""
    if "train" not in splits:
        raise UsageError(f"{cfg.data}: index.json has no 'train' split (has {', '.join(splits)})")
    evals = [s for s in ("val", "test") if s in splits]
    return (evals[0] if evals else None), evals


def check_fits(cfg: TrainConfig, index, world_size: int, device: str) -> None:
    check_crop_fits(cfg, index, device)
    steps = index.splits["train"].num_samples // (cfg.batch_size * world_size * cfg.grad_accum)
    if steps == 0:
        raise UsageError(
            f"global batch {cfg.batch_size}x{world_size}x{cfg.grad_accum} is larger than the "
            f"{index.splits['train'].num_samples} train samples: lower --batch-size or --grad-accum"
        )


def check_crop_fits(cfg: TrainConfig, index, device: str) -> None:
    """The crop options against the shards and the device: one line naming the fix."""
    if index.image_size is None and cfg.train_crop == "pad":
        raise UsageError(
            f"{cfg.data} holds images of varying sizes; --train-crop pad needs one size: "
            f"use --train-crop rrc --res N (or center)"
        )
    if index.image_size is None and cfg.train_crop != "pad" and not (cfg.res or cfg.res_schedule):
        raise UsageError(f"{cfg.data} holds images of varying sizes: --train-crop {cfg.train_crop} needs --res N")
    if cfg.train_crop == "pad" and cfg.crop_padding >= min(index.image_size):
        h, w = index.image_size
        raise UsageError(f"--crop-padding {cfg.crop_padding} makes no sense for {h}x{w} images")
    if cfg.decode == "gpu" and device != "cuda":
        raise UsageError(
            f"--decode gpu decodes with nvJPEG on a CUDA device; this run is on {device}: use --decode cpu"
        )


def build(
    cfg: TrainConfig, index, accelerator, fresh: bool = True
) -> tuple[torch.nn.Module, torch.optim.Optimizer, str]:
    """(model, optimizer, the --init-from report line). A fresh run loads --init-from; a resumed one its own
    checkpoint (run.restore), so it reads no weights here."""
    torch.manual_seed(cfg.seed)  # same init everywhere (DDP also broadcasts rank 0's weights)
    model = model_for(cfg, index.num_classes, index.channels)
    note = init_from(model, cfg.init_from, cfg.model, cfg.stem) if cfg.init_from and fresh else ""
    set_backbone_trainable(model, not backbone_frozen(cfg, 0))  # before prepare: see sync_frozen
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model.to(accelerator.device))  # before prepare(), as DDP requires
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, param_groups(model, cfg))
    return model, optimizer, note


def scale_for_batch(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """--scale-lr linear: the lr follows the global batch actually used (logged in announce)."""
    if cfg.scale_lr != "linear":
        return cfg
    return dataclasses.replace(
        cfg, lr=scaled_lr(cfg.lr, cfg.tuned_global_batch, cfg.batch_size * world_size * cfg.grad_accum)
    )


def setup(cfg: TrainConfig) -> Run:
    accelerator = make_accelerator(cfg)
    cfg = scale_for_batch(cfg, accelerator.num_processes)
    run_dir = Path(cfg.out)
    index = read_index(cfg.data)
    val_split, eval_splits = pick_splits(cfg, index.splits)
    check_shards(cfg.data, index, ["train", *eval_splits])
    check_fits(cfg, index, accelerator.num_processes, accelerator.device.type)
    check_writable(run_dir)
    claim_run_folder(run_dir, accelerator)  # before reading its checkpoint: one run per folder
    last = find_checkpoint(run_dir / "checkpoints" / "last")  # a run folder with a checkpoint is resumed
    model, optimizer, init_note = build(cfg, index, accelerator, fresh=last is None)
    common = dict(batch_size=cfg.batch_size, rank=accelerator.process_index, world_size=accelerator.num_processes)
    cache = make_cache(shards_at(cfg.data, index), cfg.cache, cfg.cache_dir, cfg.cache_limit)
    common = common | {"strict": cfg.strict_data, "decode": cfg.decode, "cache": cache}
    train = ShardStream(
        cfg.data,
        index,
        "train",
        train=True,
        seed=cfg.seed,
        grad_accum=cfg.grad_accum,
        shuffle_block=cfg.shuffle_block,
        crop=train_crop_spec(cfg, index.image_size),
        augment=augment_spec(cfg),
        **common,
    )
    crop = eval_crop_spec(cfg, index.image_size)
    evals = {s: ShardStream(cfg.data, index, s, train=False, crop=crop, **common) for s in eval_splits}
    steps_per_epoch = train.num_batches // cfg.grad_accum
    scheduler = build_scheduler(cfg, optimizer, cfg.epochs * steps_per_epoch, steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    augment = make_augment(cfg, index, accelerator.device)
    guard = StepGuard(accelerator, StopRequest(), cfg.max_bad_steps)
    mix = mix_spec(cfg, index.num_classes)
    ema = make_ema(cfg, bare(accelerator, model))  # after prepare: on the device, in the model's memory format
    step = Step(
        accelerator,
        model,
        optimizer,
        scheduler,
        augment,
        guard,
        cfg.label_smoothing,
        mix=mix,
        clip=GradClip(cfg.clip_grad_norm),
        ema=ema,
    )
    run = Run(cfg, step, index, train, evals, Reporter(accelerator.is_main_process), run_dir, val_split)
    run.init_note = init_note
    run.wandb_steps = dashboard.StepLog(run_dir, accelerator.is_main_process and cfg.wandb_mode != "disabled")
    if last is not None:
        restore(run, last)
    else:
        run.wandb_id = uuid.uuid4().hex[:12]
    return run


def make_augment(cfg: TrainConfig, index, device: torch.device) -> BatchAugment:
    """The device's share of augmentation: all of pad + crop + flip, or (crops made by the workers) none."""
    pad = cfg.train_crop == "pad"
    return BatchAugment(
        index.mean,
        index.std,
        device,
        cfg.crop_padding if pad else 0,
        cfg.flip and pad,
        cfg.channels_last,
        cfg.random_erase,
    )


def check_writable(run_dir: Path) -> None:
    """Fail before training, not at the first checkpoint, if RUN_DIR cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {run_dir}: cannot write there ({exc.strerror or exc})") from exc


def train_one_epoch(run: Run) -> dict:
    """Train from micro-batch `run.batch` to the end of `run.epoch` (or until --max-steps)."""
    acc, cfg = run.step.accelerator, run.cfg
    run.step.model.train()
    sync_frozen(run)
    run.train.set_epoch(run.epoch, run.batch, train_res(cfg, run.index.image_size, run.epoch))
    loader = make_loader(run.train, cfg.num_workers, pin_memory=acc.device.type == "cuda")
    generator = torch.Generator()
    meter, window = Meter(), Meter()
    loss_sum = torch.zeros((), device=acc.device)
    correct = torch.zeros((), dtype=torch.int64, device=acc.device)
    seen, fetched = 0, CacheCounts()
    run.reporter.start_epoch(run.epoch, cfg.epochs, run.train.num_batches, run.batch)
    it = iter(loader)
    try:
        while run.batch < run.train.num_batches and not run_is_done(run) and not run.step.guard.stop_requested:
            t0 = time.perf_counter()
            images, labels, lost, problems, batch_fetched = next(it)
            fetched += batch_fetched
            images, labels, gpu_lost, gpu_problems = batch_to_device(images, labels, acc.device, True, cfg.strict_data)
            run.lost_train += lost + gpu_lost
            run.problems += problems + gpu_problems
            wait = time.perf_counter() - t0
            meter.add_wait(wait)
            window.add_wait(wait)
            # Seeded by the global micro-batch, not the rank: 2 processes and 1 process accumulating 2
            # augment (and drop out) the same micro-batches alike.
            seed_step(cfg.seed, run.epoch, micro_batch(run.batch, acc.process_index, acc.num_processes), 0, generator)
            loss, hits = train_step(run.step, images, labels, generator)
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
    fetched = reduce_counts(acc, fetched)
    run.cache += fetched
    return {
        "train_loss": totals[0].item() / n,
        "train_top1": totals[1].item() / n,
        "img_per_s": meter.rate * acc.num_processes,
        "data_wait": meter.wait_fraction,
        "epoch_seconds": meter.elapsed,
        **cache_fields(fetched),
        **dashboard.rank_throughput(acc, meter.rate, meter.wait_fraction),
    }


def sync_frozen(run: Run) -> None:
    """--freeze-backbone at this epoch: requires_grad of the backbone, its BatchNorm in eval mode (after the
    epoch's model.train()), and, when frozen-ness changed (--unfreeze-epoch, or a resume past it), a new DDP
    wrapper.

    Why rebuild DDP rather than find_unused_parameters: DDP registers the parameters that require grad when
    it is built and all-reduces those only. Built frozen, the backward pass stops at the head and only the
    head's gradients cross the wire; the flag would instead walk the graph and all-reduce the whole backbone's
    (zero) buckets every step. Unfreezing without a new wrapper would leave the backbone's gradients
    unsynchronised (ranks drifting apart), so the wrapper is rebuilt once at that epoch; it broadcasts rank 0's
    weights, which every rank already holds. A resumed run decides from its epoch alone, so it continues exactly."""
    cfg, acc = run.cfg, run.step.accelerator
    if not cfg.freeze_backbone:
        return
    frozen = backbone_frozen(cfg, run.epoch)
    model = bare(acc, run.step.model)
    if set_backbone_trainable(model, not frozen):
        # without the autocast wrapper prepare_model put on the module's forward: it puts it back
        model = acc.unwrap_model(run.step.model, keep_fp32_wrapper=False, keep_torch_compile=False)
        run.step = dataclasses.replace(run.step, model=acc.prepare_model(model))
        run.step.model.train()
        run.reporter.line(f"epoch {run.epoch + 1}: backbone {'frozen' if frozen else 'unfrozen: all layers train'}")
    if frozen:
        backbone_eval(model)


def cache_fields(counts: CacheCounts) -> dict:
    """An epoch row's shard cache counts (history.json, W&B, the epoch line)."""
    return {f"cache_{key}": value for key, value in counts.as_dict().items()}


def row_counts(row: dict) -> CacheCounts:
    return CacheCounts(row["cache_hits"], row["cache_downloads"], row["cache_bytes_downloaded"])


def after_optimizer_step(run: Run, loss: torch.Tensor, window: Meter) -> None:
    """Count the step; stop if diverged; log and checkpoint on schedule (every rank at the same steps)."""
    cfg = run.cfg
    run.global_step += 1
    run.step.guard.check_divergence(run.global_step)
    if run.global_step % cfg.log_every == 0:
        log_train(run, loss, window)
        window.reset()
    if cfg.checkpoint_every and run.global_step % cfg.checkpoint_every == 0:
        save(run, "last")


def run_is_done(run: Run) -> bool:
    return bool(run.cfg.max_steps) and run.global_step >= run.cfg.max_steps


def log_train(run: Run, loss: torch.Tensor, window: Meter) -> None:
    """Per-step metrics. Every rank takes part in the reduce; only the main process logs."""
    acc = run.step.accelerator
    mean_loss = acc.reduce(loss.float(), reduction="mean").item()
    lr = run.step.optimizer.param_groups[0]["lr"]
    metrics = {
        "train/loss": mean_loss,
        "train/lr": lr,
        "perf/img_per_s": window.rate * acc.num_processes,
        "perf/img_per_s_per_process": window.rate,
        "perf/data_wait_fraction": window.wait_fraction,
        "epoch": run.epoch + run.batch / run.train.num_batches,
    }
    if run.step.clip.last_norm is not None:
        metrics["train/grad_norm"] = run.step.clip.last_norm.item()  # before clipping; equal on every rank
    ranks = dashboard.rank_throughput(acc, window.rate, window.wait_fraction)  # every rank: a collective
    metrics |= dashboard.rank_metrics(ranks, "perf/", per_rank=True)
    run.wandb_steps.log(acc, metrics, run.global_step)
    report_problems(run)
    norm = f"  grad norm {metrics['train/grad_norm']:.3g}" if "train/grad_norm" in metrics else ""
    stats = (
        f"loss {mean_loss:.4f}  lr {lr:.4g}{norm}  {metrics['perf/img_per_s']:.0f} img/s  "
        f"data wait {window.wait_fraction:.0%}"
    )
    run.reporter.step(0, stats)
    run.reporter.log_line(f"epoch {run.epoch + 1} step {run.global_step}: {stats}")


def report_problems(run: Run) -> None:
    """Data problems every rank met since the last call: one warning each, from the main process.

    A collective: every rank calls it at the same points (log steps and epoch ends)."""
    everyone = gather_object([run.problems]) if run.step.accelerator.num_processes > 1 else [run.problems]
    run.problems = []
    for problem in sorted({p for problems in everyone for p in problems} - run.reported):
        run.reported.add(problem)
        run.reporter.line(f"warning: {problem}")


def evaluate_split(run: Run, split: str, worst: int = 0, model: torch.nn.Module | None = None) -> dict:
    """`split` on the training weights, or on `model` (the EMA's); evaluate() gives every rank rank 0's
    BatchNorm buffers first, so all ranks evaluate the same (rank 0's, the checkpointed) average."""
    return evaluate(
        run.step.accelerator,
        run.step.model if model is None else model,
        run.evals[split],
        run.step.augment,
        run.cfg.num_workers,
        run.index.num_classes,
        tta_flip=run.cfg.eval_tta == "flip",
        worst=worst,
    )


def eval_due(run: Run, epoch: int) -> bool:
    """Validate every --eval-every epochs, and always after the last one."""
    return epoch % run.cfg.eval_every == 0 or epoch >= run.cfg.epochs or run_is_done(run)


def end_epoch(run: Run, train_metrics: dict) -> tuple[dict, bool]:
    """Validate and record the epoch; say whether val top-1 improved."""
    row = {
        "epoch": run.epoch + 1,
        "lr": run.step.optimizer.param_groups[0]["lr"],
        **train_metrics,
        "steps": run.global_step,
        "complete": run.batch >= run.train.num_batches,
    }
    if run.val_split and eval_due(run, row["epoch"]):
        val = evaluate_split(run, run.val_split)
        row.update(
            val_loss=val["loss"],
            val_top1=val["top1"],
            val_top5=val["top5"],
            val_count=val["count"],
            val_lost=val["lost"],
        )
        run.problems += val["problems"]
        run.cache += val["cache"]
        row.update(cache_fields(row_counts(row) + val["cache"]))
        row.update(evaluate_ema(run))
    report_problems(run)
    row["time"] = time.time()  # when the epoch's numbers were known: accuracy-vs-wall-time curves
    if run.history and run.history[-1]["epoch"] == row["epoch"]:
        run.history.pop()  # a resumed epoch replaces the row of its interrupted part
    run.history.append(row)
    run.wandb_steps.log(
        run.step.accelerator,
        val_metrics(row)
        | {
            "train/epoch_loss": row["train_loss"],
            "train/top1": row["train_top1"],
            "perf/epoch_img_per_s": row["img_per_s"],
            "perf/epoch_data_wait": row["data_wait"],
            **{f"data/{k}": v for k, v in row.items() if k.startswith("cache_")},
            "epoch": row["epoch"],
        }
        | dashboard.rank_metrics(row, "perf/epoch_", per_rank=False),
        step=run.global_step,
    )
    key = best_key(run.cfg)
    improved = key in row and row[key] > run.best_val
    if improved:
        run.best_val = row[key]
    run.reporter.line(epoch_line(row, run.val_split, run.train.cache is not None, run.step.mix is not None))
    return row, improved


def evaluate_ema(run: Run) -> dict:
    """With --ema, the average's val metrics for the epoch row (val_ema_*); its data problems and shard
    reads are the raw evaluation's again, so only its cache counts are added."""
    ema = run.step.ema
    if ema is None:
        return {}
    val = evaluate_split(run, run.val_split, model=ema.module)
    run.cache += val["cache"]
    return {f"val_ema_{k}": val[k] for k in ("loss", "top1", "top5")}


def best_key(cfg: TrainConfig) -> str:
    """The epoch row's metric that picks checkpoints/best (--best-by; auto: the EMA's when there is one)."""
    return "val_ema_top1" if cfg.ema and cfg.best_by != "raw" else "val_top1"


def default_weights(cfg: TrainConfig) -> str:
    """The weights a run's numbers are for by default, as evaluate/predict/export load them: the EMA if any."""
    return "ema" if cfg.ema else "raw"


def val_metrics(row: dict) -> dict:
    """An epoch row's val numbers for W&B: val_top1 -> val/top1, val_ema_top1 -> val_ema/top1."""
    out = {}
    for k, v in row.items():
        if k.startswith("val_ema_"):
            out[f"val_ema/{k[8:]}"] = v
        elif k.startswith("val_"):
            out[f"val/{k[4:]}"] = v
    return out


def epoch_line(row: dict, split: str | None, remote: bool = False, mixed: bool = False) -> str:
    """The epoch's one line; for remote data with what the shard cache served and downloaded. With mixed
    train images the train top-1 is against each image's label of larger weight, and says so."""
    cache = (
        f"  cache {row['cache_hits']} hits, {row['cache_downloads']} downloads "
        f"({row['cache_bytes_downloaded'] / 1e6:.1f} MB)"
        if remote
        else ""
    )
    val = (
        f"  {split} loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2%} top-5 {row['val_top5']:.2%}"
        if "val_top1" in row
        else ""
    )
    if "val_ema_top1" in row:
        val += f"  EMA loss {row['val_ema_loss']:.4f} top-1 {row['val_ema_top1']:.2%} top-5 {row['val_ema_top5']:.2%}"
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} {'top-1 vs major label' if mixed else 'top-1'} "
        f"{row['train_top1']:.2%}{val}  "
        f"{row['img_per_s']:.0f} img/s  data wait {row['data_wait']:.0%}  {row['epoch_seconds']:.1f} s{cache}"
    )


def fit(cfg: TrainConfig) -> dict:
    """Train per `cfg`; return the run summary (also written to RUN_DIR/summary.json)."""
    run = setup(cfg)
    acc, started, cfg = run.step.accelerator, time.time(), run.cfg  # run.cfg: with the lr as scaled
    if acc.is_main_process:
        write_json_atomic(run.run_dir / "config.json", cfg.to_dict())
    start_tracking(run)
    announce(run)
    run.step.guard.stop.install()
    try:
        train_epochs(run)
    except Diverged:
        save(run, "last")  # the skipped steps left the last good weights in place
        raise
    except RuntimeError as exc:
        if is_collective_timeout(exc):
            raise TrainingError(
                f"a collective operation waited {cfg.collective_timeout:g} s for a silent rank: "
                f"{name_silent_ranks(acc.process_index, acc.num_processes)}"
            ) from exc
        raise
    finally:
        run.step.guard.stop.restore()
    if run.step.guard.stop_requested:
        stop(run)
    summary = finish(run, time.time() - started)
    end_run(acc)  # closes W&B and the process group (a live gloo group can abort at exit)
    return summary


def start_tracking(run: Run) -> None:
    """Open the W&B run (main process) with the run's provenance in its config, and set up its dashboard."""
    acc, cfg = run.step.accelerator, run.cfg
    provenance = dashboard.run_provenance(acc)  # every rank: device names are gathered
    if cfg.wandb_mode != "disabled":
        dashboard.stage_artifacts_in(run.run_dir)
    acc.init_trackers(
        cfg.wandb_project,
        config=cfg.to_dict() | provenance | {"global_batch": run.global_batch},
        init_kwargs=wandb_init_kwargs(
            run.run_dir, cfg.wandb_mode, run.wandb_id, run.run_dir.name, cfg.wandb_system_stats
        ),
    )
    if acc.is_main_process and cfg.wandb_mode != "disabled":
        wandb_run = acc.get_tracker("wandb", unwrap=True)
        dashboard.define_metrics(wandb_run)
        dashboard.log_dataset(wandb_run, cfg.data, read_bytes(cfg.data, "index.json"))


def train_epochs(run: Run) -> None:
    acc, cfg = run.step.accelerator, run.cfg
    while run.epoch < cfg.epochs and not run_is_done(run) and not run.step.guard.stop_requested:
        train_metrics = train_one_epoch(run)
        if run.step.guard.stop_requested:
            return  # preempted: no validation, the checkpoint is written by stop()
        row, improved = end_epoch(run, train_metrics)
        if row["complete"]:
            run.epoch, run.batch = run.epoch + 1, 0
        save(run, "last", row)
        if improved:
            save(run, "best", row)
        if acc.is_main_process:
            write_history(run.run_dir, run.history)
            plot_history(run.run_dir, run.history)


def stop(run: Run) -> None:
    """After SIGTERM/SIGINT/SIGUSR1: every rank has finished the same step; save and exit as interrupted."""
    save(run, "last")
    signum = run.step.guard.stop_signal()  # the job's, agreed by every rank
    end_run(run.step.accelerator)
    requeue = signum == REQUEUE_SIGNAL
    then = "exit 0 to be requeued; the requeued job resumes" if requeue else "run the same command again to resume"
    raise Interrupted(
        f"stopped by {signal.Signals(signum).name} at epoch {run.epoch + 1}, optimizer step "
        f"{run.global_step}: saved {run.run_dir / 'checkpoints' / 'last'}; {then}",
        signum,
        exit_code=0 if requeue else None,
    )


def announce(run: Run) -> None:
    acc, cfg = run.step.accelerator, run.cfg
    params = count_parameters(bare(acc, run.step.model))
    run.reporter.line(
        f"{cfg.model} ({params:,} parameters) on {run.index.source}: {acc.num_processes} process(es) on "
        f"{acc.device.type}, mixed precision {acc.mixed_precision}, global batch {run.global_batch} "
        f"({cfg.batch_size} x {acc.num_processes} processes x {cfg.grad_accum} accumulation), "
        f"{run.train.num_batches} micro-batches per rank per epoch"
    )
    if restart_line(run):
        run.reporter.line(restart_line(run))
    if run.init_note:
        run.reporter.line(run.init_note)
    if cfg.freeze_backbone:
        k = cfg.unfreeze_epoch
        until = "" if not k else " for epoch 1" if k == 1 else f" for epochs 1-{k}"
        run.reporter.line(f"backbone frozen{until}: only fc trains; its BatchNorm layers stay in eval mode")
    if cfg.recipe:
        run.reporter.line(f"recipe {cfg.recipe}: {RECIPES[cfg.recipe].summary}")
    if cfg.train_crop != "pad":
        run.reporter.line(crop_line(cfg, run))
    if cfg.scale_lr == "linear":
        run.reporter.line(
            f"lr scaled linearly to {cfg.lr:g}: tuned for a global batch of {cfg.tuned_global_batch}, "
            f"running with {run.global_batch}"
        )
    if precision_override(cfg, acc.device.type == "cpu"):
        run.reporter.line("note: bf16 autocast because this CPU computes bf16 natively (--cpu-bf16 off keeps fp32)")
    if run.val_split == "test":
        run.reporter.line(
            "note: the shards have no val split, so test picks the best checkpoint; "
            "pack with --val-fraction to keep test unseen"
        )


def restart_line(run: Run) -> str:
    """After torchrun restarted the job (--max_restarts): say so, and where it continues from."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart in ("", "0"):
        return ""
    where = f"resumed at optimizer step {run.global_step}" if run.global_step else "no checkpoint yet: from the start"
    most = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
    return f"torchrun restart {restart} of at most {most} after a failed process: {where}"


def crop_line(cfg: TrainConfig, run: Run) -> str:
    """What the loader workers do to each image, and at which resolution per epoch."""
    sizes = [train_res(cfg, run.index.image_size, e) for e in range(cfg.epochs)]
    res = f"{sizes[0]} px" if len(set(sizes)) == 1 else f"{'/'.join(map(str, sizes))} px by epoch"
    what = (
        f"RandomResizedCrop (area {cfg.rrc_scale}, aspect {cfg.rrc_ratio})"
        if cfg.train_crop == "rrc"
        else "centre crop"
    )
    evals = next(iter(run.evals.values()), None)
    at = (
        f"; eval: shorter side to {round(evals.crop.res / cfg.crop_ratio)}, centre {evals.crop.res} px" if evals else ""
    )
    flip = " + flip" if cfg.flip else ""
    return f"crops in the loader workers ({cfg.decode} decode): {what}{flip} to {res}{at}"


def finish(run: Run, wall: float) -> dict:
    acc = run.step.accelerator
    last = run.history[-1] if run.history else {}
    summary = {
        "world_size": acc.num_processes,
        "global_batch": run.global_batch,
        "mixed_precision": acc.mixed_precision,
        "epochs_done": run.epoch,
        "steps_done": run.global_step,
        "best_val_top1": run.best_val if run.best_val >= 0 else None,
        "best_by": "ema" if best_key(run.cfg) == "val_ema_top1" else "raw",
        "final_val_top1": last.get("val_top1"),
        "final_val_top1_ema": last.get("val_ema_top1"),
        "val_split": run.val_split,
        "train_img_per_s": last.get("img_per_s"),
        "wall_seconds": round(wall, 1),
        "eval_counts": {},
        "skipped_steps": run.step.guard.bad_steps,
        "lost_train_samples": int(acc.reduce(torch.tensor(run.lost_train, device=acc.device), "sum").item()),
        "lost_eval_samples": {},
        "data_problems": sorted(run.reported),
    }
    if "val_count" in last:
        summary["eval_counts"][run.val_split] = last["val_count"]
        summary["lost_eval_samples"][run.val_split] = last.get("val_lost", 0)
    test = add_test_results(run, summary, last) if "test" in run.evals else None
    summary["data_wait"], summary["diagnosis"] = diagnose(run.history, run.cfg.num_workers)
    summary["cache"] = run.cache.as_dict() | {"dir": cache_dir(run.train.cache)}
    if acc.is_main_process:
        if run.cfg.wandb_mode != "disabled":  # the W&B run's summary, not one more history row
            wandb_run = acc.get_tracker("wandb", unwrap=True)
            wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            wandb_run.summary.update({f"cache/{k}": v for k, v in summary["cache"].items() if k != "dir"})
            end_dashboard(run, wandb_run, test)
            if run.cfg.wandb_mode == "offline":
                run.reporter.line(f"W&B offline run: upload it with `wandb sync {Path(wandb_run.dir).parent}`")
        write_json_atomic(run.run_dir / "summary.json", summary)
        run.reporter.table(
            "resnet-dist run summary",
            {k: v for k, v in summary.items() if v is not None and k not in ("diagnosis", "data_problems", "cache")},
        )
        if run.train.cache is not None:
            run.reporter.line(cache_line(summary["cache"]))
        if summary["diagnosis"]:
            run.reporter.line(summary["diagnosis"])
        if "test_top1" in summary:
            run.reporter.line(test_line(summary, run.cfg.eval_tta, run.run_dir))
    return summary


def add_test_results(run: Run, summary: dict, last: dict) -> dict:
    """The final test into `summary`: test_top1/5 and test_loss are the default weights' (the EMA with
    --ema, as evaluate/predict/export load them), plus test_top1_raw and test_top1_ema with --ema.
    Returns the default weights' result (with its analysis for W&B)."""
    tests = final_tests(run, last)
    test = tests[default_weights(run.cfg)]
    summary.update(test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"])
    summary["test_weights"] = default_weights(run.cfg)
    if "ema" in tests:
        summary.update(test_top1_raw=tests["raw"]["top1"], test_top1_ema=tests["ema"]["top1"])
    summary["eval_counts"]["test"] = test["count"]
    summary["lost_eval_samples"]["test"] = test["lost"]
    for result in tests.values():
        run.cache += result.get("cache", CacheCounts())  # none when the last epoch's test result is reused
        run.problems += result["problems"]
    report_problems(run)
    summary["data_problems"] = sorted(run.reported)
    return test


def final_tests(run: Run, last: dict) -> dict[str, dict]:
    """The test split's metrics per set of weights, {"raw": ...} and with --ema {"ema": ...}; the W&B
    analysis of the most confidently wrong images (`worst`) is made for the default weights only."""
    worst = dashboard.WORST if run.cfg.wandb_mode != "disabled" else 0
    default = default_weights(run.cfg)
    tests = {"raw": final_test_from_history(run, last) or evaluate_split(run, "test", worst * (default == "raw"))}
    if run.step.ema is not None:
        ema = run.step.ema.module
        tests["ema"] = final_test_from_history(run, last, "val_ema_") or evaluate_split(run, "test", worst, ema)
    return tests


def test_line(summary: dict, tta: str, run_dir: Path) -> str:
    """The run's last line: test top-1 of the default weights, saying which they are."""
    flip = " with flip TTA" if tta == "flip" else ""
    which = "EMA weights" if summary["test_weights"] == "ema" else "raw weights"
    raw = f"; raw weights {summary['test_top1_raw']:.2%}" if "test_top1_raw" in summary else ""
    return (
        f"test top-1 {summary['test_top1']:.2%} ({which}){flip} on {summary['eval_counts']['test']:,} "
        f"images{raw}; run folder {run_dir}"
    )


def end_dashboard(run: Run, wandb_run, test: dict | None) -> None:
    """Main process, end of run: the test split's analysis (when test was evaluated at the end, with its
    confusion matrix) and the checkpoints as `model` artifacts."""
    if test is not None and "confusion" in test:
        dashboard.log_test_analysis(wandb_run, test, run.index, run.cfg.data, run.global_step, run.train.cache)
    dashboard.log_checkpoints(wandb_run, run.run_dir, run.wandb_id)


def final_test_from_history(run: Run, last: dict, prefix: str = "val_") -> dict | None:
    """Without a val split, the last epoch was already evaluated on test with the final weights (prefix
    val_ema_: the EMA's)."""
    if run.val_split != "test" or f"{prefix}top1" not in last:
        return None
    return {
        "top1": last[f"{prefix}top1"],
        "top5": last[f"{prefix}top5"],
        "loss": last[f"{prefix}loss"],
        "count": last["val_count"],
        "lost": last["val_lost"],
        "problems": [],
    }


def main(argv=None) -> int:
    """`launch/train.py`'s body: parse, validate, train (or only show the resolved config)."""
    cfg, print_only = parse_args(argv)
    if print_only:
        sys.stdout.write(json.dumps(cfg.to_dict(), indent=2) + "\n")
        return 0
    fit(cfg)
    return 0


def diagnose(history: list[dict], num_workers: int, threshold: float = 0.10) -> tuple[float | None, str]:
    """(data-wait fraction of the run's training time, one line saying what limits its speed)."""
    seconds = sum(h["epoch_seconds"] for h in history)
    if not seconds:
        return None, ""
    wait = sum(h["data_wait"] * h["epoch_seconds"] for h in history) / seconds
    rate = sum(h["img_per_s"] * h["epoch_seconds"] for h in history) / seconds
    if wait >= threshold:
        return wait, (
            f"diagnosis: input-bound: the model waited for data {wait:.0%} of the time at {rate:,.0f} img/s; "
            f"more --num-workers (now {num_workers} per process), PNG rather than JPEG shards or "
            f"fewer processes per core would speed it up"
        )
    return wait, (
        f"diagnosis: compute-bound: the model waited for data {wait:.0%} of the time at {rate:,.0f} img/s; "
        f"the loader keeps up, so only a faster step (bf16, a GPU, more processes) speeds this run up"
    )
