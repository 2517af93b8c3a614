"""`gdexport build --fp16` without TensorRT: fp16 graphs with fp32 islands, parity, atomicity."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, shape_inference

from export.build import ExportError, build, choose_backend, tensorrt_available
from runtime.manifest import Manifest

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


@pytest.fixture(scope="module")
def fp16_build(build_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "build"
    shutil.copytree(build_dir, out)
    build(out, precision="fp16", backend="onnxruntime", trajectory_steps="10", log=lambda s: None)
    return out


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor in the graph (inputs, initializers, inferred values)."""
    inferred = shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _input_types(model: onnx.ModelProto, op: str) -> list[int]:
    types = _types(model)
    return [types.get(n.input[0]) for n in model.graph.node if n.op_type == op]


@pytest.mark.parametrize(
    "file", ["unet.fp16.onnx", "classifier_grad.fp16.onnx", "upsampler.fp16.onnx"]
)
def test_fp16_graph_keeps_fp32_islands(fp16_build, file):
    model = onnx.load(str(fp16_build / file))
    conv_types = _input_types(model, "Conv")
    assert conv_types.count(HALF) >= len(conv_types) // 2, "the trunk's convolutions must be fp16"
    for op in ("InstanceNormalization", "Softmax", "Sin", "Cos"):
        got = _input_types(model, op)
        assert got and all(t == FLOAT for t in got), f"{op} must compute in fp32, got {got}"
    types = _types(model)
    # The graph's interface stays fp32, so the runtime feeds it like the fp32 graph.
    assert all(types[i.name] in (FLOAT, TensorProto.INT64) for i in model.graph.input)
    assert all(types[o.name] == FLOAT for o in model.graph.output)
    if file.startswith("classifier_grad"):
        assert _input_types(model, "LogSoftmax") == [FLOAT]
    else:
        # The final projection (the Conv producing the output) stays fp32: weight and input.
        producer = {o: n for n in model.graph.node for o in n.output}
        node = producer[model.graph.output[0].name]
        while node.op_type != "Conv":
            node = producer[node.input[0]]
        assert types[node.input[0]] == FLOAT and types[node.input[1]] == FLOAT


def test_fp16_artifacts_recorded_with_parity(fp16_build, reference_models):
    m = Manifest.load(fp16_build)
    fp16 = {a.role: a for a in m.artifacts if a.precision == "fp16"}
    assert set(fp16) == {"unet", "classifier_grad", "upsampler"}
    for a in fp16.values():
        m.verify(a)
        assert a.backend == "onnxruntime"
    rows = {r["artifact"]: r for r in m.data["parity"]["components"]}
    for a in fp16.values():
        row = rows[a.file]
        assert row["precision"] == "fp16" and row["passed"] is True
        assert "storage rounding" in row["what"]
    traj = [r for r in m.data["parity"]["trajectories"] if r["precision"] == "fp16"]
    assert {r["case"].split()[0] for r in traj} >= {"ddim", "ddpm", "cascade"}
    assert all(np.isfinite(r["final_max_abs"]) for r in traj)
    # The fp32 artefacts are still there and still verify.
    for a in m.artifacts:
        if a.precision == "fp32":
            m.verify(a)


