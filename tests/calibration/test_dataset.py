"""The calibration set: balanced over timesteps, faithful to what the pipeline fed, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration import dataset
from calibration.dataset import CalibrationError, CalibrationSet, record_calibration_set
from tests.calibration.conftest import CALIB, CALIB_TIMESTEPS

ROLES = ("unet", "classifier_grad", "upsampler")
RECORD_SHARD = dataset._record_shard


def _quiet(**kw):
    return dict(progress=False, log=lambda s: None, **kw)


def test_every_step_recorded_once_per_trajectory(calib_build):
    cal = CalibrationSet.load(calib_build)
    assert [(s.first, s.samples) for s in cal.shards] == [(0, 2), (2, 2)]
    for role in ROLES:
        counts: dict[int, int] = {}
        for shard in cal.shards:
            t = cal.shard_arrays(shard, role)["t"]  # (calls, B)
            # one call per respaced step, in sampling order, the whole batch at the same t
            assert t.shape == (len(CALIB_TIMESTEPS), 2), role
            assert (t == t[:, :1]).all()
            assert t[:, 0].tolist() == CALIB_TIMESTEPS, role
            for v in t.ravel():
                counts[int(v)] = counts.get(int(v), 0) + 1
        assert counts == {t: CALIB["samples"] for t in CALIB_TIMESTEPS}, role


def test_recorded_inputs_are_what_the_pipeline_fed(calib_build):
    cal = CalibrationSet.load(calib_build)
    manifest = json.loads((calib_build / "manifest.json").read_text())
    seed = CALIB["seed"]
    for shard in cal.shards:
        unet = cal.shard_arrays(shard, "unet")
        clf = cal.shard_arrays(shard, "classifier_grad")
        up = cal.shard_arrays(shard, "upsampler")
        js = range(shard.first, shard.first + shard.samples)
        # x_T of sample j is the pipeline's documented draw from default_rng([seed, j, 0])
        x_T = np.stack(
            [
                np.random.default_rng([seed, j, 0]).standard_normal((3, 16, 16), np.float32)
                for j in js
            ]
        )
        np.testing.assert_array_equal(unet["x"][0], x_T)
        np.testing.assert_array_equal(unet["y"], np.tile(np.array(js) % 10, (5, 1)))
        # the states differ from step to step (a real trajectory, not one input repeated)
        assert all(not np.array_equal(unet["x"][k], unet["x"][k + 1]) for k in range(4))
        # the classifier sees the same x_t, t and y as the UNet at every step
        for key in ("x", "t", "y"):
            np.testing.assert_array_equal(clf[key], unet[key])
        # one guidance scale per sample and call (5 calls of 2 samples)
        np.testing.assert_array_equal(clf["scale"], np.full((5, 2), manifest["sampling"]["scale"]))
        # the upsampler starts from its own stream's noise, conditioned on the base samples
        up_T = np.stack(
            [
                np.random.default_rng([seed, j, 2]).standard_normal((3, 32, 32), np.float32)
                for j in js
            ]
        )
        np.testing.assert_array_equal(up["x"][0], up_T)
        assert (up["low_res"] == up["low_res"][:1]).all()
        low = up["low_res"][0]
        assert np.abs(low).max() <= 1 + 1e-6 and not np.array_equal(low, unet["x"][-1])


def test_upsampler_low_res_is_the_base_output(calib_build):
    """Re-sample shard 0's base stage with the fp32 pipeline: its output is the recorded low_res."""
    from runtime.pipeline import Pipeline

    cal = CalibrationSet.load(calib_build)
    up = cal.shard_arrays(cal.shards[0], "upsampler")
    with Pipeline.from_manifest(calib_build, precision="fp32", backend="onnxruntime") as pipe:
        res = pipe.sample(
            [0, 1], steps="ddim5", seed=CALIB["seed"], upsample=False, scale=cal.config.scale
        )
    np.testing.assert_array_equal(up["low_res"][0], res.x)


