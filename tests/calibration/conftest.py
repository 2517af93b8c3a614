"""Calibrated copies of the session's tiny build, made once per session.

`calib_build`: 4 trajectories in 2 shards of 2, respaced "ddim5" (T = 1000, so the model sees
t = 800, 600, 400, 200, 0). (`int8_build`, shared with the export tests, is in tests/conftest.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

CALIB = {"samples": 4, "shard_size": 2, "steps": "ddim5", "seed": 3}
# space_timesteps' "ddimN" rule by hand: the stride s with len(range(0, 1000, s)) == 5 is 200.
CALIB_TIMESTEPS = [800, 600, 400, 200, 0]


@pytest.fixture(scope="session")
def calib_build(build_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from calibration.dataset import record_calibration_set
    from tests.builds import copy_build

    out = copy_build(build_dir, tmp_path_factory.mktemp("calib") / "build")
    record_calibration_set(out, **CALIB, progress=False, log=lambda s: None)
    return out
