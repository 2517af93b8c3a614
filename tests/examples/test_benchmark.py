"""examples/benchmark.py on the session build: the table's structure and its figures' properties
(FLOPs counted on the reference scale with the batch; ratios against the reference in one run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from benchmark import count_flops, cpu_peak_gflops  # noqa: E402

from export.parity import parity_inputs  # noqa: E402


def test_benchmark_runs_and_reports_every_engine(build_dir, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "benchmark.py"), str(build_dir), "--repeats", "1",
         "--sample-repeats", "1", "--steps", "ddim3", "--ort-sweep", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {(c["component"], c["impl"]): c for c in data["per_call"]}
    for role in ("unet", "classifier_grad", "upsampler"):
        ref, ort = rows[(role, "pytorch-eager")], rows[(role, "ort-fp32")]
        assert ref["speedup_vs_ref"] == 1.0 and ref["gflop"] == ort["gflop"] > 0
        assert ort["speedup_vs_ref"] == pytest.approx(ref["median_s"] / ort["median_s"])
        assert ort["gflops_per_s"] == pytest.approx(ort["gflop"] / ort["median_s"])
    samples = {s["impl"]: s for s in data["whole_sample"]}
    assert set(samples) == {"pytorch-eager", "ort-fp32"}
    assert 0 <= samples["ort-fp32"]["loop_overhead_share"] < 1
    assert len(data["ort_sweep"]) == 7 and data["ort_sweep"][0]["vs_runtime_default"] == 1.0
    assert "whole guided sample" in r.stdout and "% peak" in r.stdout


def test_flops_scale_with_the_batch(reference_models):
    unet = reference_models["unet"]
    one = count_flops("unet", unet, parity_inputs("unet", unet, 1, seed=0))
    three = count_flops("unet", unet, parity_inputs("unet", unet, 3, seed=0))
    assert one > 0 and three == pytest.approx(3 * one, rel=1e-6)


def test_cpu_peak_formula_is_stated():
    peak, why = cpu_peak_gflops(2, 3.0)
    lanes_pipes = [int(w) for w in why.split(" x ")[1:3] for w in [w.split()[0]]]
    assert peak == pytest.approx(2 * lanes_pipes[0] * lanes_pipes[1] * 2 * 3.0)
    assert "3.00 GHz" in why and "given" in why
