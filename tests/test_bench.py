"""python -m resnet_dist.bench: every suite runs on tiny data and writes well-formed JSON.

No timing assertions: machines are noisy and the numbers belong in docs/performance.md. Tiny models,
a few batches, one repeat, so the whole module stays well under two minutes on 2 shared cores.
"""

import ast
import json
import subprocess
import sys

import pytest
from helpers import ROOT, run_env

ROW_KEYS = {"suite", "case", "ours", "baseline", "baseline_name", "ratio", "unit"}
TINY = ["--repeats", "1", "--warmup", "1", "--batches", "2"]
TINY_MODEL = ["--width", "8", "--step-batch", "16"]


def bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnet_dist.bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=run_env(),
    )


def report(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    result = bench(*args, "--json", str(out))
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert not list(tmp_path.glob(".bench.json.*")), "the temporary file of the atomic write was left behind"
    return json.loads(out.read_text())


def check_report(data: dict, suite: str) -> list[dict]:
    machine = data["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch"]
    assert len(machine["load_start"]) == 3 and len(machine["load_end"]) == 3
    rows = data["rows"]
    assert rows and all(r["suite"] == suite for r in rows)
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["ours"] > 0 and r["baseline"] > 0, r
        assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"]), r
        assert r["unit"] == "img/s" and r["baseline_name"] and r["case"]
    return rows


def test_loader_suite_covers_every_pipeline_kind_and_worker_count(tmp_path):
    data = report(
        tmp_path,
        "loader",
        "--kinds",
        "gray28,jpeg64",
        "--samples",
        "200",
        "--batch-size",
        "16",
        "--workers",
        "0,1",
        *TINY,
    )
    rows = check_report(data, "loader")
    cases = {(r["case"], r["baseline_name"].split(":")[0].split(" ")[0]) for r in rows}
    for kind in ("gray28", "jpeg64"):
        for workers in ("0 workers", "1 worker"):
            assert {(f"{kind} {workers}", b) for b in ("ImageFolder", "WebDataset", "ceiling")} <= cases
        assert (f"{kind} per core", "ImageFolder") in cases


def test_loader_suite_names_a_given_data_folder_by_its_kind(tmp_path, synthetic_shards):
    data = report(tmp_path, "loader", "--data", str(synthetic_shards), "--batch-size", "16", "--workers", "1", *TINY)
    rows = check_report(data, "loader")
    assert {r["case"] for r in rows} == {"rgb16x16-png 1 worker", "rgb16x16-png per core"}


def test_step_suite_compares_with_the_notebook_loop(tmp_path):
    rows = check_report(report(tmp_path, "step", *TINY_MODEL, "--step-size", "16", *TINY), "step")
    assert rows[0]["case"] == "overhead, fp32 NCHW" and "plain PyTorch" in rows[0]["baseline_name"]


def test_e2e_suite_reports_the_data_wait(tmp_path, synthetic_shards):
    rows = check_report(
        report(tmp_path, "e2e", "--data", str(synthetic_shards), *TINY_MODEL, "--e2e-workers", "1", *TINY), "e2e"
    )
    assert len(rows) == 1 and 0 <= rows[0]["extra"]["data_wait"] <= 1


def test_augment_suite_times_each_augmentation_against_the_decode_alone(tmp_path, synthetic_shards):
    rows = check_report(report(tmp_path, "augment", "--data", str(synthetic_shards), *TINY), "augment")
    assert [r["case"] for r in rows][:2] == ["rgb16x16-png decode+trivialaugment", "rgb16x16-png decode+randaugment"]
    assert rows[2]["case"] == "rgb16x16-png device batch 128 + mixup/cutmix"
    assert all(r["baseline_name"] == "decode alone" and r["extra"]["decode_us"] > 0 for r in rows[:2])


def test_scaling_suite_launches_two_processes(tmp_path):
    rows = check_report(report(tmp_path, "scaling", *TINY_MODEL, "--step-size", "16", *TINY), "scaling")
    extra = rows[0]["extra"]
    assert extra["world_size"] == 2 and extra["allreduce_ms"] > 0 and extra["gradient_mb"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "invalid choice"),
        (["loader", "--workers", "one"], "--workers"),
        (["loader", "--kinds", "gray99"], "unknown kind"),
        (["loader", "--repeats", "0"], "--repeats"),
        (["step", "--model", "vgg"], "--model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = bench(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_missing_data_folder_is_one_line(tmp_path):
    result = bench("loader", "--data", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "index.json" in result.stderr


def bench_imports(source: str, name: str) -> list[str]:
    """The imports in a module's source that reach the bench, however they are spelt."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [f"{name}:{node.lineno}: {module}" for module in names if is_bench(module)]
    return found


def is_bench(module: str) -> bool:
    return module == "resnet_dist.bench" or module.startswith("resnet_dist.bench.")


@pytest.mark.parametrize(
    "source",
    ["import resnet_dist.bench.cli", "from resnet_dist import bench", "from resnet_dist.bench.common import x"],
)
def test_the_leaf_check_sees_every_spelling_of_a_bench_import(source):
    found = bench_imports(f"import os\n\n\ndef later():\n    {source}\n", "probe.py")
    assert found and all(f.startswith("probe.py:5: resnet_dist.bench") for f in found), found


def test_the_bench_is_a_leaf_nothing_in_the_package_or_launch_imports_it():
    bench = ROOT / "resnet_dist" / "bench"
    package = [p for p in (ROOT / "resnet_dist").rglob("*.py") if bench not in p.parents]
    modules = package + sorted((ROOT / "launch").rglob("*.py"))
    assert len(package) >= 10 and ROOT / "launch" / "time_to_accuracy.py" in modules  # the scan sees the code
    imports = [i for p in modules for i in bench_imports(p.read_text(), str(p.relative_to(ROOT)))]
    assert imports == [], "the bench is a leaf: import what it shares from the package instead"


def test_loader_suite_times_the_photo224_case_against_torchvisions_reference(tmp_path):
    """Real photographs of varying size: train and eval rows, per core and through the DataLoader."""
    args = ["--kinds", "photo224", "--samples", "64", "--batch-size", "8", "--workers", "1", *TINY]
    rows = check_report(report(tmp_path, "loader", *args), "loader")
    cases = {(r["case"], r["baseline_name"].split(":")[0].split(" ")[0]) for r in rows}
    for where in ("per core", "1 worker"):
        assert {(f"photo224 {where}, train", "torchvision"), (f"photo224 {where}, train", "WebDataset")} <= cases
        assert (f"photo224 {where}, eval", "torchvision") in cases


def test_step_suite_shows_the_batch_augmentation_thread_setting(tmp_path):
    rows = check_report(report(tmp_path, "step", *TINY_MODEL, "--step-size", "16", *TINY), "step")
    threads = [r for r in rows if r["case"].startswith("batch augmentation on the CPU")]
    assert len(threads) == 1 and "default" in threads[0]["baseline_name"]
    assert set(threads[0]["extra"]["ms_per_batch"]) == {"one", "default"}
