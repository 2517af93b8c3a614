"""Hardware markers (declared in pyproject.toml) skip when the hardware is absent; `shared_dir`."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _tensorrt_available() -> bool:
    try:
        importlib.import_module("tensorrt")
    except Exception:  # a broken install (missing libnvinfer) raises OSError, not ImportError
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checks = {
        "gpu": (_cuda_available, "needs a CUDA GPU (torch.cuda.is_available() is False)"),
        "trt": (_tensorrt_available, "needs TensorRT (`import tensorrt` failed)"),
    }
    available: dict[str, bool] = {}
    for item in items:
        for marker, (check, reason) in checks.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in available:  # probe lazily: importing torch costs seconds
                available[marker] = check()
            if not available[marker]:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference folder (released checkpoints' descriptions, golden outputs)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared reference folder {SHARED} is absent")
    return SHARED
