"""Shared test fixtures: paths to the real models, and skips with reasons when they are absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = (REPO / ".." / "shared" / "models" / "real").resolve()


def real_model(name: str) -> Path:
    """Path of a real model from ../shared/models/real, or skip the test saying why."""
    path = REAL / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the real models live in ../shared/models/real beside the clone)")
    return path


@pytest.fixture
def mnist_path() -> Path:
    return real_model("mnist.onnx")


@pytest.fixture
def ultraface_path() -> Path:
    return real_model("ultraface-rfb-320.onnx")


@pytest.fixture
def images_dir() -> Path:
    return real_model("images")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly where the CUDA execution provider is absent (CI has no GPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return
    skip = pytest.mark.skip(reason="CUDAExecutionProvider is not available in this onnxruntime build")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
