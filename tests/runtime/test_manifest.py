"""The manifest of a real build against the files it describes, read independently (hashlib,
onnx.load), and `Manifest`'s refusals of folders it cannot trust."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat

import pytest

from runtime.manifest import MANIFEST_NAME, Manifest, ManifestError, write_json_atomic
from tests.builds import BATCH_MAX, FILES, NUM_CLASSES, SEEDS, SPECS

EXPECTED_FILES = {f: role for files in FILES.values() for f, role in files.items()}


@pytest.fixture(scope="module")
def manifest(build_dir) -> dict:
    return json.loads((build_dir / MANIFEST_NAME).read_text())


def _onnx_io(path) -> tuple[list[dict], list[dict]]:
    """Graph inputs (initializers excluded) and outputs as {name, dtype, shape}, from onnx.load."""
    onnx = pytest.importorskip("onnx")
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}

    def describe(v) -> dict:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {
            "name": v.name,
            "dtype": str(tensor_dtype_to_np_dtype(t.elem_type)),
            "shape": [d if isinstance(d, int) else "batch" for d in dims],
            "dims": dims,
        }

    inputs = [describe(i) for i in model.graph.input if i.name not in inits]
    return inputs, [describe(o) for o in model.graph.output]


def test_build_folder_holds_the_graphs_and_the_manifest_only(build_dir):
    # No staging folder, no temporary manifest, nothing half-written. (`openvino_cache/` is the
    # runtime's compiled-model cache, made by the first OpenVINO run on this build, if any.)
    names = sorted(p.name for p in build_dir.iterdir() if p.name != "openvino_cache")
    assert names == sorted([*EXPECTED_FILES, MANIFEST_NAME])


def test_sha256_matches_the_files(build_dir, manifest):
    assert {a["file"]: a["role"] for a in manifest["artifacts"]} == EXPECTED_FILES
    for a in manifest["artifacts"]:
        data = (build_dir / a["file"]).read_bytes()
        assert a["sha256"] == hashlib.sha256(data).hexdigest(), a["file"]
        assert a["bytes"] == len(data)
        assert "external_data" not in a  # tiny graphs keep their weights inline


def test_io_matches_the_onnx_graphs(build_dir, manifest):
    for a in manifest["artifacts"]:
        inputs, outputs = _onnx_io(build_dir / a["file"])
        for recorded, actual in ((a["inputs"], inputs), (a["outputs"], outputs)):
            assert [t["name"] for t in recorded] == [t["name"] for t in actual], a["file"]
            for r, t in zip(recorded, actual):
                assert r["dtype"] == t["dtype"], (a["file"], r)
                assert r["shape"] == t["shape"], (a["file"], r, t["dims"])
        # Every tensor is batched along a symbolic first axis, the guidance scale included (one
        # per sample, so Triton can batch the gradient engine).
        for t in inputs + outputs:
            assert t["shape"][0] == "batch" and isinstance(t["dims"][0], str), t
            if t["name"] == "scale":
                assert t["shape"] == ["batch"] and t["dtype"] == "float32"


def test_io_names_shapes_and_dtypes_per_role(manifest):
    """What the runtime feeds each role, written out from the specs."""
    size, up = SPECS["unet"]["image_size"], SPECS["upsampler"]["image_size"]
    small = SPECS["upsampler"]["small_size"]
    img = lambda s: ["batch", 3, s, s]  # noqa: E731
    vec = ["batch"]
    t, y = ("t", "int64", vec), ("y", "int64", vec)
    xty = [("x", "float32", img(size)), t, y]
    want = {
        "unet": (
            xty,
            [("out", "float32", ["batch", 6, size, size])],
        ),
        "classifier_grad": (
            [*xty, ("scale", "float32", ["batch"])],
            [("grad", "float32", img(size))],
        ),
        "classifier": (
            [("x", "float32", img(size)), t],
            [("logits", "float32", ["batch", NUM_CLASSES])],
        ),
        "upsampler": (
            [("x", "float32", img(up)), t, ("low_res", "float32", img(small)), y],
            [("out", "float32", ["batch", 6, up, up])],
        ),
    }
    for a in manifest["artifacts"]:
        got_in = [(t["name"], t["dtype"], t["shape"]) for t in a["inputs"]]
        got_out = [(t["name"], t["dtype"], t["shape"]) for t in a["outputs"]]
        assert (got_in, got_out) == want[a["role"]], a["file"]


def test_batch_range_opset_and_format(build_dir, manifest):
    onnx = pytest.importorskip("onnx")
    assert manifest["format"] == "gdexport-manifest" and manifest["version"] == 1
    for a in manifest["artifacts"]:
        assert a["batch"] == {"min": 1, "opt": 1, "max": BATCH_MAX}
        assert (a["precision"], a["backend"], a["format"]) == ("fp32", "onnxruntime", "onnx")
        model = onnx.load(str(build_dir / a["file"]))
        default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        assert default == [a["opset"]], a["file"]
        assert a["trt_op_check"] == "pass"


def test_tool_versions(manifest):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    tools = manifest["tools"]
    assert tools["python"] == platform.python_version()
    assert tools["torch"] == torch.__version__
    assert tools["onnx"] == onnx.__version__
    assert tools["onnxruntime"] == onnxruntime.__version__
    assert tools["gdexport"] != ""


def test_components_record_specs_seeds_and_diffusion(manifest):
    comps = manifest["components"]
    assert set(comps) == {"unet", "classifier", "upsampler"}
    for name, c in comps.items():
        spec = SPECS[name]
        assert c["weights"] == {"random_seed": SEEDS[name]}
        assert c["image_size"] == spec["image_size"]
        assert c["num_classes"] == NUM_CLASSES
        assert c["diffusion"] == {
            "diffusion_steps": 1000,
            "noise_schedule": spec["noise_schedule"],
            "learn_sigma": name != "classifier",
        }
    assert comps["upsampler"]["low_res_size"] == SPECS["upsampler"]["small_size"]
    assert comps["unet"]["low_res_size"] is None
    assert manifest["sampling"]["scale"] == 1.0  # a classifier, no recommended scale


def test_parity_rows_one_per_graph_within_tolerance(manifest):
    rows = {r["artifact"]: r for r in manifest["parity"]["components"]}
    assert set(rows) == set(EXPECTED_FILES)
    for file, r in rows.items():
        assert r["role"] == EXPECTED_FILES[file]
        assert r["precision"] == "fp32" and r["tol"] == 1e-4
        assert r["passed"] is True and 0 <= r["max_abs"] <= r["tol"], r
        assert r["mean_abs"] <= r["max_abs"] and r["ref_max"] > 0
        want = [1, 4, 16] if r["role"] == "classifier_grad" else [1, 3]
        assert r["batches"] == want


def test_manifest_is_as_readable_as_the_graphs(build_dir):
    graph_mode = stat.S_IMODE((build_dir / "unet.onnx").stat().st_mode)
    manifest_mode = stat.S_IMODE((build_dir / MANIFEST_NAME).stat().st_mode)
    assert manifest_mode & 0o044 == graph_mode & 0o044


# -- Manifest: loading and verifying ------------------------------------------------------------


def test_load_from_folder_manifest_or_engine_path(build_dir):
    for path in (build_dir, build_dir / MANIFEST_NAME, build_dir / "unet.onnx"):
        m = Manifest.load(path)
        assert m.folder == build_dir
        assert {a.file for a in m.artifacts} == set(EXPECTED_FILES)
    m = Manifest.load(build_dir)
    unet = m.artifact("unet")
    assert unet.file == "unet.onnx" and unet.extra["trt_op_check"] == "pass"
    assert m.artifact("unet", precision="fp16") is None
    assert m.verify(unet) == build_dir / "unet.onnx"


def test_folder_without_manifest_is_not_a_build(tmp_path):
    (tmp_path / "unet.onnx").write_bytes(b"graph")
    with pytest.raises(ManifestError, match="no manifest.json in .*interrupted build"):
        Manifest.load(tmp_path / "unet.onnx")


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "other", "version": 1}', "is not a gdexport"),
    ],
)
def test_bad_manifest_files(tmp_path, text, match):
    (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(ManifestError, match=match):
        Manifest.load(tmp_path)


def test_verify_catches_changed_and_missing_files(build_copy):
    m = Manifest.load(build_copy)
    grad = m.artifact("classifier_grad")
    path = build_copy / grad.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"does not match its manifest \(sha256") as e:
        m.verify(grad)
    assert hashlib.sha256(bytes(data)).hexdigest()[:12] in str(e.value)
    os.unlink(path)
    with pytest.raises(ManifestError, match="is missing, though manifest.json lists it"):
        m.verify(grad)
    with pytest.raises(ManifestError, match=r"other\.onnx is not listed .*unet\.onnx"):
        m.artifact_for_file(build_copy / "other.onnx")


def test_write_json_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / MANIFEST_NAME
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": 2, "bad": object()})  # fails halfway through json.dump
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]  # no temporary file left
    write_json_atomic(path, {"a": 3})
    assert json.loads(path.read_text()) == {"a": 3}


# -- validation: a malformed manifest names the key, never a raw KeyError / AttributeError ------


def _edited(build_copy, edit) -> str:
    """Apply `edit` to the copy's manifest data (a list it returns replaces it); the load error."""
    path = build_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    result = edit(data)
    data = result if isinstance(result, list) else data
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as e:
        Manifest.load(build_copy)
    return str(e.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["artifacts"][0].pop("sha256"), r"artifacts\[0\] \(unet.onnx\).'sha256' is missing"),
        (lambda d: d.pop("components"), r"'components' is missing"),
        (lambda d: d["components"]["unet"].pop("diffusion"), r"components.unet.'diffusion' is missing"),
        (lambda d: d["sampling"].update(scale="abc"), r"sampling.'scale' must be int/float"),
        (lambda d: d["sampling"].update(scale=-1), r"sampling.'scale' must be >= 0"),
        (lambda d: [d], r"holds a JSON list, not an object"),
        (lambda d: d["artifacts"][1].update(role="vae"), r"'role' must be one of unet"),
        (lambda d: d["artifacts"][0].update(batch={"min": 4, "opt": 2, "max": 8}), r"1 <= min <= opt <= max"),
        (lambda d: d["artifacts"][0].update(sha256="xyz"), r"must be 64 hex digits"),
        (lambda d: d["components"]["upsampler"].pop("low_res_size"), r"'low_res_size' is missing"),
    ],
)  # fmt: skip
def test_malformed_manifest_names_the_key(build_copy, edit, message):
    err = _edited(build_copy, edit)
    assert "rebuild the folder" in err
    assert re.search(message, err), err


