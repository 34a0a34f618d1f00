"""Optimizers and learning-rate schedules, all counted in optimizer steps (not micro-batches)."""

from __future__ import annotations

import math

import torch
from torch import nn

from resnet_dist.pretrained import head_names


def no_decay(name: str, p: torch.nn.Parameter, norm_params: set[int]) -> bool:
    """timm's param_groups_weight_decay rule: biases and every 1-d tensor (BatchNorm weights) take no decay."""
    return p.ndim <= 1 or name.endswith(".bias") or id(p) in norm_params


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """The optimizer's parameter groups, built here only. Split only as the options need: head | backbone
    with --backbone-lr-mult (the backbone's lr is --lr x M), decay | no decay with --no-wd-norm-bias; with
    neither, one group of model.parameters() in order, the optimizer every earlier checkpoint holds.
    Frozen parameters stay in their group (they get no gradient, so the optimizer skips them): the groups,
    and so a checkpoint's optimizer state, are the same frozen or not. The order is fixed (the head's group
    first: param_groups[0]["lr"], the logged lr, is --lr's), so a resume finds the same groups."""
    head = head_names(model) if cfg.backbone_lr_mult != 1 else set()
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        part = "" if cfg.backbone_lr_mult == 1 else "head" if name in head else "backbone"
        groups.setdefault((part, cfg.wd_norm_bias or not no_decay(name, p, norm_params)), []).append(p)
    return [
        {
            "params": groups[part, decay],
            "lr": cfg.lr * (cfg.backbone_lr_mult if part == "backbone" else 1.0),
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": " ".join(filter(None, [part, "" if decay else "no-decay"])) or "all",
        }
        for part in ("head", "backbone", "")
        for decay in (True, False)
        if (part, decay) in groups
    ]


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(step: int, total: int, warmup: int, schedule: str, step_every: int = 0) -> float:
    """Multiplier of the peak lr after `step` optimizer steps out of `total`.

    Linear warm-up from ~0 over `warmup` steps, then: cosine to 0; triangle: linearly to 0 (with the warm-up, FFCV's
    "cyclic" triangle); step (x0.1 every `step_every` steps, as torchvision's StepLR; if 0, at 50% and 75%,
    the ResNet paper's milestones scaled to the run); none (constant).
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "triangle":
        return max(0.0, 1.0 - progress)
    if schedule == "step" and step_every:
        return 0.1 ** (step // step_every)
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


def build_scheduler(cfg, optimizer, total_steps: int, steps_per_epoch: int):
    """A scheduler stepped once per optimizer step, by the training loop itself.

    It is deliberately not passed through accelerator.prepare: AcceleratedScheduler steps once per
    process per call unless told otherwise, which would run the schedule num_processes times too fast.
    """
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        # Rising phase: the warm-up if given, else 25% of the run (Smith & Topin's super-convergence).
        pct = min(0.9, warmup / total_steps) if warmup else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],  # per group: --backbone-lr-mult
            total_steps=max(total_steps, 2),
            pct_start=pct,
            cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0,
        )
    every = cfg.lr_step_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.schedule, every)
    )
