"""Calibrated copies of the session's tiny build, made once per session.

`calib_build`: 4 trajectories in 2 shards of 2, respaced "ddim5" (T = 1000, so the model sees
t = 800, 600, 400, 200, 0). `int8_build`: `gdexport build --int8` on a fresh copy, which records
its own calibration set first (2 trajectories, "ddim4").
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

CALIB = {"samples": 4, "shard_size": 2, "steps": "ddim5", "seed": 3}
# space_timesteps' "ddimN" rule by hand: the stride s with len(range(0, 1000, s)) == 5 is 200.
CALIB_TIMESTEPS = [800, 600, 400, 200, 0]
INT8_ARGS = ("--calib-samples", "2", "--calib-steps", "ddim4", "--trajectory-steps", "4")


@pytest.fixture(scope="session")
def calib_build(build_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from calibration.dataset import record_calibration_set
    from tests.builds import copy_build

    out = copy_build(build_dir, tmp_path_factory.mktemp("calib") / "build")
    record_calibration_set(out, **CALIB, progress=False, log=lambda s: None)
    return out


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
