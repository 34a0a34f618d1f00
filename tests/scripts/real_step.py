"""The trainer's own engine.Step around a small model, for the scripts that test the step under a launch."""

from resnet_dist.augment import BatchAugment
from resnet_dist.config import TrainConfig
from resnet_dist.engine import Step
from resnet_dist.guard import StepGuard, StopRequest
from resnet_dist.optim import build_optimizer, build_scheduler


def real_step(acc, net, cfg: TrainConfig, max_bad_steps: int) -> Step:
    """Optimizer and schedule from `cfg` as the trainer builds them, prepared by `acc`; no augmentation
    beyond normalisation, so a test controls exactly what the model sees."""
    opt = build_optimizer(cfg, net.parameters())
    sched = build_scheduler(cfg, opt, total_steps=10, steps_per_epoch=10)
    net, opt = acc.prepare(net, opt)
    return Step(
        accelerator=acc,
        model=net,
        optimizer=opt,
        scheduler=sched,
        augment=BatchAugment([0.5] * 3, [0.25] * 3, acc.device, padding=0, flip=False),
        guard=StepGuard(acc, StopRequest(), max_bad_steps=max_bad_steps),
        label_smoothing=cfg.label_smoothing,
    )