def _interrupt_after(monkeypatch, n_shards: int) -> list[int]:
    """Make the n-th+1 shard recording raise KeyboardInterrupt; returns the firsts recorded."""
    firsts: list[int] = []

    def fake(pipe, first, n, config, tick):
        if len(firsts) >= n_shards:
            raise KeyboardInterrupt
        firsts.append(first)
        return RECORD_SHARD(pipe, first, n, config, tick)

    monkeypatch.setattr(dataset, "_record_shard", fake)
    return firsts


def test_interrupted_set_resumes_and_redoes_a_corrupt_shard(build_copy: Path, monkeypatch):
    settings = dict(samples=4, shard_size=2, steps="ddim3")
    firsts = _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        record_calibration_set(build_copy, **_quiet(**settings))
    assert firsts == [0]
    folder = build_copy / "calibration"
    (folder / ".shard-00001.npz.x.tmp").write_bytes(b"half a shard")  # a write cut short
    with pytest.raises(CalibrationError, match="incomplete"):
        CalibrationSet.load(build_copy)
    first_shard = (folder / "shard-00000.npz").read_bytes()

    # resume with the recorded settings (none given): only the missing shard is recorded
    firsts = _interrupt_after(monkeypatch, 99)
    cal = record_calibration_set(build_copy, **_quiet())
    assert firsts == [2]
    assert [s.first for s in cal.shards] == [0, 2] and cal.config.steps == "ddim3"
    assert (folder / "shard-00000.npz").read_bytes() == first_shard
    assert not list(folder.glob(".*.tmp"))
    CalibrationSet.load(build_copy)

    # a corrupted shard is caught by its checksum and recorded again, identically
    data = bytearray(first_shard)
    data[len(data) // 2] ^= 0xFF
    (folder / "shard-00000.npz").write_bytes(bytes(data))
    with pytest.raises(CalibrationError, match="sha256"):
        CalibrationSet.load(build_copy)
    firsts = _interrupt_after(monkeypatch, 99)
    record_calibration_set(build_copy, **_quiet())
    assert firsts == [0]
    assert (folder / "shard-00000.npz").read_bytes() == first_shard


def test_other_settings_need_restart(build_copy: Path):
    record_calibration_set(build_copy, **_quiet(samples=1, steps="ddim2"))
    with pytest.raises(CalibrationError, match="--restart") as e:
        record_calibration_set(build_copy, **_quiet(samples=1, steps="ddim3"))
    assert "ddim2" in str(e.value) and "ddim3" in str(e.value)
    with pytest.raises(CalibrationError, match="batch maximum 16"):  # bad input: old set kept
        record_calibration_set(build_copy, **_quiet(shard_size=17, restart=True))
    assert CalibrationSet.load(build_copy).config.steps == "ddim2"
    cal = record_calibration_set(build_copy, **_quiet(samples=1, steps="ddim3", restart=True))
    assert cal.config.steps == "ddim3" and cal.calls("unet") == 3
    assert [p.name for p in sorted((build_copy / "calibration").iterdir())] == [
        "index.json",
        "shard-00000.npz",
    ]
    # users now sample at another guidance scale: the set no longer matches how they sample
    manifest = json.loads((build_copy / "manifest.json").read_text())
    manifest["sampling"]["scale"] = 3.0
    (build_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CalibrationError, match=r"scale 1\.0 -> 3\.0"):
        record_calibration_set(build_copy, **_quiet())


def test_calibrate_cli(build_copy: Path):
    from click.testing import CliRunner

    from export.cli import main

    args = ["calibrate", "-o", str(build_copy), "--samples", "3", "--steps", "ddim2"]
    res = CliRunner().invoke(main, [*args, "--shard-size", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "3 samples" in res.output and "unet 4" in res.output  # 2 shards x 2 steps
    index = json.loads((build_copy / "calibration" / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [2, 1]
    res = CliRunner().invoke(main, [*args[:3], "--steps", "ddim5"])
    assert res.exit_code == 2 and "--restart" in res.output
