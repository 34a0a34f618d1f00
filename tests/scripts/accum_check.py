"""Under `accelerate launch`: K accumulated micro-batches == one K-times-larger batch, through the real
train_step (no gradient sync on non-final micro-batches, one scheduler step per optimizer step).

A model without BatchNorm, so the per-batch statistics cannot differ between the two ways.
"""

import json
import sys

import torch
from accelerate import Accelerator
from real_step import real_step

from resnet_dist.config import TrainConfig
from resnet_dist.distributed import end_run
from resnet_dist.engine import train_step


def main() -> None:
    out, K, B, STEPS = sys.argv[1], 4, 3, 2

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)
        )

    def train(accum: int, batch: int):
        acc = Accelerator(cpu=True, gradient_accumulation_steps=accum, step_scheduler_with_optimizer=False)
        cfg = TrainConfig(
            optimizer="sgd",
            lr=0.1,
            momentum=0.9,
            nesterov=False,
            weight_decay=1e-3,
            schedule="cosine",
            warmup_epochs=0.0,
            label_smoothing=0.1,
        )
        net = model()
        step = real_step(acc, net, cfg, max_bad_steps=0)
        g = torch.Generator().manual_seed(1)
        # Same global data both ways: rank r takes rows [r*K*B, (r+1)*K*B) of each step's global batch.
        data = torch.randint(0, 256, (STEPS, acc.num_processes * K * B, 6, 6, 3), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 5, (STEPS, acc.num_processes * K * B), generator=g)
        mine = slice(acc.process_index * K * B, (acc.process_index + 1) * K * B)
        for s in range(STEPS):
            x, y = data[s, mine], labels[s, mine]
            for i in range(0, K * B, batch):
                train_step(step, x[i : i + batch], y[i : i + batch], None)
        weights = torch.cat([p.detach().flatten() for p in acc.unwrap_model(net).parameters()])
        return weights, step.scheduler.last_epoch, acc

    w_accum, steps_accum, acc = train(K, B)
    w_big, steps_big, _ = train(1, K * B)
    if acc.is_main_process:
        json.dump(
            {
                "max_diff": (w_accum - w_big).abs().max().item(),
                "sched_steps_accum": steps_accum,
                "sched_steps_big": steps_big,
                "world_size": acc.num_processes,
                "moved": (w_big - torch.cat([p.flatten() for p in model().parameters()])).abs().max().item(),
            },
            open(out, "w"),
        )
    end_run(acc)


# Loader workers start from a forkserver, which imports this file again: only the guard keeps them from
# running it.
if __name__ == "__main__":
    main()
