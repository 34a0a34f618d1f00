"""Weight EMA: an exponential moving average of the model's parameters and BatchNorm buffers (--ema).

Why our own ~50 lines rather than a library class: timm's ModelEmaV3 has exactly the update we want
(parameters and buffers, foreach lerp, warm-up) but timm is not a dependency of this package (it pulls
huggingface_hub and more), and most of its class is for devices, dtypes and bf16 stochastic rounding we
do not use; torch.optim.swa_utils.AveragedModel(use_buffers=True) averages the integer
`num_batches_tracked` with float arithmetic, keys its state `module.*` next to an `n_averaged` buffer,
and its EMA functions have a fixed decay, no warm-up. So this module keeps timm V3's rule and update
(tests/test_ema.py checks it against timm's ModelEmaV3 where timm is installed) with plain counters
that a checkpoint holds.
"""

from __future__ import annotations

import copy

import torch

# timm ModelEmaV3's warm-up defaults (inv_gamma 1, power 2/3): the decay reaches 0.99 after ~1000
# updates and 0.999 after ~31,600, so a short run averages over a window growing with its length
# instead of being dominated by the random initial weights.
WARMUP_GAMMA = 1.0
WARMUP_POWER = 2 / 3


def decay_at(decay: float, t: int, warmup: bool = True) -> float:
    """Decay of an update that follows t earlier optimizer steps: 0 for the first (t = 0: the EMA
    starts as a copy of the weights, as in timm V3 and AveragedModel), then decay, or with warm-up
    timm ModelEmaV3's min(decay, 1 - (1 + t / gamma) ** -power)."""
    if t <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + t / WARMUP_GAMMA) ** -WARMUP_POWER)


class ModelEma:
    """A copy of the bare model (same device, same memory format) moved towards it after real optimizer
    steps. `steps` counts the optimizer steps seen, `updates` the EMA updates made (every `every` steps);
    both go into the checkpoint so a resumed run continues bitwise."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True, every: int = 1):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.every = decay, warmup, every
        self.steps = 0
        self.updates = 0

    def update_decay(self) -> float:
        """Decay of the update at `steps`: the per-step decay of its first step, to the power `every`,
        so that --ema-every N averages over the same number of optimizer steps as N = 1."""
        return decay_at(self.decay, self.steps - self.every, self.warmup) ** self.every

    @torch.no_grad()
    def step(self, model: torch.nn.Module) -> None:
        """Call after each optimizer step that changed the weights (none skipped, none per micro-batch)."""
        self.steps += 1
        if self.steps % self.every:
            return
        decay = self.update_decay()
        ours, theirs = self.module.state_dict(), model.state_dict()
        floats, targets = [], []
        for key, value in ours.items():
            if decay == 0.0 or not value.is_floating_point():  # a copy, and num_batches_tracked: exact
                value.copy_(theirs[key])
            else:
                floats.append(value)
                targets.append(theirs[key].detach())
        if floats:
            torch._foreach_lerp_(floats, targets, 1.0 - decay)  # ema += (1 - decay) * (model - ema)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the bare model's keys (BatchNorm buffers included)."""
        return self.module.state_dict()

    def counters(self) -> dict:
        return {"steps": self.steps, "updates": self.updates}

    def load(self, weights: dict[str, torch.Tensor], counters: dict) -> None:
        self.module.load_state_dict(weights)  # copies into our tensors: device and memory format kept
        self.steps, self.updates = int(counters["steps"]), int(counters["updates"])


def make_ema(cfg, model: torch.nn.Module) -> ModelEma | None:
    """The run's EMA of the bare (unwrapped, on-device) model, or None without --ema."""
    if not cfg.ema:
        return None
    return ModelEma(model, cfg.ema, cfg.ema_warmup, cfg.ema_every)
