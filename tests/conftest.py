"""Fixtures only; the helpers every test file shares live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import shard


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """A small 10-class, 16x16 RGB dataset with a learnable signal, in several uneven shards."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    result = shard(
        "synthetic",
        "--out",
        str(out),
        "--num-classes",
        "4",
        "--image-size",
        "16",
        "--num-samples",
        "600",
        "--channels",
        "3",
        "--shard-size",
        "70",
        "--val-fraction",
        "0.1",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr
    return out
