"""What the build decides from the CPU: the int8 weight range (and the runtime's refusal of a
graph this CPU would overflow), and the CPU backend it timed, which Pipeline then uses."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

import runtime.cpu as cpu
from export.build import int8_needs_reduce_range
from export.cli import main
from runtime.backends import BackendError
from runtime.pipeline import Pipeline

HAS_OV = importlib.util.find_spec("openvino") is not None


def _fake_cpu(monkeypatch, *features):
    info = {"model": "test CPU", "vendor": "", "family": "", "features": list(features)}
    monkeypatch.setattr(cpu, "cpu_info", lambda: info)


def test_weight_range_follows_the_int8_dot_product_unit(monkeypatch):
    _fake_cpu(monkeypatch, "avx2", "fma")
    seven, why = int8_needs_reduce_range("onnxruntime")
    assert seven and "no VNNI" in why
    for unit in ("avx512_vnni", "avx_vnni", "amx_int8"):
        _fake_cpu(monkeypatch, "avx2", unit)
        eight, why = int8_needs_reduce_range("onnxruntime")
        assert not eight and unit in why
    assert int8_needs_reduce_range("tensorrt") == (False, int8_needs_reduce_range("tensorrt")[1])
    assert not int8_needs_reduce_range("tensorrt")[0]
    assert "as asked" in int8_needs_reduce_range("onnxruntime", True)[1]


def test_the_int8_build_records_this_cpus_range(int8_build):
    out, _ = int8_build
    section = json.loads((out / "manifest.json").read_text())["int8"]
    assert section["weight_range"] == ("7-bit" if cpu.int8_dot_product() is None else "8-bit")
    assert cpu.cpu_info()["model"] in section["weight_range_why"]


def test_eight_bit_weights_are_refused_on_onnx_runtime_without_vnni(
    int8_build, tmp_path, monkeypatch
):
    from tests.builds import copy_build

    out = copy_build(int8_build[0], tmp_path / "b")
    data = json.loads((out / "manifest.json").read_text())
    data["int8"]["weight_range"] = "8-bit"
    (out / "manifest.json").write_text(json.dumps(data))
    _fake_cpu(monkeypatch, "avx2", "fma")
    with pytest.raises(BackendError, match="overflow on this CPU"):
        Pipeline.from_manifest(out, precision="int8", backend="onnxruntime")
    if HAS_OV:  # OpenVINO's kernels do not overflow
        with Pipeline.from_manifest(out, precision="int8", backend="openvino") as pipe:
            assert pipe.unet_artifact.precision == "int8"
    _fake_cpu(monkeypatch, "avx2", "avx512_vnni")
    with Pipeline.from_manifest(out, precision="int8", backend="onnxruntime") as pipe:
        assert pipe.unet_artifact.precision == "int8"


@pytest.mark.skipif(not HAS_OV, reason="openvino is not installed: one CPU backend, no choice")
def test_the_build_times_the_cpu_backends_and_pipeline_uses_its_choice(build_copy, monkeypatch):
    result = CliRunner().invoke(main, ["build", "--fp32", "-o", str(build_copy)])
    assert result.exit_code == 0, result.output
    section = json.loads((build_copy / "manifest.json").read_text())["runtime"]
    assert section["cpu"] == cpu.identity()
    choice = section["choices"]["fp32"]
    ms = choice["ms_per_unet_call"]
    assert set(ms) == {"onnxruntime", "openvino"} and choice["backend"] == min(ms, key=ms.get)
    assert f"runtime backend for fp32: {choice['backend']}" in result.output
    info = CliRunner().invoke(main, ["info", str(build_copy)])
    assert info.exit_code == 0 and "CPU backend chosen by the build (this CPU)" in info.output
    engine_type = {"onnxruntime": "OrtBackend", "openvino": "OvBackend"}
    with Pipeline.from_manifest(build_copy) as pipe:
        assert pipe.backend_choice[0] == choice["backend"]
        assert "the build's choice on this CPU" in pipe.backend_choice[1]
        assert type(pipe.engine("unet")).__name__ == engine_type[choice["backend"]]
    with Pipeline.from_manifest(build_copy, backend="onnxruntime") as pipe:  # asked wins
        assert type(pipe.engine("unet")).__name__ == "OrtBackend"
    _fake_cpu(monkeypatch, "avx2")  # another CPU: its timing says nothing here
    with Pipeline.from_manifest(build_copy) as pipe:
        assert pipe.backend_choice == ("onnxruntime", "the default")
        assert type(pipe.engine("unet")).__name__ == "OrtBackend"


def _quantised_convs(path) -> int:
    """Convolutions of a Q/DQ graph whose weight comes through a DequantizeLinear."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    made_by = {o: n.op_type for n in g.node for o in n.output}
    return sum(
        1 for n in g.node if n.op_type == "Conv" and made_by.get(n.input[1]) == "DequantizeLinear"
    )


def test_the_int8_graph_runs_on_integer_kernels(int8_build):
    """ONNX Runtime fuses every quantised convolution into QLinearConv (its integer kernel), and
    OpenVINO executes each one in u8/i8: the int8 graph is not run in float behind Q/DQ pairs."""
    import collections

    import onnx

    out, _ = int8_build
    from runtime.manifest import Manifest

    m = Manifest.load(out)
    art = m.artifact("unet", "int8", "onnxruntime")
    n = _quantised_convs(m.verify(art))
    assert n > 0
    opt = out / art.extra["ort_optimized"]["file"]
    ops = collections.Counter(x.op_type for x in onnx.load(str(opt)).graph.node)
    assert ops["QLinearConv"] == n, ops
    if not HAS_OV:
        return
    import openvino as ov

    from runtime.backends.openvino import read_model

    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": "f32"}
    runtime_model = core.compile_model(
        read_model(m.verify(art), core), "CPU", cfg
    ).get_runtime_model()
    integer = 0
    for op in runtime_model.get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            integer += info["runtimePrecision"].astype(str) in ("u8", "i8")
    assert integer == n
