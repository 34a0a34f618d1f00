"""MODEL_CARD.md for an exported model: what it was trained on, how, how well, and how to feed it.

Everything in it is read from the checkpoint (meta.json), the run folder (summary.json, eval-*/eval.json)
and the dataset's index.json when the run's --data is a local folder that still holds it.
"""

from __future__ import annotations

import json
from pathlib import Path

from resnet_dist.config import TrainConfig
from resnet_dist.errors import DataError
from resnet_dist.index import load_index
from resnet_dist.inference import WEIGHT_NAMES, InputSpec, config_of

CONFIG_KEYS = (
    "recipe",
    "model",
    "stem",
    "width",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "schedule",
    "label_smoothing",
    "train_crop",
    "res",
    "eval_res",
    "tta",
    "seed",
)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def data_lines(cfg: TrainConfig) -> list[str]:
    lines = [f"- Shards: `{cfg.data}`"]
    try:
        index = load_index(Path(cfg.data))
    except (DataError, OSError):
        return [*lines, "- index.json: not readable from here (remote or moved), so no split counts"]
    counts = ", ".join(f"{name} {split.num_samples:,}" for name, split in index.splits.items())
    size = "various sizes" if index.image_size is None else f"{index.image_size[1]}x{index.image_size[0]}"
    return [
        *lines,
        f"- Source: {index.source} ({index.format}, {size}, {index.channels} channel(s))",
        f"- Splits: {counts}",
    ]


def accuracy_lines(run_dir: Path, kind: str) -> list[str]:
    lines = []
    summary = _json(run_dir / "summary.json")
    if isinstance(summary.get("test_top1"), (int, float)):
        lines.append(
            f"- Test top-1 {summary['test_top1']:.2%} (summary.json: the trainer's own test evaluation at the end "
            f"of the run)"
        )
    for path in sorted(run_dir.glob("eval-*/eval.json")):
        ev = _json(path)
        if isinstance(ev.get("top1"), (int, float)):
            weights = WEIGHT_NAMES.get(ev.get("weights", "raw"), "raw weights")
            tta = ", flip TTA" if ev.get("tta") == "flip" else ""
            lines.append(
                f"- {ev.get('split')} top-1 {ev['top1']:.2%} on {ev.get('count', 0):,} images "
                f"({weights}{tta}; `{path.relative_to(run_dir)}`)"
            )
    if not lines:
        lines.append("- No test result in the run folder (no summary.json test_top1 or eval-*/eval.json).")
    return [*lines, f"- The exported file holds the {WEIGHT_NAMES[kind]}."]


def input_lines(spec: InputSpec, fmt: str, filename: str) -> list[str]:
    h, w = spec.size
    run = (
        f'session = onnxruntime.InferenceSession("{filename}")\n'
        'logits = session.run(None, {"images": x})[0]  # x: numpy float32'
        if fmt == "onnx"
        else f'model = torch.jit.load("{filename}")\nlogits = model(x)  # x: torch float32'
    )
    return [
        f"- Input `images`: float32, shape (N, {spec.channels}, {h}, {w}), NCHW, pixel values / 255 in [0, 1] "
        "(what torchvision's `ToTensor` gives); any batch size N.",
        f"- Channels: {'grayscale (PIL mode L)' if spec.channels == 1 else 'RGB'}.",
        f"- Resize/crop before the file, as evaluation did: {spec.describe()}.",
        f"- Normalisation is inside the file: (x - mean) / std with mean {list(spec.mean)}, std {list(spec.std)}; "
        "do not normalise again.",
        "- Output `logits`: float32 (N, classes); softmax gives probabilities, in the class order below.",
        "",
        "```python",
        run,
        "```",
    ]


def model_card(checkpoint: Path, run_dir: Path, meta: dict, spec: InputSpec, kind: str, fmt: str, filename: str) -> str:
    cfg = config_of(meta)
    recipe = [f"- `{k}`: {getattr(cfg, k)!r}" for k in CONFIG_KEYS if hasattr(cfg, k)]
    classes = [f"{i}. {name}" for i, name in enumerate(meta["classes"])]
    sections = [
        f"# Model card: {filename}",
        "",
        f"A {cfg.model} image classifier trained with resnet-dist, exported to {fmt} from `{checkpoint}` "
        f"(epoch {meta.get('epoch')}, optimizer step {meta.get('global_step')}), {WEIGHT_NAMES[kind]}.",
        "",
        "## Data",
        *data_lines(cfg),
        "",
        "## Recipe",
        *recipe,
        "- The whole configuration: `meta.json` of the checkpoint (`config`).",
        "",
        "## Accuracy",
        *accuracy_lines(run_dir, kind),
        "",
        "## Classes",
        *classes,
        "",
        "## Preprocessing (the input contract)",
        *input_lines(spec, fmt, filename),
        "",
        "## Intended use and limits",
        f"- Classifying images like the training data ({len(classes)} classes above) at the resolution above.",
        "- Every input gets one of these classes: there is no 'none of these'; out-of-distribution images "
        "(other content, colours, framing) get confident but meaningless answers.",
        "- Accuracy was measured on the test split above only; it says nothing about other data.",
        "",
    ]
    return "\n".join(sections)
