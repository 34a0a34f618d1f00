"""Named training setups: the reference notebooks, one flag away (`--recipe NAME`).

A recipe only sets TrainConfig fields; flags given on the command line override it. `global_batch`
is the batch the recipe was tuned for: with `--scale-lr linear` the lr follows the actual global batch
(batch x processes x accumulation), Goyal et al.'s linear scaling rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    summary: str
    global_batch: int
    settings: dict = field(default_factory=dict)
    shards: str = ""  # how to pack the data it expects


# The timed results train on all 60k images, as the dataset's published benchmark does.
FMNIST_FULL = "python -m resnet_dist.shard fashion-mnist --root /usr/share/datasets/fashion-mnist"

# What the timed Fashion-MNIST recipes share (the README's Results; each sets its width and epochs, and
# the 6-minute one what a short run cannot pay for).
FMNIST_TIMED = dict(
    model="resnet18",
    stem="cifar",
    dropout=0.0,
    optimizer="sgd",
    lr=0.2,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="onecycle",
    batch_size=128,
    label_smoothing=0.1,
    crop_padding=2,
    flip=True,
    random_erase=0.5,
    eval_tta="flip",
    eval_every=3,
)

# ILSVRC-2012 as people have it (train/<wnid>/*.JPEG, val in folders or flat with LOC_val_solution.csv).
IMAGENET = "python -m resnet_dist.shard imagenet --root ILSVRC2012 --max-size 512 (JPEGs kept as they are)"

RECIPES: dict[str, Recipe] = {
    "tinyimagenet-resnet34": Recipe(
        "ResNet-34, 3x3 stem without max-pool at 64x64, dropout 0.4, SGD 0.01 cosine, wd 4e-4, 100 epochs "
        "(reference: ~61% top-1 after 100 epochs, ~7 h on one P100)",
        global_batch=64,
        settings=dict(
            model="resnet34",
            stem="cifar",
            width=64,
            dropout=0.4,
            optimizer="sgd",
            lr=0.01,
            momentum=0.9,
            weight_decay=4e-4,
            schedule="cosine",
            epochs=100,
            batch_size=64,
            crop_padding=4,
            flip=True,
        ),
        shards="python -m resnet_dist.shard tiny-imagenet --root tiny-imagenet-200 --val-fraction 0.1 "
        "(90/10 split of train; the official val set becomes test)",
    ),
    "cifar10-resnet18": Recipe(
        "ResNet-18, 3x3 stem, Kaiming init, SGD 0.1 momentum 0.9, wd 5e-4, cosine over 100 epochs, batch 128, "
        "crop 32 pad 4 + flip",
        global_batch=128,
        settings=dict(
            model="resnet18",
            stem="cifar",
            width=64,
            dropout=0.0,
            optimizer="sgd",
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="cosine",
            epochs=100,
            batch_size=128,
            crop_padding=4,
            flip=True,
        ),
        shards="python -m resnet_dist.shard cifar10 --root cifar-10-batches-py",
    ),
    "cifar10-resnet34-adam": Recipe(
        "ResNet-34 with the 7x7 stride-2 stem + max-pool, Adam 1e-3, 10 epochs, no augmentation and no schedule, "
        "as the notebook (its batch size is not stated: 128 as the ResNet-18 notebook)",
        global_batch=128,
        settings=dict(
            model="resnet34",
            stem="imagenet",
            width=64,
            dropout=0.0,
            optimizer="adam",
            lr=1e-3,
            weight_decay=0.0,
            schedule="none",
            epochs=10,
            batch_size=128,
            crop_padding=0,
            flip=False,
        ),
        shards="python -m resnet_dist.shard cifar10 --root cifar-10-batches-py --val-fraction 0.1 (45k/5k/10k)",
    ),
    "cifar10-simplecnn": Recipe(
        "the notebook's 4-conv baseline (32-64-128-256), 50 epochs, same optimizer as cifar10-resnet18",
        global_batch=128,
        settings=dict(
            model="simple_cnn",
            width=32,
            dropout=0.0,
            optimizer="sgd",
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="cosine",
            epochs=50,
            batch_size=128,
            crop_padding=4,
            flip=True,
        ),
        shards="python -m resnet_dist.shard cifar10 --root cifar-10-batches-py",
    ),
    "fashion-mnist-demo": Recipe(
        "what `make demo` runs: a width-16 ResNet-18, 3 epochs of one-cycle SGD, label smoothing 0.1 "
        "(measured: 90.11% test top-1 in under 3 minutes on 2 CPU cores)",
        global_batch=256,
        settings=dict(
            model="resnet18",
            stem="cifar",
            width=16,
            dropout=0.0,
            optimizer="sgd",
            lr=0.2,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="onecycle",
            epochs=3,
            batch_size=128,
            label_smoothing=0.1,
            crop_padding=4,
            flip=True,
        ),
        shards="python -m resnet_dist.shard fashion-mnist --root /usr/share/datasets/fashion-mnist --val-fraction 0.1",
    ),
    "fashion-mnist-15min": Recipe(
        "the fast real-data recipe for a 2-core CPU: ResNet-18 at width 16, 15 epochs of one-cycle Nesterov SGD, "
        "label smoothing 0.1, crop + flip + random erasing, flip TTA (measured here: see the README's Results)",
        global_batch=256,
        settings=FMNIST_TIMED | dict(width=16, epochs=15),
        shards=FMNIST_FULL,
    ),
    "fashion-mnist-6min": Recipe(
        "the 6-minute real-data recipe for a 2-core CPU: ResNet-18 at width 16, 11 epochs of one-cycle Nesterov SGD, "
        "label smoothing 0.1, no weight decay on norm/bias, crop + flip (no erasing: too few epochs to pay for it), "
        "flip TTA, one evaluation at the end (measured here: see the README's Results)",
        global_batch=256,
        settings=FMNIST_TIMED | dict(width=16, epochs=11, wd_norm_bias=False, random_erase=0.0, eval_every=11),
        shards=FMNIST_FULL,
    ),
    "fashion-mnist-resnet18": Recipe(
        "the first hour-long real-data recipe for a 2-core CPU (fashion-mnist-60min is the current one): ResNet-18 "
        "at width 32, 22 epochs of one-cycle Nesterov SGD, label smoothing 0.1, crop + flip + random erasing, flip "
        "TTA (measured here: see the README's Results)",
        global_batch=256,
        settings=FMNIST_TIMED | dict(width=32, epochs=22),
        shards=FMNIST_FULL,
    ),
    "fashion-mnist-60min": Recipe(
        "the 60-minute real-data recipe for a 2-core CPU: ResNet-18 at width 32, 36 epochs of one-cycle Nesterov "
        "SGD, label smoothing 0.1, no weight decay on norm/bias, crop + flip + random erasing, flip TTA, "
        "evaluation every 6 epochs (measured here: see the README's Results)",
        global_batch=256,
        settings=FMNIST_TIMED | dict(width=32, epochs=36, wd_norm_bias=False, eval_every=6),
        shards=FMNIST_FULL,
    ),
    "imagenet-resnet50": Recipe(
        "torchvision's reference ResNet-50 recipe (the classic one, not the improved 80.9% one): SGD 0.1 momentum "
        "0.9, wd 1e-4, x0.1 every 30 epochs, 90 epochs, batch 32 per process x 8 = 256, RandomResizedCrop 224 + "
        "flip, eval resize 256 + centre 224. Published: 76.13% top-1 (torchvision's ResNet50_Weights.IMAGENET1K_V1, "
        "trained on 8 V100s; no training time published)",
        global_batch=256,
        settings=dict(
            model="resnet50",
            stem="imagenet",
            width=64,
            dropout=0.0,
            optimizer="sgd",
            lr=0.1,
            momentum=0.9,
            weight_decay=1e-4,
            schedule="step",
            lr_step_epochs=30,
            epochs=90,
            batch_size=32,
            train_crop="rrc",
            res=224,
            rrc_scale="0.08,1",
            rrc_ratio="3/4,4/3",
            crop_ratio=0.875,
            eval_res=224,
            flip=True,
        ),
        shards=IMAGENET,
    ),
    "imagenet-resnet18": Recipe(
        "FFCV's rn18_16_epochs config: ResNet-18, SGD peak 0.5 at epoch 2 then linear to 0, momentum 0.9, wd 5e-5, "
        "label smoothing 0.1, batch 1024, 16 epochs, RandomResizedCrop 160 px rising to 192 over epochs 11-13, "
        "eval at 256 (crop ratio 224/256) with flip TTA. Published (FFCV's ImageNet table, 1 x A100): 66.9% top-1 "
        "in 35.0 min; their 24/32/40/56/88-epoch configs: 68.8/70.0/70.6/71.3/72.4% in 51.6/68.9/85.5/119.4/187.3 "
        "min. Not replicated here: FFCV's BlurPool and no weight decay on BatchNorm",
        global_batch=1024,
        settings=dict(
            model="resnet18",
            stem="imagenet",
            width=64,
            dropout=0.0,
            optimizer="sgd",
            lr=0.5,
            momentum=0.9,
            weight_decay=5e-5,
            schedule="triangle",
            warmup_epochs=2.0,
            epochs=16,
            batch_size=1024,
            label_smoothing=0.1,
            train_crop="rrc",
            res_schedule="160:192:11-13",
            rrc_scale="0.08,1",
            rrc_ratio="3/4,4/3",
            crop_ratio=0.875,
            eval_res=256,
            eval_tta="flip",
            flip=True,
        ),
        shards=IMAGENET,
    ),
}


def scaled_lr(lr: float, tuned_batch: int, global_batch: int) -> float:
    """Linear scaling: the lr per example stays what the recipe was tuned with."""
    return lr * global_batch / tuned_batch
