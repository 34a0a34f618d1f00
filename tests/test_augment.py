import torch
import torchvision.transforms.v2.functional as TF

from resnet_dist.augment import BatchAugment, crop_flip, normalize, random_erase


def reference(images, padding, generator_seed):
    """What crop_flip must equal: per-sample pad, crop at the drawn offset, flip, via torchvision."""
    n = images.shape[0]
    g = torch.Generator().manual_seed(generator_seed)
    shift = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=g)
    mirrored = torch.rand(n, 1, generator=g) < 0.5
    out = []
    for i in range(n):
        chw = images[i].permute(2, 0, 1)
        padded = TF.pad(chw, [padding], fill=0)
        crop = TF.crop(padded, int(shift[0, i]), int(shift[1, i]), chw.shape[1], chw.shape[2])
        out.append((TF.horizontal_flip(crop) if mirrored[i] else crop).permute(1, 2, 0))
    return torch.stack(out)


def test_crop_flip_equals_torchvision_per_sample_transforms():
    images = torch.randint(0, 256, (32, 12, 10, 3), dtype=torch.uint8)
    got = crop_flip(images, 4, True, torch.Generator().manual_seed(7))
    assert got.dtype == torch.uint8 and got.shape == images.shape
    assert torch.equal(got, reference(images, 4, 7))


def test_crop_flip_draws_differ_per_sample_and_cover_every_offset():
    images = torch.arange(64, dtype=torch.uint8).view(1, 8, 8, 1).repeat(2000, 1, 1, 1)
    out = crop_flip(images, 2, False, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) == 25  # (2*2+1)^2 offsets all drawn
    assert torch.equal(crop_flip(images[:3], 0, False), images[:3])


def test_normalize_matches_formula_and_is_channels_last():
    images = torch.randint(0, 256, (4, 6, 5, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    x = normalize(images, mean, std, channels_last=True)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert x.shape == (4, 3, 6, 5)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert normalize(images, mean, std, channels_last=False).is_contiguous()


def test_batch_augment_eval_is_deterministic_and_train_is_not():
    aug = BatchAugment([0.5], [0.25], torch.device("cpu"), padding=4, flip=True)
    images = torch.randint(0, 256, (16, 28, 28, 1), dtype=torch.uint8)
    assert torch.equal(aug.eval(images), aug.eval(images))
    a = aug.train(images, torch.Generator().manual_seed(1))
    b = aug.train(images, torch.Generator().manual_seed(2))
    assert a.shape == (16, 1, 28, 28) and not torch.equal(a, b)


def erased_boxes(x: torch.Tensor, out: torch.Tensor) -> list[tuple[int, int] | None]:
    """(height, width) of the zeroed rectangle of each image, None where nothing was erased."""
    boxes = []
    for changed in (x != out).any(1):
        if not changed.any():
            boxes.append(None)
            continue
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        top, left, h, w = int(rows[0]), int(cols[0]), len(rows), len(cols)
        assert int(rows[-1]) - top + 1 == h and int(cols[-1]) - left + 1 == w  # one solid rectangle
        assert changed[top : top + h, left : left + w].all()
        boxes.append((h, w))
    return boxes


def test_random_erase_draws_like_torchvision_random_erasing():
    from torchvision.transforms import v2

    n, size = 4000, 28
    x = torch.randn(n, 1, size, size) + 5  # nothing is 0 before erasing
    ours = erased_boxes(x, random_erase(x, 0.5, torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    theirs = erased_boxes(x, torch.stack([v2.RandomErasing(p=0.5, value=0)(img) for img in x]))
    for boxes in (ours, theirs):
        assert all(h < size and w < size for h, w in filter(None, boxes))
    rate = lambda boxes: sum(b is not None for b in boxes) / n  # noqa: E731
    area = lambda boxes: sum(h * w for h, w in filter(None, boxes)) / sum(b is not None for b in boxes)  # noqa: E731
    assert abs(rate(ours) - rate(theirs)) < 0.04 and abs(rate(ours) - 0.5) < 0.04
    assert abs(area(ours) - area(theirs)) < 0.06 * area(theirs)
    tall = lambda boxes: sum(h > w for h, w in filter(None, boxes)) / sum(b is not None for b in boxes)  # noqa: E731
    assert abs(tall(ours) - tall(theirs)) < 0.05


def test_random_erase_is_seeded_keeps_the_layout_and_only_runs_in_train():
    images = torch.randint(1, 256, (64, 28, 28, 1), dtype=torch.uint8)
    plain = BatchAugment([0.0], [1.0], torch.device("cpu"), padding=0, flip=False)
    erasing = BatchAugment([0.0], [1.0], torch.device("cpu"), padding=0, flip=False, erase=1.0)
    a = erasing.train(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, erasing.train(images, torch.Generator().manual_seed(3)))
    assert a.is_contiguous(memory_format=torch.channels_last)
    erased = (a == 0).flatten(1).any(1)
    assert erased.float().mean() > 0.9  # p=1: all but the rare image where no draw fits
    assert torch.equal(erasing.eval(images), plain.eval(images))
    assert torch.equal(plain.train(images, torch.Generator().manual_seed(3)), plain.eval(images))


def test_cpu_transforms_run_with_their_own_thread_count_and_restore_torchs():
    images = torch.randint(0, 256, (16, 12, 10, 3), dtype=torch.uint8)
    before = torch.get_num_threads()
    one = BatchAugment([0.5], [0.25], torch.device("cpu"), padding=2, cpu_threads=1)
    default = BatchAugment([0.5], [0.25], torch.device("cpu"), padding=2, cpu_threads=0)
    a = one.train(images, torch.Generator().manual_seed(3))
    b = default.train(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(one.eval(images), default.eval(images))
    assert torch.get_num_threads() == before
