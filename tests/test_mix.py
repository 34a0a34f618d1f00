"""Mixup and CutMix (resnet_dist.mix): torchvision v2's laws, its pixels and labels, and label smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from resnet_dist.config import TrainConfig
from resnet_dist.mix import MixSpec, apply_mix, draw_mix, mix_batch, mix_spec

N_DRAWS = 4000
# Two-sample Kolmogorov-Smirnov: equal laws give D above c(alpha) * sqrt(2 / n) = 1.95 * 0.022 = 0.044 with
# probability 0.001 (n = m = 4000); every wrong law below is checked to land far above it.
KS_LIMIT = 0.05
H, W = 24, 20  # not square: rows and columns must not be swapped


def ks(a, b) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs. Both in
    float32, as torchvision's soft labels hold them: a CutMix lambda has atoms (whole pixel counts), and
    0.9 must meet 0.9 there, not 0.89999998."""
    a, b = np.sort(np.asarray(a, dtype=np.float32)), np.sort(np.asarray(b, dtype=np.float32))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


def torchvision_lambdas(transform, n: int) -> np.ndarray:
    """The weight torchvision gives each batch's first image, read back from its soft label (classes 0, 1)."""
    torch.manual_seed(123)
    images, labels = torch.zeros(2, 1, H, W), torch.tensor([0, 1])
    return np.array([transform(images, labels)[1][0, 0].item() for _ in range(n)])


