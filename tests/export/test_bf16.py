"""`gdexport build --bf16`: OpenVINO IR artefacts run at bf16 arithmetic, checked against the
PyTorch reference; refused clearly on CPUs without bf16 units."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("openvino")

from export.cli import main  # noqa: E402
from export.parity import parity_inputs, reference_output  # noqa: E402
from export.precision.bf16 import bf16_ready  # noqa: E402
from runtime.backends import open_backend  # noqa: E402
from runtime.manifest import Manifest, ManifestError  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.roles import ROLES  # noqa: E402

needs_bf16 = pytest.mark.skipif(not bf16_ready()[0], reason=bf16_ready()[1] or "bf16 ready")


@pytest.fixture(scope="module")
def bf16_build(build_dir, tmp_path_factory):
    from tests.builds import copy_build

    out = copy_build(build_dir, tmp_path_factory.mktemp("bf16") / "build")
    args = ["build", "--bf16", "-o", str(out), "--trajectory-steps", "4"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


@needs_bf16
def test_bf16_artefacts_are_openvino_ir_and_bf16_arithmetic(bf16_build, reference_models):
    out, _ = bf16_build
    m = Manifest.load(out)
    arts = {a.role: a for a in m.artifacts if a.precision == "bf16"}
    # The gradient stays fp32 (see export/precision/bf16.py); the manifest says so.
    assert set(arts) == {"unet", "upsampler"}
    assert "classifier_grad" in m.data["bf16"]["kept_fp32"]
    for role, art in arts.items():
        assert art.backend == "openvino" and art.extra["format"] == "ir"
        assert art.file == ROLES[role].file.replace(".onnx", ".bf16.xml")
        assert (out / art.extra["external_data"]["file"]).is_file()
        model = reference_models[ROLES[role].component]
        feeds = parity_inputs(role, model, 2, seed=11)
        want = reference_output(role, model, feeds)
        path = m.verify(art)
        with (
            open_backend(path, "openvino", precision="bf16") as bf16,
            open_backend(path, "openvino", precision="fp32") as fp32,
        ):
            got, exact = (next(iter(b(feeds).values())) for b in (bf16, fp32))
        scale = np.abs(want).max()
        err = np.abs(got - want).max()
        # Within the recorded gate, and really bf16: far off the same IR run at fp32.
        assert err <= 1e-1 * scale, (role, err, scale)
        assert err > 1e3 * max(np.abs(exact - want).max(), 1e-9), (role, err)
        row = next(r for r in m.data["parity"]["components"] if r["artifact"] == art.file)
        assert row["passed"] is True and row["what"].startswith("openvino-cpu")
    traj = [r for r in m.data["parity"]["trajectories"] if r["precision"] == "bf16"]
    assert traj and all(r["final_max_abs"] < 2.0 for r in traj), traj


@needs_bf16
def test_pipeline_runs_the_bf16_unet_with_the_fp32_gradient(bf16_build):
    out, _ = bf16_build
    with Pipeline.from_manifest(out / "unet.bf16.xml") as pipe:
        assert pipe.unet_artifact.precision == "bf16"
        assert pipe.classifier_artifact.precision == "fp32"
        assert pipe.engine("unet").precision == "bf16"
        r = pipe.sample([0, 1], num_samples=2, scale=1.0, steps="ddim4", seed=3)
    assert np.isfinite(r.x).all()


@needs_bf16
def test_a_changed_ir_weight_file_is_refused(bf16_build, tmp_path):
    from tests.builds import copy_build

    out = copy_build(bf16_build[0], tmp_path / "b")
    data = out / "unet.bf16.bin"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="unet.bf16.bin"):
        Pipeline.from_manifest(out / "unet.bf16.xml")


def test_bf16_is_refused_without_bf16_units(build_copy, monkeypatch):
    import runtime.backends.openvino as ovb

    monkeypatch.setattr(ovb, "cpu_has_bf16", lambda core=None: False)
    before = (build_copy / "manifest.json").read_text()
    result = CliRunner().invoke(main, ["build", "--bf16", "-o", str(build_copy)])
    assert result.exit_code == 2
    assert "no bf16 units" in result.output and "Traceback" not in result.output
    assert (build_copy / "manifest.json").read_text() == before
    assert not list(build_copy.glob("*.bf16.*"))


def test_bf16_on_tensorrt_is_refused(build_copy):
    result = CliRunner().invoke(
        main, ["build", "--bf16", "--backend", "tensorrt", "-o", str(build_copy)]
    )
    assert result.exit_code == 2 and "OpenVINO artefacts" in result.output


@needs_bf16
def test_check_reruns_the_bf16_rows(bf16_build, tmp_path):
    from tests.builds import copy_build

    out = copy_build(bf16_build[0], tmp_path / "b")
    result = CliRunner().invoke(main, ["check", str(out), "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    assert "unet.bf16.xml" in result.output and "skipped" not in result.output
    rows = json.loads((out / "manifest.json").read_text())["parity"]["components"]
    assert any(r["artifact"] == "upsampler.bf16.xml" and r["passed"] for r in rows)
