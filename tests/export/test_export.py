"""`export_build` and the graphs it writes: each graph against the PyTorch reference in ONNX Runtime
(batch 1 to batch_max), the classifier gradient against torch.autograd, the TensorRT op check,
and builds that fail or are interrupted leaving no manifest behind (or the previous one intact)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402

from export.exporter import ExportError, export_build  # noqa: E402
from export.loading import CheckpointError, build_model  # noqa: E402
from export.onnx_export import classifier_gradient  # noqa: E402
from export.spec import SpecError  # noqa: E402
from export.trt_ops import SUPPORTED_OPS, check_tensorrt_ops  # noqa: E402
from runtime.backends.onnxruntime import OrtBackend  # noqa: E402
from runtime.manifest import MANIFEST_NAME  # noqa: E402
from tests.builds import (  # noqa: E402
    BATCH_MAX,
    FILES,
    NUM_CLASSES,
    SPECS,
    UNET,
    make_build,
    sources,
)

EXPECTED_FILES = {f: role for files in FILES.values() for f, role in files.items()}


def _inputs(batch: int, size: int, seed: int, *, low_res: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {
        "x": rng.standard_normal((batch, 3, size, size), dtype=np.float32),
        "t": rng.integers(0, 1000, batch).astype(np.int64),
        "y": rng.integers(0, NUM_CLASSES, batch).astype(np.int64),
    }
    if low_res is not None:
        feeds["low_res"] = rng.uniform(-1, 1, (batch, 3, low_res, low_res)).astype(np.float32)
    return feeds


def _run(path: Path, feeds: dict) -> np.ndarray:
    with OrtBackend(path) as backend:
        outs = backend({k: v for k, v in feeds.items() if k in backend.inputs})
    (out,) = outs.values()
    return out


def _t(a: np.ndarray):
    return torch.from_numpy(a)


# -- the graphs --------------------------------------------------------------------------------


def test_every_component_exported_and_passes_the_trt_op_check(build_dir):
    manifest = json.loads((build_dir / MANIFEST_NAME).read_text())
    assert {a["file"]: a["role"] for a in manifest["artifacts"]} == EXPECTED_FILES
    for file in EXPECTED_FILES:
        model = onnx.load(str(build_dir / file))
        onnx.checker.check_model(model, full_check=True)
        assert check_tensorrt_ops(model) == [], file


@pytest.mark.parametrize("batch", [1, BATCH_MAX])
def test_unet_matches_the_reference_at_batch_1_and_batch_max(build_dir, reference_models, batch):
    feeds = _inputs(batch, UNET["image_size"], seed=batch)
    got = _run(build_dir / "unet.onnx", feeds)
    with torch.no_grad():
        want = reference_models["unet"](_t(feeds["x"]), _t(feeds["t"]), _t(feeds["y"])).numpy()
    assert got.shape == want.shape == (batch, 6, 16, 16)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch", [1, BATCH_MAX])
def test_upsampler_matches_the_reference(build_dir, reference_models, batch):
    up = SPECS["upsampler"]
    feeds = _inputs(batch, up["image_size"], seed=100 + batch, low_res=up["small_size"])
    got = _run(build_dir / "upsampler.onnx", feeds)
    with torch.no_grad():
        want = reference_models["upsampler"](
            _t(feeds["x"]), _t(feeds["t"]), _t(feeds["low_res"]), _t(feeds["y"])
        ).numpy()
    assert got.shape == want.shape == (batch, 6, 32, 32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_classifier_logits_match_the_reference(build_dir, reference_models):
    feeds = _inputs(5, 16, seed=7)
    got = _run(build_dir / "classifier.onnx", feeds)
    with torch.no_grad():
        want = reference_models["classifier"](_t(feeds["x"]), _t(feeds["t"])).numpy()
    assert got.shape == (5, NUM_CLASSES)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def _autograd_gradient(classifier, x, t, y, scale) -> np.ndarray:
    """scale * d/dx sum_b log softmax(classifier(x, t))[b, y_b], written out with autograd."""
    x = _t(x).clone().requires_grad_(True)
    with torch.enable_grad():
        log_probs = torch.log_softmax(classifier(x, _t(t)), dim=-1)
        chosen = log_probs[torch.arange(len(y)), _t(y)].sum()
        (grad,) = torch.autograd.grad(chosen, x)
    return (grad * torch.as_tensor(scale).reshape(-1, 1, 1, 1)).numpy()


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_classifier_gradient_matches_autograd(build_dir, reference_models, batch):
    clf = reference_models["classifier"]
    feeds = _inputs(batch, 16, seed=200 + batch)
    feeds["scale"] = np.full(batch, 2.5, np.float32)
    got = _run(build_dir / "classifier_grad.onnx", feeds)
    want = _autograd_gradient(clf, feeds["x"], feeds["t"], feeds["y"], 2.5)
    assert got.shape == want.shape == (batch, 3, 16, 16)
    assert np.abs(want).max() > 0
    # Relative to the gradient's size: the gradients of a random classifier are ~1e-2.
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    # The reference the exporter traced agrees with the hand-written one.
    ref = classifier_gradient(clf)(*(_t(feeds[k]) for k in ("x", "t", "y", "scale"))).numpy()
    np.testing.assert_allclose(ref, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_classifier_gradient_is_linear_in_scale_and_per_sample(build_dir):
    feeds = _inputs(4, 16, seed=9)
    with OrtBackend(build_dir / "classifier_grad.onnx") as grad:
        g1 = grad({**feeds, "scale": np.ones(4, np.float32)})["grad"]
        g3 = grad({**feeds, "scale": np.full(4, 3.0, np.float32)})["grad"]
        mixed = grad({**feeds, "scale": np.array([0, 1, 2, -0.5], np.float32)})["grad"]
        one = grad({k: v[2:3] for k, v in feeds.items()} | {"scale": np.ones(1, np.float32)})
    np.testing.assert_allclose(g3, 3 * g1, rtol=1e-5, atol=1e-9)
    # One scale per sample: requests of different scales can share an engine call.
    want = g1 * np.array([0, 1, 2, -0.5], np.float32)[:, None, None, None]
    np.testing.assert_allclose(mixed, want, rtol=1e-5, atol=1e-9)
    # Each sample's gradient depends on that sample only (the batch does not mix).
    np.testing.assert_allclose(one["grad"][0], g1[2], rtol=0, atol=1e-6 * np.abs(g1).max())


# -- the TensorRT op check ---------------------------------------------------------------------


def _graph(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape=(1, 3, 8, 8), dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_trt_op_check_accepts_a_plain_graph():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Resize", ["r", "", "scales"], ["y"], mode="nearest"),
    ]
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    model = _graph(nodes, [_vi("x")], [_vi("y", (1, 3, 16, 16))], [scales])
    onnx.checker.check_model(model)
    assert check_tensorrt_ops(model) == []


def test_trt_op_check_flags_unsupported_ops():
    assert "Hardmax" not in SUPPORTED_OPS  # the premise of this test
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [
        helper.make_node("Hardmax", ["x"], ["h"], name="hard"),
        helper.make_node("Resize", ["h", "", "scales"], ["y"], mode="cubic", name="up"),
        helper.make_node("Relu", ["y"], ["z"], name="fine"),
    ]
    model = _graph(nodes, [_vi("x")], [_vi("z", (1, 3, 16, 16))], [scales])
    onnx.checker.check_model(model)
    problems = check_tensorrt_ops(model)
    assert [(p.node, p.op_type) for p in problems] == [("hard", "Hardmax"), ("up", "Resize")]
    assert "not supported" in problems[0].why
    assert "cubic" in problems[1].why and "cubic" in str(problems[1])


def test_trt_op_check_flags_einsum_with_ellipsis():
    def einsum(equation):
        node = helper.make_node("Einsum", ["a", "b"], ["c"], equation=equation, name="e")
        return _graph([node], [_vi("a", (2, 3, 4)), _vi("b", (2, 4, 5))], [_vi("c", (2, 3, 5))])

    assert check_tensorrt_ops(einsum("bij,bjk->bik")) == []
    (problem,) = check_tensorrt_ops(einsum("...ij,...jk->...ik"))
    assert problem.op_type == "Einsum" and "ellipsis" in problem.why


def test_trt_op_check_flags_opset_custom_domains_and_runtime_weights():
    x, w = _vi("x"), _vi("w", (3, 3, 1, 1))
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = _graph([conv], [x, w], [_vi("y")], opset=21)
    whys = [str(p) for p in check_tensorrt_ops(model)]
    assert any("opset 21 > 20" in s for s in whys)
    assert any("conv" in s and "weights must be an initializer" in s for s in whys)
    custom = helper.make_node("Fancy", ["x"], ["y"], domain="com.example", name="f")
    model = _graph([custom], [x], [_vi("y")])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    whys = [str(p) for p in check_tensorrt_ops(model)]
    assert any("custom domain 'com.example'" in s for s in whys)
    assert any("custom-domain op (com.example)" in s for s in whys)


# -- failed and interrupted builds --------------------------------------------------------------


class FakeExport:
    """Stands in for export_onnx: copies the session build's graph for the file (so the rest of
    export_build runs for real, parity included), raising `exc` at call number `fail_at`."""

    def __init__(self, build_dir: Path, fail_at: int | None = None, exc=KeyboardInterrupt):
        self.build_dir, self.fail_at, self.exc = build_dir, fail_at, exc
        self.calls: list[str] = []

    def __call__(self, kind, model, path, *, batch_max=64, opset=18):
        path = Path(path)
        self.calls.append(path.name)
        if len(self.calls) == self.fail_at:
            raise self.exc(f"stopped while exporting {path.name}")
        shutil.copyfile(self.build_dir / path.name, path)
        return [path.name]


def _snapshot(folder: Path) -> dict[str, str]:
    """name -> sha256 of every entry ("dir" for a folder)."""
    return {
        p.name: "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
    }


def _assert_consistent(folder: Path) -> None:
    """No staging folder or temporary file, and a manifest (if any) whose files all match."""
    names = {p.name for p in folder.iterdir()}
    assert not [n for n in names if n.startswith(".")], names
    if MANIFEST_NAME not in names:
        return
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for a in manifest["artifacts"]:
        data = (folder / a["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == a["sha256"], a["file"]


def test_manifest_is_written_last_over_complete_files(build_dir, tmp_path, monkeypatch):
    out = tmp_path / "build"
    monkeypatch.setattr("export.onnx_export.export_onnx", FakeExport(build_dir))
    seen = {}
    import runtime.manifest as manifest_module

    real_write = manifest_module.write_json_atomic

    def spy(path, data):
        # At this moment every graph is in place under its final name, and no manifest exists.
        seen["files"] = _snapshot(Path(path).parent)
        real_write(path, data)

    monkeypatch.setattr(manifest_module, "write_json_atomic", spy)
    manifest = make_build(out)
    staged = {n for n in seen["files"] if n.startswith(".staging-")}
    assert set(seen["files"]) - staged == set(EXPECTED_FILES)
    for a in manifest["artifacts"]:
        assert seen["files"][a["file"]] == a["sha256"]
    assert json.loads((out / MANIFEST_NAME).read_text()) == json.loads(json.dumps(manifest))
    assert set(_snapshot(out)) == {*EXPECTED_FILES, MANIFEST_NAME}
    assert len(manifest["parity"]["components"]) == len(EXPECTED_FILES)
    _assert_consistent(out)


@pytest.mark.parametrize("previous", [False, True], ids=["empty-dir", "previous-build"])
def test_interrupted_export_leaves_no_manifest_and_no_staging(
    build_dir, tmp_path, monkeypatch, previous
):
    out = tmp_path / "build"
    if previous:
        shutil.copytree(build_dir, out)
    before = _snapshot(out) if previous else {}
    fake = FakeExport(build_dir, fail_at=2)
    monkeypatch.setattr("export.onnx_export.export_onnx", fake)
    with pytest.raises(KeyboardInterrupt):
        make_build(out, check=False)
    assert fake.calls == ["unet.onnx", "classifier_grad.onnx"]
    # The previous build is untouched; a fresh folder holds nothing (in particular no manifest).
    assert _snapshot(out) == before
    _assert_consistent(out)


def test_interrupted_commit_never_leaves_a_stale_manifest(build_dir, tmp_path, monkeypatch):
    """An interruption while the new files replace the old: the old manifest is already gone."""
    out = shutil.copytree(build_dir, tmp_path / "build")
    monkeypatch.setattr("export.onnx_export.export_onnx", FakeExport(build_dir))
    real_replace, moved = os.replace, []

    def replace(src, dst):
        if Path(src).parent.name.startswith(".staging-"):
            moved.append(Path(dst).name)
            if len(moved) == 2:
                raise KeyboardInterrupt("stopped while moving files in")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        make_build(out, check=False)
    assert len(moved) == 2
    assert not (out / MANIFEST_NAME).exists()
    _assert_consistent(out)


def test_failed_parity_writes_nothing(build_dir, tmp_path, monkeypatch):
    """A graph that does not match its reference (here: another seed's weights) is refused."""
    out = shutil.copytree(build_dir, tmp_path / "build")
    before = _snapshot(out)
    monkeypatch.setattr("export.onnx_export.export_onnx", FakeExport(build_dir))
    wrong = sources(("unet",))
    wrong["unet"].seed = 5
    with pytest.raises(
        ExportError, match=r"parity check failed for unet\.onnx .*nothing was written"
    ):
        export_build(out, wrong, batch_max=BATCH_MAX, log=lambda line: None)
    assert _snapshot(out) == before
    _assert_consistent(out)


def test_missing_checkpoint_fails_before_writing(tmp_path):
    out = tmp_path / "build"
    src = sources(("unet",))
    src["unet"].checkpoint = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=r"nope\.pt does not exist"):
        export_build(out, src, log=lambda line: None)
    assert not out.exists()