def test_newer_manifest_version_says_a_newer_gdexport_wrote_it(build_copy):
    err = _edited(build_copy, lambda d: d.update(version=d["version"] + 1))
    assert "written by a newer gdexport" in err and "upgrade gdexport" in err


@pytest.mark.parametrize("file", ["../other/unet.onnx", "/etc/passwd", "sub/../../unet.onnx"])
def test_artefact_paths_outside_the_build_are_refused(build_copy, tmp_path, file):
    """Even with a matching sha256: a manifest only names files of its own build."""
    outside = tmp_path / "other"
    outside.mkdir(exist_ok=True)
    (outside / "unet.onnx").write_bytes((build_copy / "unet.onnx").read_bytes())
    path = build_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["artifacts"][0]["file"] = file
    path.write_text(json.dumps(data))
    m = Manifest.load(build_copy)
    with pytest.raises(ManifestError, match="not a path inside the build folder"):
        m.verify(m.artifacts[0])


def test_symlink_out_of_the_build_is_refused(build_copy, tmp_path):
    target = tmp_path / "elsewhere.onnx"
    os.replace(build_copy / "unet.onnx", target)  # same bytes, same sha256
    os.symlink(target, build_copy / "unet.onnx")
    m = Manifest.load(build_copy)
    with pytest.raises(ManifestError, match="outside the build folder"):
        m.verify(m.artifact("unet"))


