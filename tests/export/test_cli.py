"""`gdexport presets | export | check` through click: exit codes, what is printed and written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from export.cli import main  # noqa: E402
from export.loading import build_model  # noqa: E402
from export.presets import PRESETS  # noqa: E402
from runtime.manifest import MANIFEST_NAME  # noqa: E402
from tests.builds import FILES, SEEDS, SPECS, UNET  # noqa: E402

EXPECTED_FILES = {f: role for files in FILES.values() for f, role in files.items()}


def gdexport(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def _configs(tmp_path: Path) -> list[str]:
    """--config / --classifier-config / --upsampler-config JSON files of the tiny build."""
    args = []
    for comp, flag in (("unet", "--config"), ("classifier", "--classifier-config"),
                       ("upsampler", "--upsampler-config")):  # fmt: skip
        path = tmp_path / f"{comp}.json"
        path.write_text(json.dumps(SPECS[comp]))
        args += [flag, str(path)]
    return args


def test_presets_lists_every_preset():
    result = gdexport("presets")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["preset", "kind", "resolution", "params"]
    for name, preset in PRESETS.items():
        (row,) = [line for line in lines if line.split() and line.split()[0] == name]
        assert preset["kind"] in row.split()
    assert "sets (--set):" in result.output


# -- gdexport export ---------------------------------------------------------------------------


def test_export_writes_a_checked_build(build_dir, tmp_path, monkeypatch):
    """The CLI path end to end; export_onnx is replaced by a copy of the session build's graphs
    (exporting for real is what built that), so the parity check still runs against references
    built from the CLI's seeds: seed, seed + 1, seed + 2 per component."""
    assert SEEDS == {"unet": 0, "classifier": 1, "upsampler": 2}

    def fake_export(kind, model, path, *, batch_max=64, opset=18):
        shutil.copyfile(build_dir / Path(path).name, path)
        return [Path(path).name]

    monkeypatch.setattr("export.onnx_export.export_onnx", fake_export)
    out = tmp_path / "build"
    result = gdexport("export", *_configs(tmp_path), "-o", out, "--batch-max", 16)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: unet.onnx, classifier_grad.onnx, classifier.onnx, upsampler.onnx" in (
        result.output
    )
    assert "max abs" in result.output and "pass" in result.output
    manifest = _manifest(out)
    for a in manifest["artifacts"]:
        assert hashlib.sha256((out / a["file"]).read_bytes()).hexdigest() == a["sha256"]
    rows = manifest["parity"]["components"]
    assert {r["artifact"] for r in rows} == set(EXPECTED_FILES)
    assert all(r["passed"] for r in rows)


def _assert_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_export_missing_checkpoint(tmp_path):
    out = tmp_path / "build"
    result = gdexport(*["export", *_configs(tmp_path)[:2]], "--checkpoint", tmp_path / "nope.pt",
                      "-o", out)  # fmt: skip
    _assert_error(result, "error: checkpoint", "nope.pt does not exist")
    assert not out.exists()


def test_export_wrong_preset_for_a_checkpoint(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    state = build_model(UNET).state_dict()
    torch.save(state, ckpt)
    out = tmp_path / "build"
    result = gdexport("export", "--preset", "adm-64", "--checkpoint", ckpt, "-o", out)
    _assert_error(result, f"has {len(state)} tensors, preset adm-64 (unet) expects", "missing")
    assert not out.exists()


def test_export_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "build"
    result = gdexport("export", *_configs(tmp_path)[:2], "-o", out)
    _assert_error(result, f"cannot write to build folder {out}", "choose another -o")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--preset", "adm-64"], "give one of --preset / flags / config for the unet, not 2"),
        (["--classifier-checkpoint", "c.pt"], "--classifier-checkpoint given without a spec"),
        (["--upsampler-config", "missing.json"], "config file missing.json does not exist"),
    ],
)
def test_export_usage_errors(tmp_path, extra, fragment):
    out = tmp_path / "build"
    result = gdexport("export", *_configs(tmp_path)[:2], *extra, "-o", out)
    _assert_error(result, fragment)
    assert not out.exists()


# -- gdexport check ----------------------------------------------------------------------------


def test_check_passes_prints_tables_and_records_parity(build_copy):
    data = _manifest(build_copy)
    del data["parity"]  # check must record its own figures
    (build_copy / MANIFEST_NAME).write_text(json.dumps(data))
    result = gdexport("check", build_copy, "--trajectory", "--steps", "5")
    assert result.exit_code == 0, result.output
    for file in EXPECTED_FILES:
        (row,) = [line for line in result.output.splitlines() if line.startswith(file + " ")]
        assert row.split()[-1] == "yes", row
    recorded = _manifest(build_copy)["parity"]
    rows = {r["artifact"]: r for r in recorded["components"]}
    assert set(rows) == set(EXPECTED_FILES)
    for r in rows.values():
        assert r["passed"] is True and r["max_abs"] <= r["tol"] == 1e-4
    cases = [r["case"] for r in recorded["trajectories"]]
    assert cases == ["ddim guided (scale 1)", "ddpm guided (scale 1)", "cascade upsampler (ddim)"]
    for r in recorded["trajectories"]:
        assert r["passed"] is True and r["steps"] == "5" and r["final_max_abs"] <= 1e-3
        assert r["case"] in result.output


