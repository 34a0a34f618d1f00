"""--scale-lr linear on a resume with another global batch (run.rescale), in process: lr x new/old, the epoch
going on at the first new step at or after the sample position reached, the schedule where a run on the new
global batch from the start would be."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from resnet_dist.config import TrainConfig
from resnet_dist.optim import build_scheduler, lr_factor
from resnet_dist.run import Run, rescale


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_another_global_batch_scales_the_lr_and_goes_on_at_the_next_new_step(schedule):
    n, epochs, old_batch, new_batch = 1800, 2, 64, 32  # 28 steps per epoch at 64, 56 at 32
    cfg = TrainConfig(epochs=epochs, batch_size=32, grad_accum=1, lr=0.1, schedule=schedule, scale_lr="linear")
    model = torch.nn.Linear(2, 2)

    def optimizer_and_scheduler(batch: int, lr: float):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        per_epoch = n // batch
        return optimizer, build_scheduler(dataclasses.replace(cfg, lr=lr), optimizer, epochs * per_epoch, per_epoch)

    # the checkpoint: lr 0.2 at global batch 64, 28 + 11 steps done (epoch 2, 11 steps in)
    old_opt, old_sched = optimizer_and_scheduler(old_batch, 0.2)
    for _ in range(28 + 11):
        old_opt.step()
        old_sched.step()
    optimizer, scheduler = optimizer_and_scheduler(new_batch, 0.1)  # this launch: lr scaled to batch 32
    fresh = copy.deepcopy(scheduler.state_dict())
    optimizer.load_state_dict(old_opt.state_dict())
    scheduler.load_state_dict(old_sched.state_dict())
    lines = []
    accelerator = SimpleNamespace(num_processes=1)
    step = SimpleNamespace(accelerator=accelerator, optimizer=optimizer, scheduler=scheduler)
    run = Run(cfg, step, None, SimpleNamespace(num_batches=n // new_batch), {}, None, None, None, epoch=1)
    run.reporter = SimpleNamespace(line=lines.append)
    done = rescale(run, 11, old_batch, fresh)
    assert done == math.ceil(11 * 64 / 32) == 22  # sample position 704: step 22 of the new order
    assert run.global_step == 56 + 22  # as if the run had used 32 from the start
    assert "global batch 64 -> 32: lr x 0.5" in lines[0]
    # the lr now is what a fresh run at lr 0.1 (0.2 x 32/64) and batch 32 has after 78 steps
    fresh_opt, fresh_sched = optimizer_and_scheduler(new_batch, 0.1)
    for _ in range(78):
        fresh_opt.step()
        fresh_sched.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(fresh_opt.param_groups[0]["lr"], rel=1e-9)
    if schedule == "cosine":
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(78, 112, 0, "cosine"), rel=1e-9)
    optimizer.step()
    scheduler.step()  # and it goes on stepping (OneCycleLR checks its total)
    fresh_opt.step()
    fresh_sched.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(fresh_opt.param_groups[0]["lr"], rel=1e-9)
