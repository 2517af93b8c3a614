"""`gdexport triton`: the repository's configs against the ONNX graphs, the copied files against the
build, the failure paths; and gd_sampler's loop against the in-process Pipeline, with a stand-in
for Triton's `triton_python_backend_utils` (the real server is tested in tests/examples)."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from export.cli import main
from export.triton import TritonRepoError, make_repository
from runtime.backends.onnxruntime import OrtBackend
from runtime.manifest import Manifest, sha256_of, write_json_atomic
from runtime.pipeline import Pipeline

TENSOR = re.compile(
    r'\{ name: "(\w+)" data_type: (\w+) dims: \[ ([^\]]*) \]( reshape: \{ shape: \[ \] \})?'
)
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64"}


def _section(text: str, key: str) -> list[tuple[str, str, list[int], bool]]:
    body = re.search(rf"^{key} \[\n(.*?)\n\]", text, re.S | re.M).group(1)
    return [
        (n, t, [int(d) for d in dims.split(", ")], bool(r))
        for n, t, dims, r in TENSOR.findall(body)
    ]


def _graph_io(path: Path, which: str) -> list[tuple[str, str, list]]:
    g = onnx.load(str(path), load_external_data=False).graph
    return [
        (
            v.name,
            ONNX_TYPES[v.type.tensor_type.elem_type],
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in getattr(g, which)
    ]


@pytest.fixture(scope="module")
def repo(build_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    make_repository(build_dir, out, sampler_instances=3, max_samples=5)
    return out


def test_engine_configs_match_the_graphs(repo, build_dir):
    manifest = Manifest.load(build_dir)
    for role in ("unet", "classifier_grad", "upsampler"):
        config = (repo / f"gd_{role}" / "config.pbtxt").read_text()
        art = manifest.artifact(role, "fp32", "onnxruntime")
        graph = repo / f"gd_{role}" / "1" / art.file
        assert sha256_of(graph) == art.sha256
        assert (
            'backend: "onnxruntime"' in config and f'default_model_filename: "{art.file}"' in config
        )
        # Every tensor has the batch axis first, so Triton batches the model up to the build's max.
        assert f"max_batch_size: {art.batch['max']}" in config
        assert "dynamic_batching" in config and "KIND_CPU" in config
        for key, which in (("input", "input"), ("output", "output")):
            declared = _section(config, key)
            actual = _graph_io(graph, which)
            assert [d[0] for d in declared] == [a[0] for a in actual], role
            for (name, dtype, dims, reshaped), (_, gtype, gdims) in zip(declared, actual):
                assert gdims[0] == "batch" and dtype == gtype, (role, name)
                # A rank-1 tensor is one scalar per sample: [1] on the wire, [] for the engine.
                assert (dims, reshaped) == ((gdims[1:], False) if gdims[1:] else ([1], True))


def test_sampler_config_and_runtime_copy(repo):
    config = (repo / "gd_sampler" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 0" in config
    assert "count: 3" in config and '"max_samples" value: { string_value: "5" }' in config
    for role in ("unet", "classifier_grad", "upsampler"):
        assert f'"{role}_model" value: {{ string_value: "gd_{role}" }}' in config
    import runtime

    src = Path(runtime.__file__).parent
    copied = repo / "gd_sampler" / "1" / "runtime"
    for f in src.rglob("*.py"):
        assert (copied / f.relative_to(src)).read_bytes() == f.read_bytes(), f
    assert not list(copied.rglob("__pycache__"))


def _with_plans(build_copy: Path) -> Path:
    """The build with its ONNX UNet also listed as a TensorRT plan (the bytes do not matter here)."""
    data = json.loads((build_copy / "manifest.json").read_text())
    extra = []
    for a in data["artifacts"]:
        if a["role"] in ("unet", "classifier_grad") and a["backend"] == "onnxruntime":
            plan = build_copy / a["file"].replace(".onnx", ".fp16.plan")
            plan.write_bytes(b"not a real plan")
            extra.append(
                a | {"file": plan.name, "backend": "tensorrt", "precision": "fp16",
                     "sha256": hashlib.sha256(plan.read_bytes()).hexdigest()}
            )  # fmt: skip
    data["artifacts"] += extra
    write_json_atomic(build_copy / "manifest.json", data)
    return build_copy


def test_plans_become_tensorrt_models_on_gpus(build_copy, tmp_path):
    arts = make_repository(_with_plans(build_copy), tmp_path / "repo")
    assert arts["unet"].backend == "tensorrt" and arts["classifier_grad"].backend == "tensorrt"
    # The upsampler has no plan: the nearest precision of the same backend, else none.
    assert "upsampler" not in arts
    config = (tmp_path / "repo" / "gd_unet" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "KIND_GPU" in config
    assert 'default_model_filename: "unet.fp16.plan"' in config
    sampler = (tmp_path / "repo" / "gd_sampler" / "config.pbtxt").read_text()
    assert "upsampler_model" not in sampler


def test_bad_builds_leave_nothing_behind(build_copy, tmp_path):
    out = tmp_path / "repo"
    with pytest.raises(TritonRepoError, match="no UNet engine for precision int8"):
        make_repository(build_copy, out, precision="int8")
    (build_copy / "upsampler.onnx").write_bytes(b"changed after the build")
    with pytest.raises(Exception, match="does not match its manifest"):
        make_repository(build_copy, out)
    assert not out.exists() and not list(tmp_path.glob(".repo.*"))
    out.mkdir()
    with pytest.raises(TritonRepoError, match="exists; pass --force"):
        make_repository(build_copy, out)


def test_a_gradient_graph_with_one_scale_per_call_is_refused(build_copy, tmp_path):
    """Builds exported before per-sample scales: Triton rejects scalar inputs, so say so."""
    data = json.loads((build_copy / "manifest.json").read_text())
    for a in data["artifacts"]:
        for t in a["inputs"]:
            if t["name"] == "scale":
                t["shape"] = []
    write_json_atomic(build_copy / "manifest.json", data)
    with pytest.raises(TritonRepoError, match="scale as one scalar per call.*Export and build"):
        make_repository(build_copy, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_cli(build_dir, tmp_path):
    r = CliRunner().invoke(main, ["triton", str(build_dir), "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "gd_unet: unet.onnx (fp32, onnxruntime)" in r.output
    r = CliRunner().invoke(main, ["triton", str(build_dir), "-o", str(tmp_path / "r")])
    assert r.exit_code != 0 and "--force" in r.output
    r = CliRunner().invoke(
        main, ["triton", str(build_dir), "-o", str(tmp_path / "s"), "--sampler-instances", "0"]
    )
    assert r.exit_code != 0 and "at least 1" in r.output


# -- gd_sampler, with Triton's Python-backend utilities stood in ---------------------------------


class _Server:
    """What Triton does for a BLS call, written out: the engine model's config says a [B, 1]
    tensor reaches the engine as [B]; the engine is the repository's ONNX file."""

    def __init__(self, repo: Path):
        self.engines = {}
        for d in repo.glob("gd_*/1/*.onnx"):
            self.engines[d.parent.parent.name] = OrtBackend(d)
        self.calls: dict[str, int] = {}

    def run(self, model: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine = self.engines[model]
        self.calls[model] = self.calls.get(model, 0) + 1
        feeds = {}
        for name, a in tensors.items():
            if len(engine.inputs[name].shape) == 1:
                assert a.shape[1:] == (1,), (model, name, a.shape)
                a = a.reshape(a.shape[0])
            feeds[name] = a
        return engine(feeds)


def _fake_pb_utils(server: _Server) -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._a = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._a

    class TritonError:
        INVALID_ARG = 3

        def __init__(self, message, code=None):
            self._message, self.code = message, code

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.tensors = {t.name(): t for t in output_tensors}
            self._error = error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs):
            self.model_name, self.outputs = model_name, requested_output_names
            self.inputs = {t.name(): t.as_numpy() for t in inputs}

        def exec(self):
            try:
                out = server.run(self.model_name, self.inputs)
            except Exception as e:
                return InferenceResponse(error=TritonError(str(e)))
            return InferenceResponse([Tensor(n, out[n]) for n in self.outputs])

    pb.Tensor, pb.TritonError = Tensor, TritonError
    pb.InferenceResponse, pb.InferenceRequest = InferenceResponse, InferenceRequest
    pb.get_input_tensor_by_name = lambda r, name: r.get(name)
    pb.get_output_tensor_by_name = lambda r, name: r.tensors.get(name)
    return pb


