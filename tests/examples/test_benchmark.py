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

from benchmark import count_flops, cpu_peaks  # noqa: E402

from export.parity import parity_inputs  # noqa: E402

HAS_OV = __import__("importlib").util.find_spec("openvino") is not None


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
        # Each row's error against the fp32 reference: exact engines tiny, bf16 autocast not.
        assert ref["rel_error_vs_fp32_ref"] == 0.0 and ort["rel_error_vs_fp32_ref"] < 1e-4
        assert rows[(role, "pytorch-bf16")]["rel_error_vs_fp32_ref"] > 1e-4
        assert rows[(role, "pytorch-bf16")]["arithmetic"] == "bf16"
        if HAS_OV:
            assert rows[(role, "ov-fp32")]["rel_error_vs_fp32_ref"] < 1e-4
    samples = {s["impl"]: s for s in data["whole_sample"]}
    want = {"pytorch-eager", "pytorch-bf16", "ort-fp32"} | ({"ov-fp32"} if HAS_OV else set())
    assert set(samples) == want
    assert 0 <= samples["ort-fp32"]["loop_overhead_share"] < 1
    assert len(data["ort_sweep"]) == 7 and data["ort_sweep"][0]["vs_runtime_default"] == 1.0
    assert "whole guided sample" in r.stdout and "% peak" in r.stdout


def test_flops_scale_with_the_batch(reference_models):
    unet = reference_models["unet"]
    one = count_flops("unet", unet, parity_inputs("unet", unet, 1, seed=0))
    three = count_flops("unet", unet, parity_inputs("unet", unet, 3, seed=0))
    assert one > 0 and three == pytest.approx(3 * one, rel=1e-6)


def _fake_cpu(monkeypatch, vendor, family, features):
    import runtime.cpu as cpu

    info = {"model": "test CPU", "vendor": vendor, "family": family, "features": features}
    monkeypatch.setattr(cpu, "cpu_info", lambda: info)


def test_cpu_peaks_know_amx_and_vnni(monkeypatch):
    _fake_cpu(monkeypatch, "GenuineIntel", "6",
              ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"])  # fmt: skip
    peaks = cpu_peaks(2, 3.0)
    assert peaks["fp32"][0] == pytest.approx(2 * 16 * 2 * 2 * 3.0)  # 2 x 512-bit FMA units
    assert peaks["bf16"][0] == pytest.approx(2 * 1024 * 3.0) and "AMX" in peaks["bf16"][1]
    assert peaks["int8"][0] == pytest.approx(2 * 2048 * 3.0) and "3.00 GHz" in peaks["int8"][1]


def test_cpu_peaks_without_matrix_units(monkeypatch):
    _fake_cpu(
        monkeypatch, "AuthenticAMD", "25", ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    )
    peaks = cpu_peaks(2, 3.0)  # Zen 4: AVX-512 on two 256-bit pipes
    assert peaks["fp32"][0] == pytest.approx(2 * 8 * 2 * 2 * 3.0)
    assert peaks["bf16"][0] == pytest.approx(2 * peaks["fp32"][0])
    assert peaks["int8"][0] == pytest.approx(4 * peaks["fp32"][0])
    _fake_cpu(monkeypatch, "AuthenticAMD", "25", ["avx2", "fma"])  # Zen 3
    assert set(cpu_peaks(2, 3.0)) == {"fp32"}