def test_check_fails_when_a_graph_does_not_match_its_reference(build_copy):
    data = _manifest(build_copy)
    data["components"]["unet"]["weights"]["random_seed"] = 5  # a different reference network
    (build_copy / MANIFEST_NAME).write_text(json.dumps(data))
    result = gdexport("check", build_copy)
    assert result.exit_code == 1, result.output
    (row,) = [line for line in result.output.splitlines() if line.startswith("unet.onnx ")]
    assert row.split()[-1] == "NO"
    rows = {r["artifact"]: r for r in _manifest(build_copy)["parity"]["components"]}
    assert rows["unet.onnx"]["passed"] is False and rows["unet.onnx"]["max_abs"] > 1e-4
    assert rows["classifier.onnx"]["passed"] is True


def test_check_refuses_a_changed_file(build_copy):
    path = build_copy / "classifier.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    before = (build_copy / MANIFEST_NAME).read_bytes()
    result = gdexport("check", build_copy)
    _assert_error(result, "classifier.onnx does not match its manifest (sha256")
    assert (build_copy / MANIFEST_NAME).read_bytes() == before


def test_check_refuses_a_folder_without_manifest(tmp_path):
    result = gdexport("check", tmp_path)
    _assert_error(result, f"no manifest.json in {tmp_path}")


def test_trajectory_check_fails_an_engine_that_is_slightly_off(build_dir, reference_models):
    """The pass mark is on the final sample: a UNet engine whose eps is off by 1e-3 (a tenth of
    the fp16 tolerance per call) must fail the fp32 trajectory check."""
    from export.trajectory import trajectory_parity
    from runtime.pipeline import Pipeline

    with Pipeline.from_manifest(build_dir, backend="onnxruntime") as pipe:
        rows = trajectory_parity(pipe, reference_models, steps="5", cases=("ddim", "ddpm"))
        assert all(r.passed for r in rows), [r.to_json() for r in rows]

        class Off:
            def __init__(self, engine):
                self.engine, self.inputs, self.outputs = engine, engine.inputs, engine.outputs

            def __call__(self, feeds):
                return {"out": self.engine(feeds)["out"] + np.float32(1e-3)}

        with pipe.wrapped_engines(lambda role, b: Off(b) if role == "unet" else b):
            rows = trajectory_parity(pipe, reference_models, steps="5", cases=("ddim", "ddpm"))
    assert not any(r.passed for r in rows), [r.to_json() for r in rows]


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda d: d["artifacts"][0].pop("sha256"), "'sha256' is missing"),
        (lambda d: d.pop("components"), "'components' is missing"),
        (lambda d: d["sampling"].update(scale="abc"), "sampling.'scale' must be"),
    ],
)
def test_check_and_info_refuse_a_malformed_manifest(build_copy, edit, fragment):
    path = build_copy / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    for cmd in ("check", "info"):
        result = gdexport(cmd, build_copy)
        _assert_error(result, fragment)
        assert "Traceback" not in result.output


def test_info_verifies_checksums(build_copy):
    result = gdexport("info", build_copy)
    assert result.exit_code == 0 and "sha256 ok" in result.output and "verified" in result.output
    path = build_copy / "upsampler.onnx"
    data = bytearray(path.read_bytes())
    data[200] ^= 1
    path.write_bytes(bytes(data))
    result = gdexport("info", build_copy)
    _assert_error(result, "sha256 MISMATCH", "upsampler.onnx does not match its manifest")


def test_trajectory_check_with_non_finite_engines_is_a_clear_error(build_copy, monkeypatch):
    import runtime.pipeline as pipeline

    real = pipeline.Pipeline.unet_fn

    def nan_unet(self, y):
        fn = real(self, y)
        return lambda x, t: fn(x, t) * np.float32("nan")

    monkeypatch.setattr(pipeline.Pipeline, "unet_fn", nan_unet)
    result = gdexport("check", build_copy, "--trajectory", "--steps", "3")
    _assert_error(result, "give non-finite values along a sampling trajectory")
    assert "Traceback" not in result.output


def test_a_corrupt_saved_optimised_graph_is_reported_once(build_dir, tmp_path, capsys):
    """`*.ortopt.onnx` that fails its sha256 is not used, and stderr says so (once)."""
    import shutil

    from runtime.backends import onnxruntime as ort_backend
    from runtime.pipeline import Pipeline

    out = shutil.copytree(build_dir, tmp_path / "b")
    res = gdexport("build", "--fp32", "-o", out, "--backend", "onnxruntime")
    assert res.exit_code == 0, res.output
    opt = out / "unet.ortopt.onnx"
    assert opt.is_file()
    opt.write_bytes(opt.read_bytes()[:-10] + b"0123456789")
    ort_backend._WARNED.clear()
    for _ in range(2):
        with Pipeline.from_manifest(out, backend="onnxruntime") as pipe:
            pipe.sample([1], steps="ddim2", upsample=False)
    err = capsys.readouterr().err
    assert err.count("unet.ortopt.onnx is corrupt (sha256 mismatch)") == 1
