"""pyproject.toml stays honest: every runtime dependency is used by the package, the version lives once."""

import ast
import re
from pathlib import Path

import pytest

import resnet_dist

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Distribution name -> the module it provides, where the two differ.
MODULE = {"pillow": "PIL", "scikit-image": "skimage"}


def imported_modules(bench: bool) -> set[str]:
    """Top-level module names imported (at any depth, lazily too) by the benchmark, or by the rest of the
    package and launch/: the benchmark is an extra, so its imports do not justify a core dependency."""
    names = set()
    files = [*ROOT.joinpath("resnet_dist").rglob("*.py"), *ROOT.joinpath("launch").glob("*.py")]
    for path in [p for p in files if ("bench" in p.relative_to(ROOT).parts[1]) == bench]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


def test_every_runtime_dependency_is_imported_by_the_package():
    check_used(PROJECT["dependencies"], imported_modules(bench=False))
    check_used(PROJECT["optional-dependencies"]["bench"], imported_modules(bench=True))


def check_used(requirements: list[str], used: set[str]) -> None:
    for requirement in requirements:
        dist = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()
        if dist == "wandb":  # loaded by Accelerate's tracker, which the trainer asks for by name
            assert '"wandb"' in (ROOT / "resnet_dist" / "engine.py").read_text()
            continue
        assert MODULE.get(dist, dist) in used, f"{dist} is a runtime dependency that nothing imports"


def test_the_version_lives_in_one_place():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", resnet_dist.__version__)


def test_each_remote_scheme_has_an_extra_that_installs_its_backend():
    from resnet_dist.locations import FSSPEC_SCHEMES

    extras = PROJECT["optional-dependencies"]
    for scheme, (_, module, extra) in FSSPEC_SCHEMES.items():
        dists = [re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in extras[extra]]
        assert module.lower() in dists, (scheme, extra, dists)
        assert "resnet-dist[s3,gcs,azure,hf]" in extras["remote"] and extra in ("s3", "gcs", "azure", "hf")


def test_make_test_installs_the_export_extra():
    """`make test` installs .[dev]: the ONNX tests need the exporter's and onnxruntime's packages."""
    dists = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in PROJECT["optional-dependencies"]["export"]}
    assert dists == {"onnx", "onnxscript", "onnxruntime"}
    assert any(r.startswith("resnet-dist[") and "export" in r for r in PROJECT["optional-dependencies"]["dev"])
