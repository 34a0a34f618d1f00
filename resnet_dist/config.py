"""One typed training config: defaults, command-line parsing and validation.

Every field is a command-line option (`batch_size` -> `--batch-size`); its help text is the field's
`help` metadata. Validation happens before any process group, model or data is touched, so a bad
flag costs one line and exit code 2, not a traceback from rank 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from resnet_dist.cache import ENV_CACHE, check_limit
from resnet_dist.crops import parse_range, parse_res_schedule
from resnet_dist.errors import OneLineParser, UsageError
from resnet_dist.locations import check_location, scheme_of
from resnet_dist.models import MODELS
from resnet_dist.pretrained import check_spec
from resnet_dist.recipes import RECIPES


def opt(default, help: str, choices: Sequence[str] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # where
    data: str = opt("", "shard folder or http(s) URL prefix holding index.json (python -m resnet_dist.shard)")
    out: str = opt("", "run folder: config, history, summary, checkpoints, plots, W&B run")
    recipe: str = opt("", f"start from a named setup ({', '.join(RECIPES)}); flags given override it")
    # model
    model: str = opt("resnet18", "architecture", MODELS)
    stem: str = opt(
        "cifar",
        "cifar: 3x3 stride 1, no max-pool (small images); imagenet: 7x7 stride 2 + max-pool",
        ("cifar", "imagenet"),
    )
    width: int = opt(
        0, "base channels of the first stage; 0: the model's own (ResNets 64 as torchvision, simple_cnn 32)"
    )
    dropout: float = opt(0.0, "dropout before the classifier")
    zero_init_residual: bool = opt(False, "zero the last BN of each residual block so blocks start as identity")
    # optimisation
    epochs: int = opt(10, "passes over the train split")
    batch_size: int = opt(128, "images per process per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch x processes x this)")
    optimizer: str = opt("sgd", "optimizer", ("sgd", "adam", "adamw"))
    lr: float = opt(0.1, "peak learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(False, "Nesterov momentum (SGD)")
    weight_decay: float = opt(5e-4, "weight decay (L2 for sgd/adam, decoupled for adamw)")
    schedule: str = opt(
        "cosine",
        "lr schedule over all optimizer steps (triangle: after the warm-up, straight down to 0, FFCV's cyclic)",
        ("cosine", "step", "triangle", "onecycle", "none"),
    )
    lr_step_epochs: int = opt(0, "--schedule step: x0.1 every this many epochs; 0: at 50% and 75% of the run")
    warmup_epochs: float = opt(0.0, "linear warm-up from 0 (onecycle: length of the rising phase)")
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing")
    sync_bn: bool = opt(False, "synchronise BatchNorm statistics across processes")
    scale_lr: str = opt(
        "none",
        "linear: scale --lr by the actual global batch over the one the recipe was tuned for",
        ("none", "linear"),
    )
    tuned_global_batch: int = opt(0, "global batch the lr was tuned for (set by --recipe; used by --scale-lr linear)")
    # data
    train_crop: str = opt(
        "pad",
        "pad: zero-pad + random crop + flip on the device (one image size only); rrc: RandomResizedCrop + flip "
        "to --res in the loader workers (images of any size); center: resize + centre crop + flip to --res",
        ("pad", "rrc", "center"),
    )
    res: int = opt(0, "side of the square crops of --train-crop rrc/center; 0: the images' own size (one size only)")
    res_schedule: str = opt(
        "",
        "progressive resizing: START:END (linear over the run), START:END:N (END from epoch N, 0-based) or "
        "START:END:A-B (START through epoch A, END from epoch B), multiples of 32; overrides --res",
    )
    rrc_scale: str = opt("0.08,1", "--train-crop rrc: range of the crop's area, as a fraction of the image's")
    rrc_ratio: str = opt("3/4,4/3", "--train-crop rrc: range of the crop's aspect ratio (width / height)")
    crop_ratio: float = opt(
        0.875, "evaluation (and --train-crop center): resize the shorter side to res / this, then centre-crop res"
    )
    eval_res: int = opt(0, "evaluation crop side with --train-crop rrc/center; 0: the last training resolution")
    decode: str = opt(
        "cpu",
        "gpu (CUDA only): workers send JPEG bytes, the training process decodes batches with nvJPEG and crops "
        "on the GPU; cpu: workers decode and crop",
        ("cpu", "gpu"),
    )
    crop_padding: int = opt(4, "--train-crop pad: random-crop padding in pixels (0: no crop)")
    flip: bool = opt(True, "random horizontal flip")
    random_erase: float = opt(
        0.0,
        "probability of erasing a random rectangle of a train image (torchvision's "
        "RandomErasing: 2-33% of the area, aspect 0.3-3.3, set to the dataset mean)",
    )
    # issue 13: mix
    mixup: float = opt(
        0.0, "mixup: blend each train image with its batch neighbour, weight ~ Beta(ALPHA, ALPHA); 0: off"
    )
    cutmix: float = opt(
        0.0, "cutmix: paste a box of the batch neighbour into each train image, kept area ~ Beta(ALPHA, ALPHA); 0: off"
    )
    mix_prob: float = opt(1.0, "--mixup/--cutmix: probability that a sample is mixed at all (timm's mixup_prob)")
    mix_switch_prob: float = opt(
        0.5, "--mixup and --cutmix both on: probability that a mixed sample uses cutmix (timm's switch_prob)"
    )
    augment: str = opt(
        "none",
        "per-sample auto-augmentation of train images in the loader workers: torchvision's TrivialAugmentWide "
        "or RandAugment (after --train-crop rrc/center, before the device's pad crop + flip)",
        ("none", "trivialaugment", "randaugment"),
    )
    randaugment_n: int = opt(2, "--augment randaugment: operations per image (torchvision's num_ops)")
    randaugment_m: int = opt(9, "--augment randaugment: magnitude, 0-30 (torchvision's magnitude of 31 bins)")
    eval_every: int = opt(
        1,
        "validate every this many epochs (and after the last one); the best checkpoint is "
        "picked among validated epochs",
    )
    eval_tta: str = opt(
        "none",
        "flip: evaluate each image and its mirror and average their softmax "
        "(costs a second forward pass per eval image)",
        ("none", "flip"),
    )
    cache: bool = opt(
        True,
        "keep remote shards (any URL but file://) in a machine-local cache shared by all ranks and loader "
        "workers: each shard is downloaded once per machine; --no-cache downloads a shard each time it is read",
    )
    cache_dir: str = opt("", f"folder of the shard cache; none: ${ENV_CACHE}, else ~/.cache/resnet-dist")
    cache_limit: float = opt(
        0.0, "GB the shard cache may hold; least-recently-used shards beyond it are deleted (0: no limit)"
    )
    num_workers: int = opt(2, "loader worker processes per training process")
    shuffle_block: int = opt(2048, "samples shuffled together in a worker, on top of the seeded shard order")
    channels_last: bool = opt(True, "channels_last memory format (faster convolutions on CPUs and tensor cores)")
    cpu_bf16: str = opt(
        "auto",
        "auto: on a CPU with AVX-512-BF16/AMX, bf16 autocast when the launcher asked for no "
        "mixed precision; off: keep fp32",
        ("auto", "off"),
    )
    compile: bool = opt(False, "torch.compile the model (compiling delays the first steps)")
    # issue 13: init
    init_from: str = opt(
        "",
        "start from these weights (torchvision/timm ResNet naming): a .safetensors or .pth/.pt/.bin file, a "
        "checkpoint or run folder of this project, or torchvision:ARCH.WEIGHTS (e.g. torchvision:resnet50.DEFAULT); "
        "a resumed run loads its own checkpoint instead",
    )
    freeze_backbone: bool = opt(False, "train the classifier (fc) only; the backbone's BatchNorm stays in eval mode")
    unfreeze_epoch: int = opt(
        0, "with --freeze-backbone: frozen for the first K epochs only, all layers trained after; 0: all"
    )
    backbone_lr_mult: float = opt(1.0, "the backbone's lr is --lr times this (the classifier keeps --lr)")
    wd_norm_bias: bool = opt(
        True, "weight decay on BatchNorm weights and biases and on all biases too (--no-wd-norm-bias: none there)"
    )
    clip_grad_norm: float = opt(0.0, "clip the global gradient norm to this before each optimizer step (0: off)")
    # issue 13: ema
    ema: float = opt(
        0.0,
        "decay of an exponential moving average of the weights and BatchNorm buffers, evaluated and saved "
        "beside the raw ones (e.g. 0.999; 0: off)",
    )
    ema_warmup: bool = opt(
        True,
        "--ema: timm's warm-up, decay min(--ema, 1 - (1 + t)^-2/3) after t optimizer steps; --no-ema-warmup: "
        "--ema from the second step (the first copies the weights)",
    )
    ema_every: int = opt(1, "--ema: update the average every this many optimizer steps (decay raised to this power)")
    best_by: str = opt(
        "auto", "which val top-1 picks checkpoints/best; auto: ema with --ema, else raw", ("auto", "ema", "raw")
    )
    # run control
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs); for smoke runs")
    seed: int = opt(0, "seed for init, data order and augmentation")
    resume: bool = opt(False, "kept for scripts: a run folder holding a checkpoint is always resumed")
    log_every: int = opt(20, "optimizer steps between logged train metrics")
    checkpoint_every: int = opt(0, "also save checkpoints/last every this many optimizer steps (0: each epoch only)")
    strict_data: bool = opt(False, "fail on a damaged or changed shard or an undecodable image instead of skipping it")
    max_bad_steps: int = opt(10, "stop after this many optimizer steps in a row with a NaN/inf loss (each is skipped)")
    collective_timeout: float = opt(1800.0, "seconds a collective may wait for a silent rank before the run fails")
    wandb_project: str = opt("resnet-dist", "W&B project")
    wandb_mode: str = opt(
        "offline",
        "offline writes the run under --out (upload later with `wandb sync`)",
        ("online", "offline", "disabled"),
    )
    wandb_system_stats: bool = opt(
        True,
        "W&B's system metrics (CPU, memory, disk, network; GPU utilisation, memory and power where there are "
        "GPUs), sampled by W&B every 15 s; --no-wandb-system-stats turns them off",
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """Every TrainConfig field as a flag. Defaults are suppressed so that parse_args can tell the flags a
    user gave (which override a recipe) from the ones left out (which a recipe may set)."""
    parser = OneLineParser(
        prog="accelerate launch launch/train.py",
        argument_default=argparse.SUPPRESS,
        description="Train a ResNet on WebDataset shards with Accelerate (DDP, mixed precision, SyncBN).",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help texts: a literal "%" (as in "2-33% of the area") must be doubled.
        help_ = f"{f.metadata['help']} (default: {f.default if f.default != '' else 'none'})".replace("%", "%%")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, choices=f.metadata["choices"], help=help_)
    parser.add_argument(
        "--print-config",
        action="store_true",
        default=False,
        help="print the resolved config as JSON and exit (needs no --data)",
    )
    return parser


def check_places(cfg: TrainConfig) -> None:
    """--data may be any location storage reads; the run folder is local (checkpoints are renamed into place)."""
    if cfg.data:
        check_location(cfg.data, "--data")
    if cfg.out and scheme_of(check_location(cfg.out, "--out")) not in (None, "file"):
        raise UsageError(f"--out {cfg.out}: the run folder must be on this machine's file system")


def validate(cfg: TrainConfig, paths: bool = True) -> TrainConfig:
    """Raise UsageError naming the first option that makes no sense (paths=False: --data/--out may be absent)."""
    checks = [
        (
            bool(cfg.data) or not paths,
            "--data is required: a shard folder or URL made by `python -m resnet_dist.shard`",
        ),
        (bool(cfg.out) or not paths, "--out is required: the run folder"),
        (cfg.epochs > 0, f"--epochs must be positive (got {cfg.epochs})"),
        (cfg.batch_size > 0, f"--batch-size must be positive (got {cfg.batch_size})"),
        (cfg.grad_accum > 0, f"--grad-accum must be at least 1 (got {cfg.grad_accum})"),
        (cfg.lr > 0, f"--lr must be positive (got {cfg.lr})"),
        (cfg.width >= 0, f"--width must be positive, or 0 for the model's default (got {cfg.width})"),
        (0 <= cfg.dropout < 1, f"--dropout must be in [0, 1) (got {cfg.dropout})"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1) (got {cfg.momentum})"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0 (got {cfg.weight_decay})"),
        (0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1) (got {cfg.label_smoothing})"),
        (cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0 (got {cfg.warmup_epochs})"),
        (0 <= cfg.random_erase <= 1, f"--random-erase must be in [0, 1] (got {cfg.random_erase})"),
        (cfg.crop_padding >= 0, f"--crop-padding must be >= 0 (got {cfg.crop_padding})"),
        (cfg.res >= 0, f"--res must be >= 0 (got {cfg.res})"),
        (cfg.eval_res >= 0, f"--eval-res must be >= 0 (got {cfg.eval_res})"),
        (0 < cfg.crop_ratio <= 1, f"--crop-ratio must be in (0, 1] (got {cfg.crop_ratio})"),
        (cfg.lr_step_epochs >= 0, f"--lr-step-epochs must be >= 0 (got {cfg.lr_step_epochs})"),
        (
            cfg.train_crop != "pad" or not (cfg.res or cfg.res_schedule or cfg.eval_res),
            "--res, --res-schedule and --eval-res need --train-crop rrc or center (pad keeps the images' size)",
        ),
        (cfg.train_crop != "pad" or cfg.decode == "cpu", "--decode gpu needs --train-crop rrc or center"),
        (cfg.num_workers >= 0, f"--num-workers must be >= 0 (got {cfg.num_workers})"),
        (cfg.shuffle_block > 0, f"--shuffle-block must be positive (got {cfg.shuffle_block})"),
        (cfg.max_steps >= 0, f"--max-steps must be >= 0 (got {cfg.max_steps})"),
        (cfg.eval_every > 0, f"--eval-every must be positive (got {cfg.eval_every})"),
        (cfg.log_every > 0, f"--log-every must be positive (got {cfg.log_every})"),
        (cfg.checkpoint_every >= 0, f"--checkpoint-every must be >= 0 (got {cfg.checkpoint_every})"),
        (cfg.max_bad_steps >= 0, f"--max-bad-steps must be >= 0 (got {cfg.max_bad_steps})"),
        (cfg.collective_timeout > 0, f"--collective-timeout must be positive (got {cfg.collective_timeout})"),
        (not (cfg.nesterov and cfg.optimizer != "sgd"), "--nesterov applies to --optimizer sgd only"),
        (not (cfg.nesterov and cfg.momentum == 0), "--nesterov needs --momentum > 0"),
        (cfg.tuned_global_batch >= 0, f"--tuned-global-batch must be >= 0 (got {cfg.tuned_global_batch})"),
        (
            not (cfg.scale_lr == "linear" and not cfg.tuned_global_batch),
            "--scale-lr linear needs the batch the lr was tuned for: a --recipe, or --tuned-global-batch N",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    check_regularisers(cfg)
    check_finetune(cfg, paths)
    check_places(cfg)
    check_crop_options(cfg)
    check_limit(cfg.cache_limit)
    return cfg


def check_regularisers(cfg: TrainConfig) -> None:
    """--ema, mixup/cutmix and the auto-augmentations (issue 13)."""
    checks = [
        (0 <= cfg.ema < 1, f"--ema must be in [0, 1): 0 turns it off, e.g. 0.999 (got {cfg.ema})"),
        (cfg.ema_every > 0, f"--ema-every must be positive (got {cfg.ema_every})"),
        (cfg.best_by != "ema" or cfg.ema > 0, "--best-by ema needs --ema DECAY"),
        (cfg.mixup >= 0, f"--mixup must be >= 0 (got {cfg.mixup})"),
        (cfg.cutmix >= 0, f"--cutmix must be >= 0 (got {cfg.cutmix})"),
        (0 <= cfg.mix_prob <= 1, f"--mix-prob must be in [0, 1] (got {cfg.mix_prob})"),
        (0 <= cfg.mix_switch_prob <= 1, f"--mix-switch-prob must be in [0, 1] (got {cfg.mix_switch_prob})"),
        (cfg.randaugment_n >= 0, f"--randaugment-n must be >= 0 (got {cfg.randaugment_n})"),
        (0 <= cfg.randaugment_m <= 30, f"--randaugment-m must be in [0, 30] (got {cfg.randaugment_m})"),
        (
            cfg.augment == "none" or cfg.decode == "cpu",
            "--augment needs --decode cpu (the loader workers augment the images they decode)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def check_finetune(cfg: TrainConfig, paths: bool) -> None:
    """--init-from (its scheme and existence; nothing is read) and the fine-tuning options."""
    checks = [
        (cfg.unfreeze_epoch >= 0, f"--unfreeze-epoch must be >= 0 (got {cfg.unfreeze_epoch})"),
        (not cfg.unfreeze_epoch or cfg.freeze_backbone, "--unfreeze-epoch needs --freeze-backbone"),
        (
            cfg.unfreeze_epoch < cfg.epochs,
            f"--unfreeze-epoch {cfg.unfreeze_epoch} leaves no epoch of {cfg.epochs} unfrozen (0: frozen throughout)",
        ),
        (
            not cfg.freeze_backbone or cfg.init_from,
            "--freeze-backbone needs --init-from: a frozen random backbone learns nothing",
        ),
        (cfg.backbone_lr_mult > 0, f"--backbone-lr-mult must be positive (got {cfg.backbone_lr_mult})"),
        (cfg.clip_grad_norm >= 0, f"--clip-grad-norm must be >= 0, 0 for off (got {cfg.clip_grad_norm})"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if cfg.init_from:
        check_spec(cfg.init_from, cfg.model, cfg.stem, paths)


def check_crop_options(cfg: TrainConfig) -> None:
    """--res-schedule, --rrc-scale and --rrc-ratio parse, and make sense."""
    if cfg.res_schedule:
        try:
            parse_res_schedule(cfg.res_schedule)
        except ValueError as exc:
            raise UsageError(f"--res-schedule {cfg.res_schedule}: {exc}") from None
    for flag, text, upper in (("--rrc-scale", cfg.rrc_scale, 1.0), ("--rrc-ratio", cfg.rrc_ratio, math.inf)):
        try:
            low, high = parse_range(text)
        except ValueError:
            raise UsageError(f"{flag} {text}: expected two numbers LOW,HIGH (fractions like 3/4 allowed)") from None
        if not 0 < low <= high <= upper:
            raise UsageError(f"{flag} {text}: need 0 < LOW <= HIGH{' <= 1' if upper == 1 else ''}")


def resolve(given: dict) -> TrainConfig:
    """Defaults, then the recipe's settings, then the flags given."""
    name = given.get("recipe", "")
    if name and name not in RECIPES:
        raise UsageError(f"--recipe {name!r} does not exist; recipes: {', '.join(RECIPES)}")
    recipe = RECIPES[name].settings | {"tuned_global_batch": RECIPES[name].global_batch} if name else {}
    return TrainConfig(**(recipe | given))


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """(validated config, whether --print-config asked only to see it)."""
    given = vars(build_parser().parse_args(argv))
    print_only = given.pop("print_config")
    cfg = resolve(given)
    return validate(cfg, paths=not print_only), print_only
