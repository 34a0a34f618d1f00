"""Under `accelerate launch` (2 ranks): rank 1 alone meets a NaN loss at one step. Both ranks must skip
that update (weights unchanged, identical across ranks) and go on training. Usage: OUT.json"""

import json
import sys

import torch
from accelerate import Accelerator
from real_step import real_step

from resnet_dist.config import TrainConfig
from resnet_dist.distributed import end_run
from resnet_dist.engine import train_step


def main() -> None:
    acc = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)
    )
    poison = {"on": False}
    net.register_forward_hook(lambda m, i, o: o * float("nan") if poison["on"] else o)
    cfg = TrainConfig(
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=0.0,
        schedule="none",
        warmup_epochs=0.0,
        label_smoothing=0.0,
    )
    step = real_step(acc, net, cfg, max_bad_steps=3)
    g = torch.Generator().manual_seed(acc.process_index)

    def flat():
        return torch.cat([p.detach().flatten() for p in acc.unwrap_model(net).parameters()]).clone()

    snapshots = []
    for i in range(5):
        poison["on"] = i == 2 and acc.process_index == 1
        images = torch.randint(0, 256, (8, 6, 6, 3), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 5, (8,), generator=g)
        before = flat()
        train_step(step, images, labels, None)
        snapshots.append((before, flat()))
    final = acc.gather(flat()[None]).cpu()
    if acc.is_main_process:
        json.dump(
            {
                "bad_steps": step.guard.bad_steps,
                "unchanged_by_bad_step": bool(torch.equal(*snapshots[2])),
                "trained_after": bool(not torch.equal(*snapshots[3])),
                "ranks_agree": bool(torch.equal(final[0], final[1])),
                "finite": bool(torch.isfinite(final).all()),
            },
            open(sys.argv[1], "w"),
        )
    end_run(acc)


# Loader workers start from a forkserver, which imports this file again: only the guard keeps them from
# running it.
if __name__ == "__main__":
    main()
