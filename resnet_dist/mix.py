"""Mixup and CutMix of a train batch on the device, with soft targets.

Each sample i is mixed with its neighbour i - 1 (the batch rolled by one, torchvision v2's pairing;
the batch is already shuffled) under its own lambda, as timm's "elem" mode draws it: with probability
`prob` the sample is mixed at all; when both mixup and cutmix are on, it uses cutmix with probability
`switch`; lambda ~ Beta(alpha, alpha) of the method it uses. A CutMix box is drawn per sample exactly
as torchvision v2's CutMix draws its one box (centre uniform over the pixels, half-sides
int(0.5 * sqrt(1 - lam) * H) and W, clamped to the image), and lambda becomes the fraction of the
image the box leaves, as there. Targets are lam * one_hot(y) + (1 - lam) * one_hot(y of the partner).

Every number is drawn on the CPU from the step's seeded generator (a resumed run draws the same); only
6 numbers per sample cross to the device, where the mask and the blend are built for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixSpec:
    """--mixup/--cutmix ALPHA (0: off), --mix-prob, --mix-switch-prob, and the class count of the targets."""

    mixup: float
    cutmix: float
    prob: float
    switch: float
    num_classes: int

    @property
    def active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0


def mix_spec(cfg, num_classes: int) -> MixSpec | None:
    """The run's mixing from the config (None: off, and train_step draws nothing for it)."""
    spec = MixSpec(cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mix_switch_prob, num_classes)
    return spec if spec.active else None


@dataclass(frozen=True)
class MixDraws:
    """One batch's draws, on the CPU: the image weight lam (after the CutMix correction), whether a sample
    uses cutmix, and its box rows [y1, y2) and columns [x1, x2) (empty where it does not)."""

    lam: torch.Tensor  # float64 (N,): weight of the sample's own image and label
    cut: torch.Tensor  # bool (N,)
    box: torch.Tensor  # int64 (4, N): y1, y2, x1, x2


def draw_lambdas(spec: MixSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(lam, use_cutmix) per sample: timm's Mixup._params_per_elem, from `rng` (lam 1: not mixed)."""
    if spec.mixup > 0 and spec.cutmix > 0:
        cut = rng.random(n) < spec.switch
        lam = np.where(cut, rng.beta(spec.cutmix, spec.cutmix, n), rng.beta(spec.mixup, spec.mixup, n))
    elif spec.mixup > 0:
        cut, lam = np.zeros(n, dtype=bool), rng.beta(spec.mixup, spec.mixup, n)
    else:
        cut, lam = np.ones(n, dtype=bool), rng.beta(spec.cutmix, spec.cutmix, n)
    mixed = rng.random(n) < spec.prob
    return np.where(mixed, lam, 1.0), cut & mixed


def cutmix_boxes(lam: np.ndarray, h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (4, N) as y1, y2, x1, x2 and the corrected lambdas: torchvision v2 CutMix.make_params per sample."""
    n = len(lam)
    r_x, r_y = rng.integers(0, w, n), rng.integers(0, h, n)  # torch.randint(W), torch.randint(H)
    r = 0.5 * np.sqrt(1.0 - lam)
    half_w, half_h = (r * w).astype(np.int64), (r * h).astype(np.int64)  # int(): truncation, r >= 0
    x1, y1 = np.maximum(r_x - half_w, 0), np.maximum(r_y - half_h, 0)
    x2, y2 = np.minimum(r_x + half_w, w), np.minimum(r_y + half_h, h)
    kept = 1.0 - (x2 - x1) * (y2 - y1) / (w * h)
    return np.stack([y1, y2, x1, x2]), kept


def draw_mix(spec: MixSpec, n: int, h: int, w: int, generator: torch.Generator | None) -> MixDraws:
    """All of one batch's draws. numpy has the Beta law torch cannot draw from a Generator, so one
    integer from the step's generator seeds a numpy generator for the batch."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    rng = np.random.default_rng(seed)
    lam, cut = draw_lambdas(spec, n, rng)
    box, kept = cutmix_boxes(lam, h, w, rng)
    lam = np.where(cut, kept, lam)
    box = np.where(cut[None], box, 0)  # an empty box for samples that do not cut
    return MixDraws(torch.from_numpy(lam), torch.from_numpy(cut), torch.from_numpy(box.astype(np.int64)))


def apply_mix(
    x: torch.Tensor, labels: torch.Tensor, draws: MixDraws, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets (N, K) float32, the label of larger weight (N,)) for float x (N, C, H, W)."""
    n, _, h, w = x.shape
    device = x.device
    lam = draws.lam.to(device, torch.float32)
    partner = x.roll(1, 0)
    y1, y2, x1, x2 = (t.to(device).view(n, 1, 1) for t in draws.box)  # empty boxes where no cutmix
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)  # (N, H, W)
    out = torch.where(inside.unsqueeze(1), partner, x)
    # Blend only the mixup samples (a pass over the whole batch was half the cost at 224 px on a CPU).
    blend = (~draws.cut & (draws.lam < 1)).nonzero().flatten().to(device)
    weight = lam[blend].view(-1, 1, 1, 1).to(x.dtype)
    out[blend] = partner[blend] * (1.0 - weight) + x[blend] * weight  # torchvision MixUp's order of operations
    onehot = F.one_hot(labels, num_classes).float()
    soft = onehot.roll(1, 0) * (1.0 - lam[:, None]) + onehot * lam[:, None]
    major = torch.where(lam >= 0.5, labels, labels.roll(1, 0))
    return out, soft, major


def mix_batch(
    x: torch.Tensor, labels: torch.Tensor, spec: MixSpec | None, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, targets for the loss, labels for train top-1). Off: (x, labels, labels), drawing nothing,
    so a run without mixing draws exactly the numbers it drew before this existed."""
    if spec is None or not spec.active:
        return x, labels, labels
    draws = draw_mix(spec, x.shape[0], x.shape[2], x.shape[3], generator)
    return apply_mix(x, labels, draws, spec.num_classes)