def test_the_writer_refuses_what_load_refuses(build_dir, tmp_path):
    from runtime.manifest import ManifestWriter

    w = ManifestWriter.of(Manifest.load(build_dir))
    w.data["artifacts"][0]["file"] = "../escape.onnx"
    with pytest.raises(ManifestError, match="not a path inside the build folder"):
        w.commit(tmp_path)
    assert not (tmp_path / MANIFEST_NAME).exists()
    w = ManifestWriter.of(Manifest.load(build_dir))
    del w.data["components"]["unet"]["image_size"]
    with pytest.raises(ManifestError, match="'image_size' is missing"):
        w.commit(tmp_path)


def test_trajectory_rows_are_replaced_per_precision_only(build_dir):
    from runtime.manifest import ManifestWriter

    w = ManifestWriter.of(Manifest.load(build_dir))
    w.put_trajectories(["fp16"], [{"case": "a", "precision": "fp16"}])
    w.put_trajectories(["int8"], [{"case": "b", "precision": "int8"}])
    w.put_trajectories(["fp16"], [{"case": "c", "precision": "fp16"}])
    assert {(r["case"], r["precision"]) for r in w.data["parity"]["trajectories"]} >= {
        ("b", "int8"),
        ("c", "fp16"),
    }
    assert not any(r["case"] == "a" for r in w.data["parity"]["trajectories"])