def _request(pb, **values):
    dtypes = {"labels": np.int64, "num_samples": np.int32, "scale": np.float32,
              "steps": np.int32, "seed": np.int64, "first_index": np.int64}  # fmt: skip
    return {
        k: pb.Tensor(k, np.array(v if isinstance(v, list) else [v], dtypes.get(k, object)))
        for k, v in values.items()
    }


def _open_sampler(repo: Path, monkeypatch):
    """gd_sampler of `repo` initialised as Triton would, over stand-in BLS calls."""
    server = _Server(repo)
    pb = _fake_pb_utils(server)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    from runtime.triton import TritonPythonModel

    config = (repo / "gd_sampler" / "config.pbtxt").read_text()
    params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', config))
    model = TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(
                {"parameters": {k: {"string_value": v} for k, v in params.items()}}
            ),
            "model_repository": str(repo / "gd_sampler"),
            "model_version": "1",
        }
    )
    return model, pb, server


@pytest.fixture
def sampler_model(repo, monkeypatch):
    model, pb, server = _open_sampler(repo, monkeypatch)
    yield model, pb, server
    model.finalize()


def test_sampler_gives_the_in_process_images(sampler_model, build_dir):
    model, pb, server = sampler_model
    requests = [
        _request(pb, labels=[1, 2, 3], scale=2.0, steps=4, seed=7),
        _request(pb, labels=[5], scale=0.0, steps=3, seed=1, first_index=9),
    ]
    responses = model.execute(requests)
    assert not any(r.has_error() for r in responses), [
        r.error().message() for r in responses if r.has_error()
    ]
    with Pipeline.from_manifest(build_dir, backend="onnxruntime") as pipe:
        want = [
            pipe.sample([1, 2, 3], scale=2.0, steps="ddim4", seed=7),
            pipe.sample([5], scale=0.0, steps="ddim3", seed=1, first_index=9),
        ]
    for r, w in zip(responses, want):
        np.testing.assert_array_equal(r.tensors["images"].as_numpy(), w.images)
        np.testing.assert_array_equal(r.tensors["labels"].as_numpy(), w.labels)
    assert w.images.shape == (1, 32, 32, 3)  # the cascade ran: base 16 -> upsampler 32
    # 4 + 3 base steps, guided only in the first request, and an upsampler pass for each.
    assert server.calls["gd_unet"] == 7 and server.calls["gd_classifier_grad"] == 4
    assert server.calls["gd_upsampler"] > 0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"labels": [3, 10]}, "class 10 is out of range"),
        ({"labels": [1], "steps": -2}, "steps must be a positive"),
        ({"labels": [1] * 6}, "6 samples requested; one request takes 1..5"),
        ({"scale": 1.0}, "send `labels`"),
        ({"labels": [1], "sampler": "euler"}, "sampler must be one of"),
        ({"labels": [1], "seed": -1}, "must be >= 0"),
        ({"labels": [1], "steps": 2000}, "--steps"),
    ],
)
def test_bad_requests_get_an_error_and_the_model_keeps_serving(sampler_model, values, message):
    model, pb, _ = sampler_model
    bad, good = model.execute([_request(pb, **values), _request(pb, labels=[4], steps=2)])
    assert bad.has_error() and message in bad.error().message()
    assert bad.error().code == pb.TritonError.INVALID_ARG
    assert not good.has_error() and good.tensors["images"].as_numpy().shape == (1, 32, 32, 3)


