"""predict and export on a real model trained on real Fashion-MNIST: predict on PNG files agrees with
evaluate on the shards holding the same images, the exported files agree with PyTorch and run without
this package, and the EMA weights are used when a checkpoint has them."""

import csv
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TRAIN, fashion_subset, ok, read_json, run_env
from PIL import Image
from safetensors.torch import load_file, save_file

from resnet_dist.augment import BatchAugment
from resnet_dist.checkpoint import load_inference_weights
from resnet_dist.data import ShardStream
from resnet_dist.errors import run_cli
from resnet_dist.evaluate import load_model
from resnet_dist.evaluate import main as evaluate_main
from resnet_dist.export import main as export_main
from resnet_dist.inference import input_spec, load_for_inference, prepare, read_meta
from resnet_dist.storage import read_index

pytestmark = pytest.mark.slow
N_TEST = 240  # real test images written as PNG files
TINY = ["--width", "8", "--batch-size", "32", "--lr", "0.05", "--epochs", "5", "--num-workers", "0"]
CROP = ["--train-crop", "center", "--res", "24"]  # evaluation: shorter side to 27, centre 24x24


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    """Real Fashion-MNIST shards (240 test images), a tiny run trained on them, and the test images as PNGs."""
    base = tmp_path_factory.mktemp("ship")
    data, run = fashion_subset(base / "fm", N_TEST), base / "run"
    train = [sys.executable, str(TRAIN), "--data", str(data), "--out", str(run), *TINY, *CROP]
    env = run_env(OMP_NUM_THREADS="1")
    ok(subprocess.run([*train, "--wandb-mode", "disabled"], capture_output=True, text=True, timeout=300, env=env))
    images, labels = base / "images", {}
    for info in read_json(data / "index.json")["splits"]["test"]["shards"]:
        with tarfile.open(data / info["file"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, blob in members.items():
            if name.endswith(".png"):  # the shard's own PNG bytes: the images evaluate reads
                key = name[: -len(".png")]
                folder = images / ("b" if int(key[-1]) % 2 else "a") / key[-1]  # nested: a recursive walk
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{key}.PNG").write_bytes(blob)  # upper case: the suffix match ignores case
                labels[f"{key}.PNG"] = int(members[f"{key}.cls"])
    assert len(labels) == N_TEST
    return {"data": data, "run": run, "images": images, "labels": labels}


def predict(*args, code=0):
    result = subprocess.run(
        [sys.executable, "-m", "resnet_dist.predict", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=run_env(OMP_NUM_THREADS="1"),
    )
    assert result.returncode == code, result.stderr
    return result


def confusion_of(predictions: list[dict], labels: dict, classes: list[str]) -> np.ndarray:
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for row in predictions:
        confusion[labels[Path(row["file"]).name], classes.index(row["top"][0]["class"])] += 1
    return confusion


def shard_probabilities(checkpoint: Path, data: Path, weights=None) -> dict[str, np.ndarray]:
    """{file name: softmax} from evaluate's own loader and model (not predict's code), in one batch."""
    index, meta = read_index(str(data)), read_meta(checkpoint)
    model = load_model(checkpoint, meta, index, str(data), weights).eval()
    from resnet_dist.crops import eval_crop_spec
    from resnet_dist.inference import config_of

    crop = eval_crop_spec(config_of(meta), index.image_size)
    stream = ShardStream(str(data), index, "test", batch_size=N_TEST, rank=0, world_size=1, train=False, crop=crop)
    [(images, labels, lost, _, _)] = list(stream)
    assert lost == 0
    with torch.no_grad():
        probs = model(BatchAugment(meta["mean"], meta["std"], torch.device("cpu")).eval(images)).softmax(1).numpy()
    return {f"test_{i:08d}.PNG": p for i, p in enumerate(probs)}


def test_predict_equals_evaluate(fm, tmp_path):
    """Predict's classes (confusion matrix, top-1) are evaluate's on the test split holding the same images,
    and its probabilities those of evaluate's pipeline; a damaged file is warned about, counted, skipped."""
    broken = fm["images"] / "a" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (fm["images"] / "notes.txt").write_text("not an image, not looked at")
    try:
        result = predict("--checkpoint", fm["run"], fm["images"], "--json", "--top-k", "10", "--batch-size", "50")
    finally:
        broken.unlink()
    out = json.loads(result.stdout)
    assert out["weights"] == "raw" and "raw weights" in result.stderr
    assert [r["file"] for r in out["predictions"]] == sorted(str(p) for p in fm["images"].rglob("*.PNG"))
    assert result.stderr.count("warning:") == 1 and f"warning: {broken}" in result.stderr
    assert result.stderr.strip().endswith(f"{N_TEST} image(s) predicted, 1 unreadable")
    assert len(out["unreadable"]) == 1

    assert evaluate_main(["--checkpoint", str(fm["run"]), "--data", str(fm["data"]), "--num-workers", "0"]) == 0
    ev = read_json(fm["run"] / "eval-test" / "eval.json")
    assert ev["count"] == N_TEST and ev["weights"] == "raw"
    confusion = confusion_of(out["predictions"], fm["labels"], ev["classes"])
    assert confusion.tolist() == ev["confusion"]
    assert np.trace(confusion) / N_TEST == pytest.approx(ev["top1"], abs=1e-12)
    assert 0.3 < ev["top1"] < 1  # a model that learnt something: the matrix is not one column

    reference = shard_probabilities(fm["run"] / "checkpoints" / "best", fm["data"])
    for row in out["predictions"]:
        probs = [p["probability"] for p in row["top"]]
        assert probs == sorted(probs, reverse=True)
        ref = reference[Path(row["file"]).name]
        got = np.array([ref[ev["classes"].index(p["class"])] for p in row["top"]])
        np.testing.assert_allclose(probs, got, rtol=0, atol=1e-5)


def test_csv_and_text_output(fm):
    files = sorted(fm["images"].rglob("*.PNG"))[:5]
    result = predict("--checkpoint", fm["run"], *files, "--csv", "--top-k", "3")
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["file", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3"]
    assert [r[0] for r in rows[1:]] == [str(f) for f in files]
    meta = read_meta(fm["run"] / "checkpoints" / "best")
    for row in rows[1:]:
        assert all(c in meta["classes"] for c in row[1::2]) and 0 < sum(map(float, row[2::2])) <= 1.0 + 1e-6
    text = predict("--checkpoint", fm["run"], *files, fm["images"] / "missing.png", "--top-k", "2").stdout
    lines = text.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith(f"{f}: ") and line.count(",") == 1 for line, f in zip(lines, files))
    nothing = predict("--checkpoint", fm["run"], fm["images"] / "missing.png", code=1).stderr
    assert nothing.count("warning:") == 1 and nothing.strip().splitlines()[-1].startswith("error: none of the 1 file")


def test_big_rgb_jpeg_into_gray_run(fm, tmp_path):
    """A 300x200 colour JPEG into the 1-channel, 24-px run: converted to L, resized and cropped as evaluate
    would, and the probabilities agree with torchvision's Resize + CenterCrop on PIL's grayscale image."""
    from torchvision.transforms import v2

    source = Image.open(next(fm["images"].rglob("*.PNG"))).convert("RGB").resize((300, 200))
    tint = np.asarray(source, dtype=np.float32) * np.array([1.0, 0.8, 0.5])
    photo = tmp_path / "photo.jpg"
    Image.fromarray(tint.astype(np.uint8)).save(photo, quality=95)
    out = json.loads(predict("--checkpoint", fm["run"], photo, "--json", "--top-k", "10").stdout)
    [row] = out["predictions"]
    checkpoint = fm["run"] / "checkpoints" / "best"
    meta = read_meta(checkpoint)
    model, _ = load_for_inference(checkpoint, meta)
    gray = Image.open(photo).convert("L")
    x = v2.Compose([v2.PILToTensor(), v2.Resize(27, antialias=True), v2.CenterCrop(24)])(gray).float() / 255
    with torch.no_grad():
        ref = model(((x - meta["mean"][0]) / meta["std"][0])[None]).softmax(1)[0]
    for p in row["top"]:
        assert p["probability"] == pytest.approx(ref[meta["classes"].index(p["class"])].item(), abs=0.02)


def edited_checkpoint(fm, tmp_path, name: str, **meta_changes) -> Path:
    folder = tmp_path / name
    shutil.copytree(fm["run"] / "checkpoints" / "best", folder)
    meta = read_meta(folder)
    for key, value in meta_changes.items():
        if key in meta["config"]:
            meta["config"][key] = value
        elif value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_pad_run_and_old_checkpoint(fm, tmp_path):
    """A --train-crop pad checkpoint (the network takes any size): 28x28 files as they are, equal to
    evaluate; another size resized and centre-cropped. A checkpoint from before meta.json held the image
    size: one line asking for --res; with it, the channels come from conv1."""
    pad = edited_checkpoint(fm, tmp_path, "pad", train_crop="pad", res=0)
    out = json.loads(predict("--checkpoint", pad, fm["images"], "--json").stdout)
    evaluated = tmp_path / "ev"
    args = ["--checkpoint", str(pad), "--data", str(fm["data"]), "--num-workers", "0", "--out", str(evaluated)]
    assert evaluate_main(args) == 0
    ev = read_json(evaluated / "eval.json")
    assert confusion_of(out["predictions"], fm["labels"], ev["classes"]).tolist() == ev["confusion"]

    spec = input_spec(read_meta(pad), load_for_inference(pad, read_meta(pad))[0])
    assert spec.crop is None and spec.size == (28, 28)
    png = io.BytesIO()
    Image.new("RGB", (56, 40), (200, 10, 10)).save(png, format="PNG")
    assert prepare(png.getvalue(), spec, "x").shape == (28, 28, 1)

    old = edited_checkpoint(fm, tmp_path, "old", train_crop="pad", res=0, image_size=None, channels=None)
    result = predict("--checkpoint", old, fm["images"], code=2)
    assert result.stderr.count("\n") == 1 and "pass --res" in result.stderr
    again = json.loads(predict("--checkpoint", old, fm["images"], "--json", "--res", "28").stdout)
    assert again["predictions"] == out["predictions"]


def in_process(main, *args) -> tuple[int, str]:
    err = io.StringIO()
    from contextlib import redirect_stderr

    with redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        run_cli(main, [str(a) for a in args])
    return exit_.value.code, err.getvalue()


def test_ema_weights_are_used_and_said(fm, tmp_path):
    """ema.safetensors beside model.safetensors wins unless --weights raw. Here the EMA file is the raw
    weights with the classifier's rows rolled by one class, so every prediction moves to the next class."""
    folder = edited_checkpoint(fm, tmp_path, "ema")
    raw = load_file(str(folder / "model.safetensors"))
    head = [k for k, v in raw.items() if v.ndim == 2][-1].rsplit(".", 1)[0]  # the final Linear
    ema = dict(raw)
    for part in ("weight", "bias"):
        ema[f"{head}.{part}"] = raw[f"{head}.{part}"].roll(1, dims=0).contiguous()
    save_file(ema, str(folder / "ema.safetensors"))
    assert load_inference_weights(folder)[1] == "ema" and load_inference_weights(folder, "raw")[1] == "raw"

    args = ["--checkpoint", str(folder), "--data", str(fm["data"]), "--num-workers", "0"]
    assert evaluate_main([*args, "--out", str(tmp_path / "e")]) == 0
    assert evaluate_main([*args, "--out", str(tmp_path / "r"), "--weights", "raw"]) == 0
    e, r = read_json(tmp_path / "e" / "eval.json"), read_json(tmp_path / "r" / "eval.json")
    assert (e["weights"], r["weights"]) == ("ema", "raw")
    assert np.roll(np.asarray(r["confusion"]), 1, axis=1).tolist() == e["confusion"]

    result = predict("--checkpoint", folder, fm["images"], "--json")
    out = json.loads(result.stdout)
    assert out["weights"] == "ema" and "EMA weights" in result.stderr
    assert confusion_of(out["predictions"], fm["labels"], e["classes"]).tolist() == e["confusion"]

    code, err = in_process(evaluate_main, "--checkpoint", fm["run"], "--data", fm["data"], "--weights", "ema")
    assert code == 2 and err.count("\n") == 1 and "no ema.safetensors" in err


# --- export ---------------------------------------------------------------------------------------

ISOLATED = """
import sys
sys.modules["resnet_dist"] = None  # the exported file must not need this package
import numpy as np
x = np.load(sys.argv[2])
if sys.argv[1].endswith(".onnx"):
    import onnxruntime
    session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"], session.get_inputs()
    out = session.run(None, {"images": x})[0]
else:
    import torch
    out = torch.jit.load(sys.argv[1])(torch.from_numpy(x)).detach().numpy()
np.save(sys.argv[3], out)
assert "resnet_dist" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
"""


def run_isolated(model_file: Path, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    """The file run by a plain interpreter (-I: no PYTHONPATH, no user site) in another folder."""
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "run_model.py"
    script.write_text(ISOLATED)
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(model_file), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    return np.load(tmp_path / "y.npy")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(fm, tmp_path, fmt):
    """Real test images, prepared as predict prepares them, as [0, 1] floats: the file's logits equal the
    PyTorch model's on evaluate's normalisation within 1e-4, at batch 1 and 7."""
    out = tmp_path / "export" / ("fm.onnx" if fmt == "onnx" else "fm.pt")
    out.parent.mkdir()
    assert export_main(["--checkpoint", str(fm["run"]), "--format", fmt, "--out", str(out)]) == 0
    checkpoint = fm["run"] / "checkpoints" / "best"
    meta = read_meta(checkpoint)
    model, _ = load_for_inference(checkpoint, meta)
    spec = input_spec(meta, model)
    files = sorted(fm["images"].rglob("*.PNG"))[:7]
    images = np.stack([prepare(f.read_bytes(), spec, str(f)) for f in files])  # uint8 N x H x W x C
    augment = BatchAugment(meta["mean"], meta["std"], torch.device("cpu"))
    with torch.no_grad():
        reference = model(augment.eval(torch.from_numpy(images))).numpy()
    x = (images.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    for n in (1, 7):
        got = run_isolated(out, x[:n], tmp_path)
        assert got.shape == (n, 10)
        assert np.abs(got - reference[:n]).max() <= 1e-4
    card = (out.parent / "MODEL_CARD.md").read_text()
    summary = read_json(fm["run"] / "summary.json")
    for words in (
        f"Test top-1 {summary['test_top1']:.2%}",
        "raw weights",
        "float32, shape (N, 1, 24, 24)",
        "Splits: train 240, test 240",
        "9. Ankle boot",
        "Intended use",
    ):
        assert words in card, words
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_export_bad_input(fm, tmp_path):
    checkpoint = fm["run"]
    (tmp_path / "a-file").write_text("")
    for args, words in (
        (["--format", "tflite", "--out", tmp_path / "m"], "invalid choice: 'tflite'"),
        (["--format", "onnx", "--out", tmp_path / "a-file" / "m.onnx"], "cannot create the folder"),
        (["--format", "onnx", "--out", tmp_path], "is a folder"),
        (["--format", "onnx", "--out", tmp_path / "m.onnx", "--weights", "ema"], "no ema.safetensors"),
    ):
        code, err = in_process(export_main, "--checkpoint", checkpoint, *args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert not (tmp_path / "m.onnx").exists()
    # A folder that does not exist yet is made, as the README's `--out models/fm.onnx` needs.
    code, _ = in_process(
        export_main, "--checkpoint", checkpoint, "--format", "torchscript", "--out", tmp_path / "new" / "m.pt"
    )
    assert code == 0 and (tmp_path / "new" / "m.pt").is_file() and (tmp_path / "new" / "MODEL_CARD.md").is_file()