def test_wrong_preset_for_a_checkpoint_fails_before_writing(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(build_model(UNET).state_dict(), ckpt)
    out = tmp_path / "build"
    from export.exporter import ComponentSource

    with pytest.raises(CheckpointError, match=r"preset adm-64 \(unet\) expects \d+") as e:
        export_build(out, {"unet": ComponentSource("adm-64", ckpt)}, log=lambda line: None)
    n_tensors = len(build_model(UNET).state_dict())
    assert f"has {n_tensors} tensors" in str(e.value)
    assert not out.exists()


def test_unwritable_build_folder(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "build"
    with pytest.raises(ExportError, match=r"cannot write to build folder .*file/build"):
        export_build(out, sources(("unet",)), log=lambda line: None)
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize(
    "components, options, error, match",
    [
        ({}, {}, ExportError, "nothing to export"),
        (None, {"batch_min": 4, "batch_opt": 2}, ExportError, "1 <= min <= opt <= max"),
        ({"unet": {**UNET, "wings": 2}}, {}, SpecError, "unknown constructor argument"),
    ],
)
def test_bad_arguments_fail_before_writing(tmp_path, components, options, error, match):
    from export.exporter import ComponentSource

    comps = (
        sources(("unet",))
        if components is None
        else {k: ComponentSource(v) for k, v in components.items()}
    )
    out = tmp_path / "build"
    with pytest.raises(error, match=match):
        export_build(out, comps, log=lambda line: None, **options)
    assert not out.exists()


# -- bad weights and interrupted builds ----------------------------------------------------------


def test_a_nan_weight_fails_the_export_and_keeps_the_good_build(build_dir, tmp_path):
    from export.exporter import ComponentSource

    out = shutil.copytree(build_dir, tmp_path / "build")
    before = _snapshot(out)
    model = build_model(UNET)
    sd = model.state_dict()
    key = next(k for k in sd if k.endswith("in_layers.2.weight"))
    sd[key].view(-1)[3] = float("nan")
    ckpt = tmp_path / "nan.pt"
    torch.save(sd, ckpt)
    with pytest.raises(ExportError, match=rf"non-finite value\(s\) \(NaN or inf\) in {key}"):
        export_build(out, {"unet": ComponentSource(UNET, ckpt)}, log=lambda line: None)
    assert _snapshot(out) == before


def test_non_finite_engine_outputs_fail_the_graph(build_dir, tmp_path, reference_models):
    """Finite weights whose engine still gives inf (here: a huge weight overflowing) fail the loop."""
    from export.graphs import EngineOptions, StagedGraph, finish_graph

    model = build_model(UNET)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("out.2.weight")).fill_(3e38)
    staging = tmp_path / "staging"
    staging.mkdir()
    from export.onnx_export import export_onnx

    export_onnx("unet", model, staging / "unet.onnx", batch_max=4)
    graph = StagedGraph("unet", "fp32", staging / "unet.onnx", tol=1e-4)
    with pytest.raises(ExportError, match="non-finite outputs"):
        finish_graph(graph, model, staging, {"min": 1, "opt": 1, "max": 4}, EngineOptions(),
                     log=lambda line: None)  # fmt: skip


def test_upsampler_constructor_arguments_need_small_size(tmp_path):
    from export.exporter import ComponentSource

    up = {k: v for k, v in SPECS["upsampler"].items() if k != "small_size"}
    with pytest.raises(SpecError, match=r'need "small_size", the low-res input size'):
        export_build(tmp_path / "b", {"upsampler": ComponentSource(up)}, log=lambda line: None)
    assert not (tmp_path / "b").exists()


def test_staging_left_by_a_killed_build_is_removed_by_the_next(build_dir, tmp_path, monkeypatch):
    import subprocess
    import sys

    out = shutil.copytree(build_dir, tmp_path / "build")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = out / f".staging-{dead.stdout.strip()}-abc123"
    stale.mkdir()
    (stale / "unet.onnx").write_bytes(b"half-written")
    mine = out / f".staging-{os.getpid()}-live"  # a running build's: left alone
    mine.mkdir()
    monkeypatch.setattr("export.onnx_export.export_onnx", FakeExport(build_dir))
    make_build(out)
    assert not stale.exists() and mine.exists()