def our_lambdas(spec: MixSpec, n: int, seed: int = 5) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return np.concatenate([draw_mix(spec, 500, H, W, generator).lam.numpy() for _ in range(n // 500)])


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_lambda_has_torchvision_mixups_law(alpha):
    ours = our_lambdas(MixSpec(alpha, 0.0, 1.0, 0.5, 2), N_DRAWS)
    theirs = torchvision_lambdas(v2.MixUp(alpha=alpha, num_classes=2), N_DRAWS)
    assert ks(ours, theirs) < KS_LIMIT
    # the test can fail: Beta with twice the alpha, or (alpha 0.2) a uniform lambda, is far from it
    assert ks(our_lambdas(MixSpec(alpha * 2, 0.0, 1.0, 0.5, 2), N_DRAWS), theirs) > 1.5 * KS_LIMIT
    if alpha != 1.0:  # Beta(1, 1) is the uniform law
        assert ks(np.random.default_rng(0).random(N_DRAWS), theirs) > 3 * KS_LIMIT


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_cutmix_kept_fraction_has_torchvision_cutmixs_law(alpha):
    spec = MixSpec(0.0, alpha, 1.0, 0.5, 2)
    ours = our_lambdas(spec, N_DRAWS)
    theirs = torchvision_lambdas(v2.CutMix(alpha=alpha, num_classes=2), N_DRAWS)
    assert ks(ours, theirs) < KS_LIMIT
    # the lambda before the box's correction (plain Beta) has another law: the test sees it
    rng = np.random.default_rng(1)
    assert ks(rng.beta(alpha, alpha, N_DRAWS), theirs) > 1.5 * KS_LIMIT


def test_both_on_is_torchvisions_random_choice_of_the_two():
    ours = our_lambdas(MixSpec(0.2, 1.0, 1.0, 0.3, 2), N_DRAWS)
    choice = v2.RandomChoice([v2.MixUp(alpha=0.2, num_classes=2), v2.CutMix(alpha=1.0, num_classes=2)], p=[0.7, 0.3])
    assert ks(ours, torchvision_lambdas(choice, N_DRAWS)) < KS_LIMIT
    swapped = v2.RandomChoice([v2.MixUp(alpha=0.2, num_classes=2), v2.CutMix(alpha=1.0, num_classes=2)], p=[0.3, 0.7])
    assert ks(ours, torchvision_lambdas(swapped, N_DRAWS)) > KS_LIMIT  # the switch probability is not ignored


def test_mix_prob_leaves_that_share_of_samples_whole():
    lam = our_lambdas(MixSpec(1.0, 1.0, 0.25, 0.5, 2), N_DRAWS)
    whole = float((lam == 1.0).mean())  # a Beta(1, 1) or box draw is exactly 1 with probability ~0
    assert abs(whole - 0.75) < 0.03


def batch(n: int = 32, k: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, H, W, generator=g), torch.randint(0, k, (n,), generator=g)


def test_mixed_images_targets_and_top1_labels_are_exactly_torchvisions():
    x, y = batch()
    draws = draw_mix(MixSpec(0.4, 1.0, 0.8, 0.5, 5), len(y), H, W, torch.Generator().manual_seed(3))
    out, soft, major = apply_mix(x, y, draws, 5)
    assert draws.cut.any() and (~draws.cut & (draws.lam < 1)).any() and (draws.lam == 1).any()  # all 3 kinds
    onehot = F.one_hot(y, 5).float()
    for i in range(len(y)):
        j, lam = i - 1, draws.lam[i].float()
        expected = onehot[j] * (1 - lam) + onehot[i] * lam
        assert torch.equal(soft[i], expected)
        assert major[i] == (y[i] if lam >= 0.5 else y[j])
        if not draws.cut[i]:  # mixup (lam 1: untouched) as torchvision's MixUp computes it
            assert torch.equal(out[i], x[j] * (1 - lam) + x[i] * lam)
            continue
        y1, y2, x1, x2 = draws.box[:, i].tolist()
        assert 0 <= y1 <= y2 <= H and 0 <= x1 <= x2 <= W
        assert lam.item() == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (H * W))  # the fraction kept
        # torchvision's CutMix with this box: the partner's pixels exactly inside it, the image's outside
        params = {"labels": y, "batch_size": len(y), "box": (x1, y1, x2, y2), "lam_adjusted": lam.item()}
        theirs = v2.CutMix(num_classes=5).transform(x, params)
        assert torch.equal(out[i], theirs[i])
        inside = torch.zeros(H, W, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        assert torch.equal(out[i][:, inside], x[j][:, inside]) and torch.equal(out[i][:, ~inside], x[i][:, ~inside])


def test_label_smoothing_of_soft_targets_is_the_reference_formula():
    x, y = batch()
    out, soft, _ = mix_batch(x, y, MixSpec(0.2, 1.0, 1.0, 0.5, 5), torch.Generator().manual_seed(1))
    logits = torch.randn(len(y), 5, generator=torch.Generator().manual_seed(2))
    eps = 0.1
    # torchvision's references/classification: CrossEntropyLoss(label_smoothing=eps) on the mixed targets,
    # i.e. the cross-entropy against (1 - eps) * target + eps / K
    reference = -(((1 - eps) * soft + eps / 5) * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(F.cross_entropy(logits, soft, label_smoothing=eps), reference, atol=1e-6)
    # and, being linear in the target, it is the lambda-weighted smoothed loss of the two labels
    lam = soft.gather(1, y[:, None]).squeeze(1)  # exact where the two labels differ
    per = lam * F.cross_entropy(logits, y, label_smoothing=eps, reduction="none") + (1 - lam) * F.cross_entropy(
        logits, y.roll(1), label_smoothing=eps, reduction="none"
    )
    differ = y != y.roll(1)
    got = F.cross_entropy(logits, soft, label_smoothing=eps, reduction="none")
    assert torch.allclose(got[differ], per[differ], atol=1e-5)


def test_draws_come_from_the_steps_generator_only():
    x, y = batch()
    spec = MixSpec(0.2, 1.0, 1.0, 0.5, 5)
    torch.manual_seed(0)
    a = mix_batch(x, y, spec, torch.Generator().manual_seed(9))
    torch.manual_seed(1)  # another global state: the same mix
    b = mix_batch(x, y, spec, torch.Generator().manual_seed(9))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    c = mix_batch(x, y, spec, torch.Generator().manual_seed(10))
    assert not torch.equal(a[0], c[0])
    # off: nothing is drawn, so runs without mixing draw what they drew before
    g = torch.Generator().manual_seed(4)
    state = g.get_state()
    out, target, major = mix_batch(x, y, MixSpec(0.0, 0.0, 1.0, 0.5, 5), g)
    assert out is x and target is y and major is y and torch.equal(g.get_state(), state)
    assert mix_batch(x, y, None, g)[0] is x
    # the trainer's spec: None (nothing drawn, plain top-1) unless some sample can be mixed
    assert mix_spec(TrainConfig(), 10) is None and mix_spec(TrainConfig(cutmix=1.0, mix_prob=0.0), 10) is None
    assert mix_spec(TrainConfig(mixup=0.2), 10) == MixSpec(0.2, 0.0, 1.0, 0.5, 10)
