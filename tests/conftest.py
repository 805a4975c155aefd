"""Shared fixtures: a small embedded benchmark generated once per test session."""

from pathlib import Path

import pytest

from fsseg.data.embedded import generate_embedded_benchmark


@pytest.fixture(scope="session")
def small_embedded(tmp_path_factory) -> Path:
    """A 64 px embedded benchmark in the PASCAL-5i layout (80 train / 40 val images)."""
    return generate_embedded_benchmark(
        tmp_path_factory.mktemp("data") / "embedded", seed=0, image_size=64, n_train=80, n_val=40
    )
