"""engine_from_onnx and its pure parts on CPU: the flags per TensorRT version (read from the real
bindings' names), the optimisation profile, the API names used, and the build's control flow over
a fake builder. The end-to-end build against ONNX Runtime needs TensorRT and a GPU (marked trt)."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from export.trt_build import (
    EngineBuildError,
    engine_from_onnx,
    network_flags_for,
    profile_shapes,
    trt_features,
)
from runtime.manifest import TensorSpec
from tests.runtime.test_tensorrt_backend import (
    ROOT,
    TRT_VERSIONS,
    check_names,
    load_api_names,
    make_fake_trt,
    public_methods,
)
from tests.runtime.test_tensorrt_backend import fakes as fakes  # noqa: F401 (fixture)

PRECISIONS = ("fp32", "fp16", "int8")


def features_of(version: str) -> set[str]:
    """The flag names a TensorRT version has, as read from its bindings (tests/data)."""
    return {
        n
        for n in load_api_names()[f"tensorrt {version}"]
        if n.startswith(("NetworkDefinitionCreationFlag.", "BuilderFlag."))
    }


# ---------------------------------------------------------------- network_flags_for


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tensorrt_11_is_strongly_typed_without_precision_flags(precision):
    assert network_flags_for(features_of("11.4.0.106"), precision) == (["STRONGLY_TYPED"], [])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tensorrt_10_3_has_strong_typing_so_the_graph_keeps_its_precision(precision):
    # 10.3 also has BuilderFlag.FP16, but a weakly typed build would let TensorRT run the fp16
    # graph's fp32 islands (GroupNorm, softmax) in fp16: strong typing wins where it exists.
    assert network_flags_for(features_of("10.3.0"), precision) == (["STRONGLY_TYPED"], [])


@pytest.mark.parametrize(
    "precision, builder", [("fp32", []), ("fp16", ["FP16"]), ("int8", ["FP16", "INT8"])]
)
def test_without_strong_typing_precision_comes_from_builder_flags(precision, builder):
    weak = features_of("10.3.0") - {"NetworkDefinitionCreationFlag.STRONGLY_TYPED"}
    assert network_flags_for(weak, precision) == (["EXPLICIT_BATCH"], builder)


def test_a_tensorrt_without_the_flag_or_precision_flags_needs_no_flags():
    future = features_of("11.4.0.106") - {"NetworkDefinitionCreationFlag.STRONGLY_TYPED"}
    assert network_flags_for(future, "fp16") == ([], [])


@pytest.mark.parametrize("version", TRT_VERSIONS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_chosen_flags_exist_in_that_version(version, precision):
    creation, builder = network_flags_for(features_of(version), precision)
    have = features_of(version)
    assert {f"NetworkDefinitionCreationFlag.{f}" for f in creation} <= have
    assert {f"BuilderFlag.{f}" for f in builder} <= have


def test_unknown_precision_and_missing_flags_are_errors():
    with pytest.raises(
        EngineBuildError, match="precision must be one of fp32, fp16, int8, got 'fp8'"
    ):
        network_flags_for(features_of("10.3.0"), "fp8")
    weak_no_int8 = {"BuilderFlag.FP16", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"}
    with pytest.raises(EngineBuildError, match=r"BuilderFlag \['INT8'\]"):
        network_flags_for(weak_no_int8, "int8")


def test_trt_features_reads_both_enums():
    trt = make_fake_trt("10.3.0")
    assert trt_features(trt) == features_of("10.3.0")


# ---------------------------------------------------------------- profile_shapes

UNET = [
    TensorSpec("x", "float32", ("batch", 3, 64, 64)),
    TensorSpec("t", "int64", ("batch",)),
    TensorSpec("y", "int64", ("batch",)),
]
CLASSIFIER_GRAD = [
    TensorSpec("x", "float32", ("batch", 3, 64, 64)),
    TensorSpec("t", "int64", ("batch",)),
    TensorSpec("y", "int64", ("batch",)),
    TensorSpec("scale", "float32", ()),
]


def test_profile_shapes_replace_batch_and_skip_fixed_inputs():
    shapes = profile_shapes(CLASSIFIER_GRAD, {"min": 1, "opt": 4, "max": 16})
    assert shapes == {
        "x": ((1, 3, 64, 64), (4, 3, 64, 64), (16, 3, 64, 64)),
        "t": ((1,), (4,), (16,)),
        "y": ((1,), (4,), (16,)),
    }
    assert "scale" not in shapes


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"min": 2, "opt": 1, "max": 4}, "min=2 opt=1 max=4"),
        ({"min": 1, "opt": 8, "max": 4}, "min=1 opt=8 max=4"),
        ({"min": 0, "opt": 1, "max": 4}, "1 <= min <= opt <= max"),
        ({"min": 1, "max": 4}, "lacks 'opt'"),
        ({"min": 1, "opt": 2.0, "max": 4}, "must be integers"),
    ],
)
def test_bad_batch_ranges_are_refused(batch, message):
    with pytest.raises(EngineBuildError, match=message):
        profile_shapes(UNET, batch)


def test_a_symbolic_dimension_other_than_batch_is_refused():
    spec = TensorSpec("x", "float32", ("batch", 3, "height", 64))
    with pytest.raises(EngineBuildError, match="only the symbolic dimension 'batch'"):
        profile_shapes([spec], {"min": 1, "opt": 1, "max": 2})


def test_build_uses_only_names_every_version_has():
    check_names(ROOT / "export" / "trt_build.py")


# ---------------------------------------------------------------- the build over a fake builder


class FakeTensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)


class FakeNetwork:
    def __init__(self, bits):
        self.bits, self.inputs = bits, []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class FakeParser:
    """Parses a JSON stand-in for a graph: {"inputs": [[name, shape]], "errors": [...]}."""

    def __init__(self, network, logger):
        self._network, self._errors = network, []

    def parse_from_file(self, path):
        graph = json.loads(Path(path).read_text())
        self._errors = graph.get("errors", [])
        self._network.inputs = [FakeTensor(n, s) for n, s in graph.get("inputs", [])]
        return not self._errors

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, i):
        return self._errors[i]


class FakeTimingCache:
    def __init__(self, data):
        self.data = bytes(data)

    def serialize(self):
        return self.data + b"|timed"


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class FakeConfig:
    def __init__(self, trt):
        self._trt = trt
        self.flags = {trt.BuilderFlag.TF32} if hasattr(trt.BuilderFlag, "TF32") else set()
        self.profiles, self.pools, self.cache = [], {}, None
        self.builder_optimization_level = 3

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool.name] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return FakeTimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.data.startswith(b"other-gpu"):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class FakeBuilder:
    def __init__(self, trt, logger):
        self._trt = trt

    def create_network(self, bits):
        return FakeNetwork(bits)

    def create_builder_config(self):
        return FakeConfig(self._trt)

    def create_optimization_profile(self):
        return FakeProfile()

    def build_serialized_network(self, network, config):
        if self._trt.fail_build:
            return None
        record = {
            "network_bits": network.bits,
            "flags": sorted(f.name for f in config.flags),
            "profiles": [p.shapes for p in config.profiles],
            "pools": config.pools,
            "level": config.builder_optimization_level,
            "cache_loaded": config.cache.data.decode() if config.cache else None,
        }
        return json.dumps(record).encode()


def test_fake_builder_only_has_real_names():
    names = set.intersection(*(load_api_names()[f"tensorrt {v}"] for v in TRT_VERSIONS))
    fake = set().union(
        *(public_methods(c) for c in (FakeNetwork, FakeParser, FakeTimingCache, FakeProfile))
    )
    fake |= public_methods(FakeConfig) | public_methods(FakeBuilder) | {"name", "shape"}
    fake |= {"builder_optimization_level"}
    assert fake <= names, sorted(fake - names)


@pytest.fixture
def builder_fakes(fakes, monkeypatch):
    """The fake TensorRT 10.3 of the runtime tests, with a builder and parser."""
    trt, cudart = fakes
    add_builder(trt)
    return trt


def add_builder(trt):
    trt.fail_build = False
    trt.Builder = lambda logger: FakeBuilder(trt, logger)
    trt.OnnxParser = FakeParser


def fake_graph(tmp_path: Path, inputs=UNET, errors=()) -> Path:
    path = tmp_path / "unet.onnx"
    graph = {"inputs": [[s.name, [-1 if d == "batch" else d for d in s.shape]] for s in inputs]}
    path.write_text(json.dumps({**graph, "errors": list(errors)}))
    return path


BATCH = {"min": 1, "opt": 2, "max": 8}


def build(tmp_path, **kw):
    args = dict(batch=BATCH, inputs=UNET, precision="fp16", log=lambda s: None)
    return engine_from_onnx(fake_graph(tmp_path), tmp_path / "unet.plan", **(args | kw))


def test_a_build_writes_the_plan_and_returns_the_manifest_fields(builder_fakes, tmp_path):
    trt = builder_fakes
    extra = build(tmp_path, workspace_gb=2.5, opt_level=5)
    record = json.loads((tmp_path / "unet.plan").read_text())
    assert record["network_bits"] == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert record["flags"] == []  # no precision flags, TF32 cleared
    assert record["profiles"] == [
        {"x": [[1, 3, 64, 64], [2, 3, 64, 64], [8, 3, 64, 64]],
         "t": [[1], [2], [8]], "y": [[1], [2], [8]]}
    ]  # fmt: skip
    assert record["pools"] == {"WORKSPACE": int(2.5 * 2**30)} and record["level"] == 5
    assert extra.pop("build_seconds") >= 0
    assert extra == {
        "tensorrt_version": "10.3.0", "gpu_name": "Fake GPU", "compute_capability": "8.7",
        "precision": "fp16", "strongly_typed": True, "builder_optimization_level": 5,
    }  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.plan"]


def test_weakly_typed_tensorrt_gets_the_fp16_flag(builder_fakes, tmp_path):
    trt = builder_fakes
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", ["EXPLICIT_BATCH"], start=0)  # fmt: skip
    extra = build(tmp_path)
    record = json.loads((tmp_path / "unet.plan").read_text())
    assert record["flags"] == ["FP16"] and record["network_bits"] == 1
    assert extra["strongly_typed"] is False


def test_tensorrt_11_builds_strongly_typed_without_builder_flags(fakes, monkeypatch, tmp_path):
    trt11 = make_fake_trt("11.4.0.106", fakes[1])
    add_builder(trt11)
    monkeypatch.setitem(sys.modules, "tensorrt", trt11)
    extra = build(tmp_path, precision="int8")
    record = json.loads((tmp_path / "unet.plan").read_text())
    assert record["flags"] == [] and extra["tensorrt_version"] == "11.4.0.106"
    assert record["network_bits"] == 1 << int(trt11.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def test_the_timing_cache_is_read_and_written_back(builder_fakes, tmp_path):
    cache = tmp_path / "timing.cache"
    build(tmp_path, timing_cache=cache)
    assert cache.read_bytes() == b"|timed"  # created from an empty cache
    build(tmp_path, timing_cache=cache)
    assert json.loads((tmp_path / "unet.plan").read_text())["cache_loaded"] == "|timed"
    assert cache.read_bytes() == b"|timed|timed"


def test_a_timing_cache_from_another_gpu_is_replaced(builder_fakes, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"other-gpu")
    lines = []
    build(tmp_path, timing_cache=cache, log=lines.append)
    assert any("from another TensorRT version or GPU" in line for line in lines)
    assert cache.read_bytes() == b"|timed"


def test_parser_errors_are_listed_and_nothing_is_written(builder_fakes, tmp_path):
    graph = fake_graph(
        tmp_path, errors=["node Conv_3: unsupported auto_pad", "node Foo: no importer"]
    )
    with pytest.raises(EngineBuildError) as e:
        engine_from_onnx(graph, tmp_path / "unet.plan", batch=BATCH, inputs=UNET, precision="fp16")
    assert "cannot parse" in str(e.value) and "(2 error(s))" in str(e.value)
    assert "unsupported auto_pad" in str(e.value) and "no importer" in str(e.value)
    assert not (tmp_path / "unet.plan").exists()


def test_a_failed_build_leaves_the_old_plan(builder_fakes, tmp_path):
    builder_fakes.fail_build = True
    (tmp_path / "unet.plan").write_bytes(b"old plan")
    with pytest.raises(EngineBuildError, match=r"could not build unet.onnx \(fp16, batch 1\.\.8\)"):
        build(tmp_path, timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "unet.plan").read_bytes() == b"old plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.plan"]


def test_graph_and_manifest_inputs_must_agree(builder_fakes, tmp_path):
    graph = fake_graph(tmp_path, inputs=UNET[:2])
    with pytest.raises(EngineBuildError, match=r"has inputs \['t', 'x'\], the manifest lists"):
        engine_from_onnx(graph, tmp_path / "unet.plan", batch=BATCH, inputs=UNET, precision="fp16")


def test_bad_arguments_fail_before_tensorrt_is_needed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    graph = fake_graph(tmp_path)
    with pytest.raises(EngineBuildError, match="1 <= min <= opt <= max"):
        engine_from_onnx(graph, tmp_path / "p.plan", batch={"min": 4, "opt": 2, "max": 8},
                         inputs=UNET, precision="fp16")  # fmt: skip
    with pytest.raises(EngineBuildError, match="got 'bf8'"):
        engine_from_onnx(graph, tmp_path / "p.plan", batch=BATCH, inputs=UNET, precision="bf8")
    with pytest.raises(EngineBuildError, match="does not exist; run `gdexport export` first"):
        engine_from_onnx(tmp_path / "no.onnx", tmp_path / "p.plan", batch=BATCH, inputs=UNET,
                         precision="fp16")  # fmt: skip
    with pytest.raises(EngineBuildError, match=r"pip install 'gdexport\[trt\]'"):
        engine_from_onnx(graph, tmp_path / "p.plan", batch=BATCH, inputs=UNET, precision="fp16")


# ---------------------------------------------------------------- on a GPU with TensorRT

TINY_UNET = {
    "image_size": 16, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
    "attention_resolutions": [2], "channel_mult": [1, 2], "num_head_channels": 32,
}  # fmt: skip


@pytest.mark.trt
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_tiny_unet_engine_matches_onnx_runtime(tmp_path, cuda_graph):
    import torch

    from export import build_model
    from export.graphs import graph_io
    from export.onnx_export import export_onnx
    from runtime.backends.onnxruntime import OrtBackend
    from runtime.backends.tensorrt import TrtBackend

    torch.manual_seed(0)
    model = build_model(TINY_UNET, kind="unet")
    onnx_path = tmp_path / "unet.onnx"
    export_onnx("unet", model, onnx_path, batch_max=4)
    inputs, _ = graph_io(onnx_path)
    batch = {"min": 1, "opt": 2, "max": 4}
    extra = engine_from_onnx(onnx_path, tmp_path / "unet.plan", batch=batch, inputs=inputs,
                             precision="fp32", timing_cache=tmp_path / "timing.cache")  # fmt: skip
    assert extra["strongly_typed"] and (tmp_path / "timing.cache").stat().st_size > 0
    rng = np.random.default_rng(0)
    with (
        OrtBackend(onnx_path) as ort,
        TrtBackend(tmp_path / "unet.plan", cuda_graph=cuda_graph) as trt,
    ):
        assert trt.batch == batch and set(trt.inputs) == {"x", "t"}
        for b in (1, 3, 3, 4):
            feeds = {
                "x": rng.standard_normal((b, 3, 16, 16)).astype(np.float32),
                "t": rng.integers(0, 1000, b).astype(np.int64),
            }
            want, got = ort(feeds)["out"], trt(feeds)["out"]
            assert got.shape == (b, 6, 16, 16)
            err = float(np.abs(got - want).max())
            assert err < 1e-3, f"batch {b}: max abs difference {err:.2e} between TensorRT and ORT"
