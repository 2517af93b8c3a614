"""The build's one loop per graph (`export.graphs.finish_graph`): op check -> engine -> parity
through the backend that runs the engine -> manifest entries."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")

from export.graphs import EngineOptions, ExportError, StagedGraph, finish_graph  # noqa: E402
from runtime.backends.onnxruntime import OrtBackend  # noqa: E402

BATCH = {"min": 1, "opt": 1, "max": 16}


def test_a_tensorrt_engine_is_checked_through_the_tensorrt_backend(
    build_dir, tmp_path, reference_models, monkeypatch
):
    """With TensorRT as the engine backend the parity row measures the plan, opened through the
    runtime's TensorRT backend (faked here by ONNX Runtime on the graph the 'plan' copies)."""
    staging = tmp_path / "staging"
    staging.mkdir()
    shutil.copy(build_dir / "unet.onnx", staging / "unet.fp16.onnx")
    built, opened = [], []

    def fake_engine(onnx_path, plan_path, **kw):
        built.append((onnx_path.name, plan_path.name, kw["precision"]))
        shutil.copy(onnx_path, plan_path)
        return {"tensorrt_version": "fake"}

    def fake_open(path, backend=None, **options):
        opened.append((path.name, backend, options.get("batch")))
        return OrtBackend(path)

    monkeypatch.setattr("export.trt_build.engine_from_onnx", fake_engine)
    monkeypatch.setattr("export.parity.open_backend", fake_open)
    graph = StagedGraph("unet", "fp16", staging / "unet.fp16.onnx", tol=1e-4)
    entries, rows = finish_graph(
        graph, reference_models["unet"], staging, BATCH, EngineOptions("tensorrt"),
        log=lambda line: None,
    )  # fmt: skip
    assert built == [("unet.fp16.onnx", "unet.fp16.plan", "fp16")]
    assert opened == [("unet.fp16.plan", "tensorrt", BATCH)]
    assert [e["file"] for e in entries] == ["unet.fp16.onnx", "unet.fp16.plan"]
    assert entries[1]["backend"] == "tensorrt" and entries[1]["source_graph"] == "unet.fp16.onnx"
    assert rows[0].artifact == "unet.fp16.plan" and rows[0].what.startswith("tensorrt vs")
    assert rows[0].passed  # the 'plan' is the fp32 graph: it matches the reference


def test_a_graph_out_of_tolerance_fails_before_anything_is_committed(
    build_dir, tmp_path, reference_models
):
    staging = tmp_path / "staging"
    staging.mkdir()
    shutil.copy(build_dir / "unet.onnx", staging / "unet.onnx")
    graph = StagedGraph("unet", "fp32", staging / "unet.onnx", tol=1e-4)
    with pytest.raises(ExportError, match=r"parity check failed for unet\.onnx"):
        finish_graph(graph, _other_unet(), staging, BATCH, EngineOptions(),
                     log=lambda line: None)  # fmt: skip


def _other_unet():
    """The UNet of another seed: same shapes, other weights."""
    from export.loading import build_model
    from tests.builds import UNET

    torch.manual_seed(123)
    return build_model(UNET)
