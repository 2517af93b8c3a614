"""`gdexport build --int8` on the tiny build: manifest entries, measured quality, the pipeline."""

from __future__ import annotations

import json

import numpy as np

from calibration.quality import GRAD_MAX_REL_RMS, GRAD_MAX_X0_SHIFT, GRAD_MIN_COSINE
from runtime.manifest import Manifest
from runtime.schedule import make_schedule


def test_build_int8_records_artifacts_and_parity(int8_build):
    build, output = int8_build
    assert "unet.int8.onnx" in output
    m = Manifest.load(build)
    index = json.loads((build / "calibration" / "index.json").read_text())
    # no calibration set existed: the build recorded one with the given settings
    assert index["samples"] == 2 and index["config"]["steps"] == "ddim4"
    int8 = {a.role: a for a in m.artifacts if a.precision == "int8"}
    assert {"unet", "upsampler"} <= set(int8)
    fp32 = {a.role: a for a in m.artifacts if a.precision == "fp32"}
    for role, a in int8.items():
        m.verify(a)
        assert a.backend == "onnxruntime" and a.file == f"{role}.int8.onnx"
        assert a.extra["trt_op_check"] == "pass" and a.extra["source_graph"] == fp32[role].file
        assert [t.name for t in a.inputs] == [t.name for t in fp32[role].inputs]
        cal = a.extra["calibration"]
        assert cal["method"] == "percentile" and cal["samples"] == 2 and cal["steps"] == "ddim4"
        assert cal["calls"] == 4  # one shard of both samples, one engine call per step
        excluded = a.extra["excluded_nodes"]
        assert set(excluded.values()) >= {"first-conv", "last-conv", "embedding", "skip"}
        err = a.extra["calibration_error"]
        assert 0 < err["rel_rms"] < 0.2 and err["cosine_min"] > 0.9
    rows = {r["artifact"]: r for r in m.data["parity"]["components"]}
    for a in int8.values():
        row = rows[a.file]
        assert row["precision"] == "int8" and row["tol"] is None and row["passed"] is None
        assert 0 < row["max_abs"] < row["ref_max"]
    traj = [r for r in m.data["parity"]["trajectories"] if r["precision"] == "int8"]
    assert {r["case"].split()[0] for r in traj} == {"ddim", "ddpm", "cascade"}
    assert all(np.isfinite(r["final_max_abs"]) and r["final_max_abs"] > 0 for r in traj)


def test_classifier_gradient_quantised_only_where_it_holds(int8_build):
    build, _ = int8_build
    m = Manifest.load(build)
    info = m.data["int8"]["components"]["classifier_grad"]
    art = m.artifact("classifier_grad", "int8", "onnxruntime")
    if info["quantized"]:
        err = art.extra["calibration_error"]
        assert err["cosine_min"] >= GRAD_MIN_COSINE and err["rel_rms"] <= GRAD_MAX_REL_RMS
        # the guided x0 shift, (1 - alpha_bar) / sqrt(alpha_bar) * error, within the limit
        alphas = make_schedule("cosine", 1000).alphas_cumprod
        for t, e in err["abs_by_timestep"].items():
            a = alphas[int(t)]
            assert (1 - a) / np.sqrt(a) * e <= GRAD_MAX_X0_SHIFT, t
    else:
        assert art is None or art.precision != "int8"
        assert not (build / "classifier_grad.int8.onnx").exists()
        assert info["runs"].startswith("classifier_grad") and info["why"]


def test_int8_pipeline_samples(int8_build):
    from runtime.pipeline import Pipeline

    build, _ = int8_build
    with Pipeline.from_manifest(build, precision="int8", backend="onnxruntime") as pipe:
        assert pipe.unet_artifact.file == "unet.int8.onnx"
        assert pipe.upsampler_artifact.file == "upsampler.int8.onnx"
        res = pipe.sample([1, 2], steps="ddim3", upsampler_steps="ddim2", seed=0)
    assert res.images.shape == (2, 32, 32, 3) and res.images.std() > 0


def test_speed_comparison_runs_both(int8_build):
    from calibration.speed import compare_unet

    build, _ = int8_build
    got = compare_unet(build, calls=2, warmup=1, threads=1)
    assert set(got) == {"fp32", "int8"} and all(0 < s < 10 for s in got.values())


def test_check_reports_int8(int8_build):
    from click.testing import CliRunner

    from export.cli import main

    build, _ = int8_build
    res = CliRunner().invoke(main, ["check", str(build), "--precision", "int8"])
    assert res.exit_code == 0, res.output
    lines = [line.split() for line in res.output.splitlines() if ".int8.onnx" in line]
    assert {cols[0] for cols in lines} >= {"unet.int8.onnx", "upsampler.int8.onnx"}
    assert all(cols[2] == "int8" and cols[-1] == "-" for cols in lines)  # report only
