"""Start from pretrained weights (--init-from) and fine-tune them (--freeze-backbone, --unfreeze-epoch).

A spec is a weights file (.safetensors, or .pth/.pt/.bin read with torch.load(weights_only=True)), a
checkpoint or run folder of this project, a URL storage can read, or `torchvision:ARCH.WEIGHTS`. The
state dict is in torchvision's ResNet naming, which timm's ResNets share (conv1, bn1, layer1.0.conv1, ...,
fc) and ours keep (models.py). What does not fit is adapted where that has one sensible meaning and
refused otherwise, in one line naming the fix.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import torch
from torch import nn

from resnet_dist.checkpoint import find_checkpoint, load_inference_weights
from resnet_dist.errors import DataError, UsageError
from resnet_dist.locations import check_location, scheme_of

TORCHVISION = "torchvision:"
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HEAD = ("fc.weight", "fc.bias")
# (blocks per stage, bottleneck?) -> torchvision's name: to say what a file that does not fit looks like.
KNOWN = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


# --- what --init-from names: checked in config.validate, before any process group ---------------------------


def check_spec(spec: str, model: str, stem: str = "imagenet", paths: bool = True) -> None:
    """UsageError naming --init-from when `spec` cannot be a source of weights for `model` (reads nothing)."""
    if model == "simple_cnn":
        raise UsageError("--init-from loads ResNet weights; --model simple_cnn has no pretrained form")
    if spec.startswith(TORCHVISION):
        torchvision_weights(spec, model)
        if stem != "imagenet":  # every torchvision ResNet has the 7x7 stem: say so before any work
            raise UsageError(f"--init-from {spec}: torchvision's ResNets have the 7x7 stem: add --stem imagenet")
        return
    if scheme_of(spec) not in (None, "file"):
        check_location(spec, "--init-from")
        if not spec.endswith(FILE_SUFFIXES):
            raise UsageError(f"--init-from {spec}: a URL must name a weights file ({', '.join(FILE_SUFFIXES)})")
        return
    check_location(spec, "--init-from")  # a local path, or one that only looks like a mistyped URL
    path = Path(spec.removeprefix("file://"))
    if not paths:
        return
    if path.is_file() and path.suffix not in FILE_SUFFIXES:
        raise UsageError(f"--init-from {spec}: unknown weights format (expected {', '.join(FILE_SUFFIXES)})")
    if not path.exists():
        raise UsageError(
            f"--init-from {spec}: no such file or folder (a weights file, a checkpoint or run folder, "
            f"or torchvision:ARCH.WEIGHTS)"
        )
    if path.is_dir():
        checkpoint_folder(path, spec)


def torchvision_weights(spec: str, model: str):
    """The torchvision Weights entry `torchvision:ARCH.NAME` names (no download: the enum is in the package)."""
    from torchvision.models import get_model_weights

    arch, _, name = spec.removeprefix(TORCHVISION).partition(".")
    if not arch or not name:
        raise UsageError(f"--init-from {spec}: expected torchvision:ARCH.WEIGHTS, e.g. torchvision:{model}.DEFAULT")
    if arch != model:
        raise UsageError(f"--init-from {spec}: weights of {arch}, but --model is {model}: use --model {arch}")
    try:
        return get_model_weights(arch)[name]
    except (KeyError, ValueError):
        names = ", ".join(["DEFAULT", *get_model_weights(arch).__members__])
        raise UsageError(f"--init-from {spec}: torchvision has no {arch} weights {name!r} (has {names})") from None


def checkpoint_folder(path: Path, spec: str) -> Path:
    """A checkpoint folder as given, or a run folder's checkpoints/best, else checkpoints/last (as evaluate)."""
    for candidate in (path, path / "checkpoints" / "best", path / "checkpoints" / "last"):
        found = find_checkpoint(candidate)
        if found is not None:
            return found
    raise UsageError(
        f"--init-from {spec}: a folder, but neither a checkpoint folder (meta.json + model.safetensors) nor a "
        f"run folder holding checkpoints/best or checkpoints/last"
    )


