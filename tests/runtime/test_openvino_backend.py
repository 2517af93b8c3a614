"""The OpenVINO backend against ONNX Runtime on the session's test build: every graph within
1e-4 at fp32 (the classifier's gradient graph included, which needs the ConvTranspose fix), and
whole guided samples through `Pipeline(backend="openvino")`."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")

from runtime.backends import BackendError, open_backend  # noqa: E402
from runtime.backends.openvino import read_model, unshare_deconv_weights  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402


def _feeds(specs, batch, seed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, s in specs.items():
        shape = [batch if d == "batch" else d for d in s.shape]
        if name == "t":
            feeds[name] = rng.integers(0, 1000, shape).astype(s.dtype)
        elif name == "y":
            feeds[name] = rng.integers(0, 2, shape).astype(s.dtype)
        elif name == "scale":
            feeds[name] = np.full(shape, 3.0, s.dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(s.dtype)
    return feeds


def test_every_fp32_graph_matches_onnxruntime(build_dir):
    m = Manifest.load(build_dir)
    arts = [a for a in m.artifacts if a.precision == "fp32" and a.backend == "onnxruntime"]
    assert {a.role for a in arts} >= {"unet", "classifier_grad", "upsampler"}
    for art in arts:
        path = m.verify(art)
        with open_backend(path, "onnxruntime") as ort, open_backend(path, "openvino") as ov:
            assert ov.inputs == ort.inputs
            for b, seed in ((1, 0), (3, 1)):
                feeds = _feeds(ort.inputs, b, seed)
                want, got = ort(feeds), ov(feeds)
                for k in want:
                    err = np.abs(got[k] - want[k]).max()
                    assert err <= 1e-4, (art.file, k, err)


def test_the_gradient_graph_needs_the_conv_transpose_fix(build_dir):
    """Without unsharing, OpenVINO's ConvTranspose with a shared weight is wrong: the fix is
    what makes the test above pass, not luck."""
    import openvino as ov

    m = Manifest.load(build_dir)
    path = m.verify(m.artifact("classifier_grad", "fp32", "onnxruntime"))
    core = ov.Core()
    assert unshare_deconv_weights(core.read_model(str(path))) > 0
    raw = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    fixed = core.compile_model(read_model(path, core), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    with open_backend(path, "onnxruntime") as ort:
        feeds = _feeds(ort.inputs, 2, 5)
        want = ort(feeds)["grad"]
    assert np.abs(fixed(feeds)[0] - want).max() <= 1e-4
    assert np.abs(raw(feeds)[0] - want).max() > 1e-3


def test_pipeline_samples_on_openvino_as_on_onnxruntime(build_dir):
    kw = dict(num_samples=3, scale=2.0, steps="ddim5", seed=7)
    with Pipeline.from_manifest(build_dir) as pipe:
        assert pipe.unet_artifact.backend == "onnxruntime"
        want = pipe.sample([0, 1, 0], **kw)
    with Pipeline.from_manifest(build_dir, backend="openvino") as pipe:
        assert type(pipe.engine("unet")).__name__ == "OvBackend"
        assert type(pipe.engine("classifier_grad")).__name__ == "OvBackend"
        got = pipe.sample([0, 1, 0], **kw)
    assert np.abs(got.x - want.x).max() < 1e-3
    assert (np.abs(got.images.astype(int) - want.images.astype(int)) <= 1).mean() >= 0.999


def test_bad_input_is_a_backend_error(build_dir, tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        open_backend(tmp_path / "none.onnx", "openvino")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(BackendError, match="cannot read"):
        open_backend(bad, "openvino")
    m = Manifest.load(build_dir)
    art = m.artifact("unet", "fp32", "onnxruntime")
    with open_backend(m.verify(art), "openvino", batch=art.batch) as ov:
        with pytest.raises(BackendError, match="outside the engine's range"):
            ov(_feeds(ov.inputs, art.batch["max"] + 1, 0))


def test_onnx_runtime_providers_are_refused_on_openvino(build_dir):
    with pytest.raises(BackendError, match="providers are ONNX Runtime's"):
        Pipeline.from_manifest(
            build_dir, backend="openvino", backend_options={"providers": ["CPUExecutionProvider"]}
        )


def test_the_compiled_model_cache_gives_the_same_outputs(build_dir, tmp_path):
    """A warm start compiles from the path (OpenVINO's blob) only for graphs that need no fix;
    the gradient graph, which needs it, is read and fixed every time and stays right."""
    import json

    m = Manifest.load(build_dir)
    cache = tmp_path / "cache"
    for role in ("unet", "classifier_grad"):
        art = m.artifact(role, "fp32", "onnxruntime")
        path = m.verify(art)
        with open_backend(path, "onnxruntime") as ort:
            feeds = _feeds(ort.inputs, 2, 3)
            want = next(iter(ort(feeds).values()))
        for _ in range(2):  # cold, then warm
            with open_backend(path, "openvino", cache_dir=cache) as ov:
                assert list(ov.inputs) == list(ort.inputs)
                got = next(iter(ov(feeds).values()))
            assert np.abs(got - want).max() <= 1e-4, role
    known = json.loads((cache / "gdexport_graphs.json").read_text())
    assert any("unet.onnx" in k for k in known)
    assert not any("classifier_grad.onnx" in k for k in known)
    assert any(p.suffix == ".blob" for p in cache.iterdir())
