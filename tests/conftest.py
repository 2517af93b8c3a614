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


def _triton_available() -> bool:
    """The serving venv with nvidia-pytriton's bundled tritonserver (examples/install_triton.sh)."""
    root = Path(__file__).resolve().parents[1]
    venv = root / ".venv-triton"
    return (venv / "bin" / "python").is_file() and any(
        venv.glob("lib/python3.*/site-packages/pytriton/tritonserver/bin/tritonserver")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checks = {
        "gpu": (_cuda_available, "needs a CUDA GPU (torch.cuda.is_available() is False)"),
        "trt": (_tensorrt_available, "needs TensorRT (`import tensorrt` failed)"),
        "triton": (_triton_available, "needs .venv-triton: run `bash examples/install_triton.sh`"),
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


# -- the shared tiny build (tests/builds.py) --------------------------------------------------


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete build (UNet, classifier, upsampler; batch 1..16), exported once per session.
    Read-only by convention: tests that change a build use `build_copy`."""
    from tests.builds import make_build

    out = tmp_path_factory.mktemp("session-build") / "build"
    make_build(out)
    return out


@pytest.fixture
def build_copy(build_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session build, free to change."""
    from tests.builds import copy_build

    return copy_build(build_dir, tmp_path / "build")


@pytest.fixture(scope="session")
def unet_only_build(build_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session build's UNet alone, with its manifest (no classifier, no upsampler)."""
    from tests.builds import subset_build

    return subset_build(build_dir, tmp_path_factory.mktemp("unet-only") / "build", ("unet",))


@pytest.fixture(scope="session")
def reference_models() -> dict:
    """component -> the PyTorch network it was exported from (rebuilt from spec and seed)."""
    from tests.builds import reference_model

    return {c: reference_model(c) for c in ("unet", "classifier", "upsampler")}


# OpenMP threads that spin while they wait make torch's CPU kernels 10-40x slower whenever another
# process holds a core (a busy laptop, a shared CI runner); .ci/ sets the same. Set before any test
# module imports torch, so libgomp reads it when it loads; an explicit setting wins.
import os  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# `int8_build`: `gdexport build --int8` on a fresh copy of the session build, which records its
# own calibration set first (2 trajectories, "ddim4").
INT8_ARGS = ("--calib-samples", "2", "--calib-steps", "ddim4", "--trajectory-steps", "4")


@pytest.fixture(scope="session")
def int8_build(build_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(build folder, CLI output) of `gdexport build --int8 -o COPY --backend onnxruntime ...`."""
    from click.testing import CliRunner

    from export.cli import main
    from tests.builds import copy_build

    out = copy_build(build_dir, tmp_path_factory.mktemp("int8") / "build")
    args = ["build", "--int8", "-o", str(out), "--backend", "onnxruntime", *INT8_ARGS]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output