# --- reading ------------------------------------------------------------------------------------------------


def read_state_dict(spec: str, model: str) -> dict[str, torch.Tensor]:
    """The tensors `spec` holds, unwrapped and with DDP's / torch.compile's prefixes removed."""
    if spec.startswith(TORCHVISION):
        return clean(read_torchvision(spec, model), spec)
    if scheme_of(spec) not in (None, "file"):
        from resnet_dist.storage import read_bytes

        folder, _, name = spec.rpartition("/")
        return clean(decode(read_bytes(folder, name), name, spec), spec)
    path = Path(spec.removeprefix("file://"))
    if path.is_dir():
        # As evaluate, predict and export: a run trained with --ema is continued from its EMA weights.
        return clean(load_inference_weights(checkpoint_folder(path, spec))[0], spec)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"--init-from {spec}: cannot read ({exc.strerror or exc})") from None
    return clean(decode(data, path.name, spec), spec)


def read_torchvision(spec: str, model: str) -> dict:
    """torchvision's weights through torch.hub's cache ($TORCH_HOME/hub/checkpoints); a file placed there
    under the URL's file name is used as it is (load_state_dict_from_url checks no hash of a cached file)."""
    weights = torchvision_weights(spec, model)
    try:
        return weights.get_state_dict(progress=False, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError; a damaged file a RuntimeError
        cause = str(getattr(exc, "reason", exc)).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"--init-from {spec}: cannot download {weights.url} ({cause}); download it elsewhere and pass "
            f"the file: --init-from PATH (or put it in {torch.hub.get_dir()}/checkpoints/)"
        ) from None


def decode(data: bytes, name: str, spec: str):
    """Bytes of a .safetensors or a torch.save file, through the safe loaders only."""
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load

            return load(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and the weights_only unpickler raise their own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"--init-from {spec}: not a readable weights file ({first})") from None


