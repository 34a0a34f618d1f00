"""Realistic JPEGs for the 224 px loader case: random crops of real photographs, re-encoded.

Synthetic patterns decode and resize unlike photos (noise defeats JPEG's compression, flat colour
flatters it), so the ImageNet-like rows use the natural photographs that scikit-image ships (and
scikit-learn's two sample images when it is installed): crops with sides drawn from 150-600 px
(ImageNet's images average about 400x350), re-encoded at JPEG quality 75-95.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_dist.errors import UsageError

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")


def photographs() -> list[np.ndarray]:
    """The RGB photographs available here, uint8 HxWx3."""
    try:
        import skimage.data
    except ImportError:
        raise UsageError(
            "the photo224 case needs scikit-image's sample photographs: pip install 'resnet-dist[bench]'"
        ) from None
    photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    try:
        from sklearn.datasets import load_sample_images

        photos += list(load_sample_images().images)
    except ImportError:
        pass
    return [p[:, :, :3] for p in photos]


def photo_jpegs(n: int, seed: int = 0, sides=(150, 600), quality=(75, 95)) -> list[tuple[bytes, int]]:
    """n (JPEG bytes, label) pairs: a random crop of a random photograph, its label the photograph's index."""
    photos, rng, out = photographs(), np.random.default_rng(seed), []
    for _ in range(n):
        label = int(rng.integers(len(photos)))
        photo = photos[label]
        height, width = photo.shape[:2]
        h = int(rng.integers(min(sides[0], height), min(sides[1], height) + 1))
        w = int(rng.integers(min(sides[0], width), min(sides[1], width) + 1))
        top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
        buffer = io.BytesIO()
        q = int(rng.integers(quality[0], quality[1] + 1))
        Image.fromarray(photo[top : top + h, left : left + w]).save(buffer, "JPEG", quality=q)
        out.append((buffer.getvalue(), label))
    return out


def write_imagefolder(images: list[tuple[bytes, int]], root: Path, split: str = "train") -> Path:
    """The images as root/SPLIT/class_LABEL/NNNNNN.jpg, the layout `python -m resnet_dist.shard imagefolder`
    packs; returns root."""
    for i, (data, label) in enumerate(images):
        folder = root / split / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(data)
    return root