@pytest.mark.parametrize("role", ["unet", "classifier_grad", "upsampler"])
def test_a_samples_output_does_not_depend_on_its_batch(build_dir, role):
    """A server merges requests into one engine call: each sample's output must not change with
    its neighbours or its position in the batch, or served images would differ from in-process
    ones (the gradient graph sums softmax rows with MatMul, not ReduceSum, for this)."""
    rng = np.random.default_rng(3)
    art = Manifest.load(build_dir).artifact(role, "fp32", "onnxruntime")
    with OrtBackend(build_dir / art.file) as engine:
        n, feeds = 7, {}
        for name, spec in engine.inputs.items():
            shape = (n, *spec.shape[1:])
            if spec.dtype == "int64":
                feeds[name] = rng.integers(0, 10 if name == "y" else 1000, n).astype(np.int64)
            elif name == "scale":
                feeds[name] = rng.uniform(0.5, 4.0, n).astype(np.float32)
            else:
                feeds[name] = rng.standard_normal(shape, dtype=np.float32)
        (out,) = engine.outputs
        whole = engine(feeds)[out]
        for lo, hi in ((0, 1), (1, 2), (3, 6), (2, 7), (5, 6)):
            part = engine({k: v[lo:hi] for k, v in feeds.items()})[out]
            np.testing.assert_array_equal(part, whole[lo:hi], err_msg=f"{role} [{lo}:{hi}]")


def test_a_unet_only_build_serves_by_sample_count(unet_only_build, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    arts = make_repository(unet_only_build, repo)
    assert set(arts) == {"unet"} and not (repo / "gd_classifier_grad").exists()
    model, pb, _ = _open_sampler(repo, monkeypatch)
    (r,) = model.execute([_request(pb, num_samples=2, steps=3, seed=4)])
    assert not r.has_error(), r.error().message()
    with Pipeline.from_manifest(unet_only_build, backend="onnxruntime") as pipe:
        want = pipe.sample(num_samples=2, steps="ddim3", seed=4)
    np.testing.assert_array_equal(r.tensors["images"].as_numpy(), want.images)
    # no classifier: a guidance scale is refused with the reason
    (bad,) = model.execute([_request(pb, num_samples=1, scale=2.0)])
    assert bad.has_error() and "needs a classifier" in bad.error().message()