def test_fp16_unet_close_to_fp32_reference(fp16_build, reference_models):
    """Independent of the build's own parity code: run the fp16 graph and the fp32 reference."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(
        str(fp16_build / "unet.fp16.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 16, 16), dtype=np.float32)
    t = np.array([3, 900], np.int64)
    y = np.array([1, 7], np.int64)
    (got,) = sess.run(None, {"x": x, "t": t, "y": y})
    with torch.no_grad():
        want = reference_models["unet"](
            torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)
        ).numpy()
    err = np.abs(got - want).max()
    assert err < 1e-2 * np.abs(want).max(), err
    assert err > 1e-7, "an fp16 graph that matches fp32 exactly was not converted"


def test_interrupted_build_keeps_previous_build(build_copy, monkeypatch):
    import export.onnx_export as onnx_export

    calls = {"n": 0}
    real = onnx_export.export_onnx

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", flaky)
    before = (build_copy / "manifest.json").read_text()
    with pytest.raises(KeyboardInterrupt):
        build(build_copy, precision="fp16", backend="onnxruntime", log=lambda s: None)
    assert (build_copy / "manifest.json").read_text() == before
    assert not list(build_copy.glob("*.fp16.onnx"))
    assert not list(build_copy.glob(".staging-*"))
    m = Manifest.load(build_copy)
    for a in m.artifacts:
        m.verify(a)


def test_backend_choice_without_tensorrt(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, why = tensorrt_available()
    assert not ok and "TensorRT" in why
    assert choose_backend("auto") == "onnxruntime"
    with pytest.raises(ExportError, match="gdexport\\[trt\\]"):
        choose_backend("tensorrt")


def test_build_without_export_says_what_to_do(tmp_path):
    with pytest.raises(ExportError, match="holds no export"):
        build(tmp_path / "empty", precision="fp16", backend="onnxruntime", log=lambda s: None)
    assert not (tmp_path / "empty" / "manifest.json").exists()


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_build_of_the_small_configuration(build_copy, reference_models, precision):
    """End to end where TensorRT and a GPU exist: plans built, listed, and their guided loops
    reproduce the reference (fp32 within 1e-3; fp16 reported and bounded loosely)."""
    from export.trajectory import trajectory_parity
    from runtime.pipeline import Pipeline

    build(
        build_copy,
        precision=precision,
        backend="tensorrt",
        trajectory_steps=None,
        log=lambda s: None,
    )
    m = Manifest.load(build_copy)
    plans = {a.role: a for a in m.artifacts if a.backend == "tensorrt" and a.precision == precision}
    assert set(plans) == {"unet", "classifier_grad", "upsampler"}
    for a in plans.values():
        m.verify(a)
        assert a.extra["tensorrt_version"] and a.extra["compute_capability"]
    with Pipeline.from_manifest(build_copy, precision=precision, backend="tensorrt") as pipe:
        assert pipe.unet_artifact.backend == "tensorrt"
        rows = trajectory_parity(pipe, reference_models, steps="10")
    bound = 1e-3 if precision == "fp32" else 0.5
    assert all(r.final_max_abs <= bound for r in rows), [r.to_json() for r in rows]


def test_fp32_build_saves_ort_optimised_graphs_the_runtime_uses(build_copy):
    from runtime.backends.onnxruntime import OrtBackend
    from runtime.manifest import sha256_of

    build(
        build_copy,
        precision="fp32",
        backend="onnxruntime",
        trajectory_steps=None,
        log=lambda s: None,
    )
    m = Manifest.load(build_copy)
    engines = [a for a in m.artifacts if a.role != "classifier"]
    assert {a.role for a in engines} == {"unet", "classifier_grad", "upsampler"}
    rng = np.random.default_rng(0)
    for a in engines:
        opt = a.extra["ort_optimized"]
        assert sha256_of(build_copy / opt["file"]) == opt["sha256"]
        feeds = {
            "x": rng.standard_normal((2, 3, *a.inputs[0].shape[2:]), dtype=np.float32),
            "t": np.array([5, 900], np.int64),
        }
        for spec in a.inputs[2:]:
            if spec.name == "y":
                feeds["y"] = np.array([1, 2], np.int64)
            elif spec.name == "scale":
                feeds["scale"] = np.full(2, 2.0, np.float32)
            else:
                feeds[spec.name] = rng.standard_normal((2, *spec.shape[1:]), dtype=np.float32)
        with OrtBackend(m.verify(a)) as plain, OrtBackend(m.verify(a), ort_optimized=opt) as fast:
            assert fast.path.name == opt["file"] and plain.path.name == a.file
            np.testing.assert_allclose(
                next(iter(fast(feeds).values())), next(iter(plain(feeds).values())), atol=1e-5
            )
        # Another onnxruntime version: the saved graph is not trusted, the original is used.
        with OrtBackend(m.verify(a), ort_optimized={**opt, "onnxruntime": "0.0"}) as other:
            assert other.path.name == a.file