def clean(obj, spec: str) -> dict[str, torch.Tensor]:
    """Unwrap {"state_dict": ...} / {"model": ...} (never another entry, such as "model_ema": which one is
    meant is not ours to guess) and strip the "module." of DDP saves and the "_orig_mod." of compiled ones."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(list(obj)[:5]) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"--init-from {spec}: not a state dict of tensors (holds {keys})")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items()}


# --- fitting the file to the model -----------------------------------------------------------------------------


def looks_like(sd: dict[str, torch.Tensor]) -> str:
    """What ResNet a state dict holds: 'resnet50 (width 64, imagenet stem)'."""
    blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    name = KNOWN.get((blocks, "layer1.0.conv3.weight" in sd), f"a ResNet with {'-'.join(map(str, blocks))} blocks")
    conv1 = sd["conv1.weight"]
    stem = "imagenet" if conv1.shape[-1] == 7 else "cifar" if conv1.shape[-1] == 3 else f"{conv1.shape[-1]}x"
    return f"{name} (width {conv1.shape[0]}, {stem} stem, {conv1.shape[1]} input channels)"


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """conv1 for another number of input channels, as timm's adapt_input_conv: summed over the file's
    channels for 1-channel data (a grey image gives what the RGB image of equal channels gave); else the
    file's channels repeated and scaled by old/new, which keeps the activations' scale."""
    old = weight.shape[1]
    if in_channels == old:
        return weight
    w = weight.float()
    if in_channels == 1:
        return w.sum(dim=1, keepdim=True).to(weight.dtype)
    w = w.repeat(1, math.ceil(in_channels / old), 1, 1)[:, :in_channels] * (old / in_channels)
    return w.to(weight.dtype)


def check_fits(sd: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], spec: str, stem: str) -> None:
    """One UsageError naming the first tensor that does not fit, the file's model and the fix."""
    if "conv1.weight" not in sd or not any(k.startswith("layer1.") for k in sd):
        raise DataError(f"--init-from {spec}: not a ResNet state dict (no conv1/layer1; first keys {list(sd)[:3]})")
    theirs, mine = sd["conv1.weight"].shape[-1], ours["conv1.weight"].shape[-1]
    if theirs != mine:
        want = "imagenet" if theirs == 7 else "cifar"
        raise UsageError(
            f"--init-from {spec}: the file's conv1 is {theirs}x{theirs} ({looks_like(sd)}), this run's --stem "
            f"{stem} has a {mine}x{mine} conv1: add --stem {want}"
        )
    for key in sorted(set(ours) | set(sd), key=lambda k: list(ours).index(k) if k in ours else len(ours)):
        if key in HEAD or key == "conv1.weight":
            continue
        a, b = tuple(sd[key].shape) if key in sd else None, tuple(ours[key].shape) if key in ours else None
        if a != b:
            what = f"the file's {a}, this model's {b}"
            what = "missing from the file" if a is None else "not in this model" if b is None else what
            raise UsageError(
                f"--init-from {spec}: {key} does not fit ({what}); the file looks like {looks_like(sd)}: "
                f"match its --model and --width"
            )
    if sd["conv1.weight"].shape[0] != ours["conv1.weight"].shape[0]:  # width: conv1's own shape otherwise unchecked
        raise UsageError(f"--init-from {spec}: conv1.weight width differs; the file looks like {looks_like(sd)}")


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], spec: str, stem: str) -> str:
    """Copy the file's tensors into `model`, adapting conv1 and the classifier; return the one-line report."""
    ours = model.state_dict()
    check_fits(sd, ours, spec, stem)
    merged, notes = dict(sd), []
    conv1, channels = sd["conv1.weight"], ours["conv1.weight"].shape[1]
    if conv1.shape[1] != channels:
        merged["conv1.weight"] = adapt_input_conv(conv1, channels)
        how = "summed over" if channels == 1 else "repeated and rescaled from"
        notes.append(f"conv1 {how} its {conv1.shape[1]} input channels for {channels}-channel data")
    if any(k not in sd or sd[k].shape != ours[k].shape for k in HEAD):
        for k in HEAD:
            merged[k] = ours[k]  # our init (models.py), drawn from the run's seed
        was = f"{sd['fc.weight'].shape[0]} -> " if "fc.weight" in sd else "none in the file -> "
        notes.insert(0, f"fc replaced ({was}{ours['fc.weight'].shape[0]} classes, new init)")
    model.load_state_dict({k: merged[k] for k in ours}, strict=True)
    loaded = sum(1 for k in ours if merged[k] is not ours[k])
    return "; ".join([f"init from {spec}: {loaded} tensors loaded", *notes])


def init_from(model: nn.Module, spec: str, model_name: str, stem: str) -> str:
    """Load `spec` into a freshly built `model`: the report line."""
    return load_into(model, read_state_dict(spec, model_name), spec, stem)


# --- fine-tuning: a frozen backbone ------------------------------------------------------------------------------


def head_names(model: nn.Module) -> set[str]:
    """Parameter names of the classifier: the last Linear (fc of a ResNet, the classifier of simple_cnn)."""
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return {f"{last}.{n}" for n, _ in model.get_submodule(last).named_parameters()}


def backbone_frozen(cfg, epoch: int) -> bool:
    """--freeze-backbone: for the whole run, or (--unfreeze-epoch K) for epochs 1..K."""
    return cfg.freeze_backbone and (cfg.unfreeze_epoch == 0 or epoch < cfg.unfreeze_epoch)


def set_backbone_trainable(model: nn.Module, trainable: bool) -> bool:
    """requires_grad of every parameter but the head's; True when that changed anything."""
    head, changed = head_names(model), False
    for name, p in model.named_parameters():
        if name not in head and p.requires_grad != trainable:
            p.requires_grad_(trainable)
            changed = True
    return changed


def backbone_eval(model: nn.Module) -> None:
    """Put the frozen backbone's BatchNorm layers in eval mode (after model.train()): they normalise with the
    pretrained running statistics and do not update them, so the backbone computes what it computed before."""
    head_modules = {n.rpartition(".")[0] for n in head_names(model)}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in head_modules:
            m.eval()
