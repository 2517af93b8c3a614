"""The native runtime (runtime/native) against the Python runtime on the digits build.

The reference is always the Python runtime or numpy itself: images vs `Pipeline` on ONNX
Runtime, base trajectories vs `Pipeline` on the same OpenVINO engines, noise vs
numpy's `default_rng`, manifest refusals vs `runtime.manifest`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from runtime.manifest import Manifest, ManifestError
from runtime.pipeline import Pipeline
from tests.runtime.native.conftest import Native, NativeError

LABELS = [0, 3, 5, 7, 9, 2]


def test_noise_is_numpys_default_rng_bit_for_bit(native: Native):
    # Seeds and indices past 2**32 take two SeedSequence words; 40k draws per generator reach
    # the ziggurat's wedges and tail many times.
    for seed in (0, 1, 12345, 2**32 + 7):
        for index in (0, 1, 63, 2**33 + 5):
            for stream in (0, 1, 2):
                got = np.empty(40_000, np.float32)
                assert native.lib.gdx_standard_normal(seed, index, stream, got.size,
                                                      got.ctypes.data) == 0  # fmt: skip
                want = np.random.default_rng([seed, index, stream]).standard_normal(
                    got.size, dtype=np.float32
                )
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (seed, index)


def test_cli_images_match_the_python_runtime_on_onnxruntime(native_dir: Path, digits, tmp_path):
    """Guided, with the upsampler: the C++ CLI on OpenVINO vs `Pipeline` on ONNX Runtime."""
    out = tmp_path / "samples"
    proc = subprocess.run(
        [str(native_dir / "gdexport-sample"), "--engine", str(digits), "--classes",
         ",".join(map(str, LABELS)), "--scale", "4", "--steps", "ddim10", "--seed", "5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    with Pipeline.from_manifest(digits) as pipe:
        assert pipe.unet_artifact.backend == "onnxruntime" and pipe.has_upsampler
        ref = pipe.sample(LABELS, scale=4.0, steps="ddim10", seed=5)
    assert images.dtype == np.uint8 and images.shape == ref.images.shape == (6, 32, 32, 3)
    assert labels.dtype == np.int64 and labels.tolist() == LABELS
    diff = np.abs(images.astype(int) - ref.images.astype(int))
    assert (diff <= 1).mean() >= 0.999, (diff.max(), (diff <= 1).mean())
    for name in ("grid.png", "base_grid.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _check_png(out / "grid.png")


def _check_png(path: Path) -> None:
    """Decode the PNG with zlib and check every chunk CRC (an independent reader)."""
    import struct
    import zlib

    data = path.read_bytes()
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(tag + body) == crc, tag
        if tag == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        if tag == b"IDAT":
            idat += body
        pos += 12 + length
    assert len(zlib.decompress(idat)) == h * (w * 3 + 1)


@pytest.mark.parametrize(
    "sampler, steps, eta, scale",
    [("ddim", "ddim8", 0.0, 4.0), ("ddim", "ddim6", 0.5, 2.0), ("ddpm", "8", 0.0, 4.0)],
)
def test_base_trajectory_matches_python_on_the_same_openvino_engines(
    native: Native, digits, sampler, steps, eta, scale
):
    """Both runtimes on OpenVINO: only the loop differs, so x_t agrees to 1e-4 at every step;
    against the Python runtime on ONNX Runtime it is as close as Python-on-OpenVINO is."""
    h = native.open(digits)
    try:
        _, _, x0, traj = native.sample(
            h, LABELS[:4], base=True, trajectory=True, sampler=sampler, steps=steps, eta=eta,
            scale=scale, seed=11, upsample=0,
        )  # fmt: skip
    finally:
        native.close(h)
    kw = dict(scale=scale, steps=steps, sampler=sampler, eta=eta, seed=11, upsample=False)
    with Pipeline.from_manifest(digits, upsampler=False) as pipe:
        ort = pipe.sample(LABELS[:4], save_trajectory=True, **kw)
    with Pipeline.from_manifest(digits, upsampler=False, backend="openvino") as pipe:
        ov = pipe.sample(LABELS[:4], save_trajectory=True, **kw)
    assert traj.shape == ov.trajectory["x"].shape
    assert np.abs(traj - ov.trajectory["x"]).max() <= 1e-4
    assert np.abs(x0 - ov.x).max() <= 1e-4
    engine_gap = np.abs(ov.x - ort.x).max()
    assert np.abs(x0 - ort.x).max() <= engine_gap + 1e-4, engine_gap


def test_results_do_not_depend_on_batch_and_labels_are_drawn_like_python(native: Native, digits):
    h = native.open(digits, no_upsampler=1)
    try:
        whole = native.sample(h, None, 5, steps="ddim4", seed=2, first_index=3)
        ones = native.sample(h, None, 5, steps="ddim4", seed=2, first_index=3, batch=1)
        assert native.lib.gdx_batch_max(h) == 8 and native.lib.gdx_num_classes(h) == 10
    finally:
        native.close(h)
    assert np.array_equal(whole[0], ones[0]) and np.array_equal(whole[1], ones[1])
    with Pipeline.from_manifest(digits, upsampler=False) as pipe:
        ref = pipe.sample(num_samples=5, steps="ddim4", seed=2, first_index=3)
    assert whole[1].tolist() == ref.labels.tolist()
    assert (np.abs(whole[0].astype(int) - ref.images.astype(int)) <= 1).mean() >= 0.999


# -- bad input through the C ABI ----------------------------------------------------------------


def _copy(digits: Path, tmp_path: Path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(digits, out)
    return out


def _edit(build: Path, change) -> None:
    path = build / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_open_errors_are_codes_and_messages(native: Native, digits, tmp_path):
    with pytest.raises(NativeError) as e:
        native.open(tmp_path / "nowhere")
    assert e.value.status == Native.MANIFEST and "no manifest.json in" in e.value.message

    build = _copy(digits, tmp_path)
    (build / "manifest.json").write_text("{ not json")
    with pytest.raises(NativeError) as e:
        native.open(build)
    assert e.value.status == Native.MANIFEST and "is not valid JSON" in e.value.message

    build = _copy(digits, tmp_path / "sha")
    with open(build / "classifier_grad.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(NativeError) as e:
        native.open(build)
    assert e.value.status == Native.MANIFEST
    assert "classifier_grad.onnx does not match its manifest (sha256" in e.value.message

    h = native.open(build, no_classifier=1)  # the corrupt file is never read
    native.close(h)


def _python_error(build: Path) -> str:
    with pytest.raises(ManifestError) as e:
        Manifest.load(build)
    return str(e.value)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(version=2),
        lambda d: d.update(version="1"),
        lambda d: d.update(format="other"),
        lambda d: d["components"]["unet"].pop("image_size"),
        lambda d: d["components"]["unet"].update(image_size=16.0),
        lambda d: d["components"]["upsampler"]["diffusion"].update(learn_sigma=1),
        lambda d: d["sampling"].update(upsampler_start_t="500"),
        lambda d: d["artifacts"][0].update(sha256="abc"),
        lambda d: d["artifacts"][1].update(role="vae"),
        lambda d: d["artifacts"][0]["batch"].update(min=0),
    ],
    ids=["newer", "version-str", "format", "missing-key", "float-int", "bool", "start-t-str",
         "sha", "role", "batch"],
)  # fmt: skip
def test_manifest_refusals_match_python(native: Native, digits, tmp_path, change):
    build = tmp_path / "build"
    build.mkdir()
    shutil.copy(digits / "manifest.json", build / "manifest.json")
    _edit(build, change)
    with pytest.raises(NativeError) as e:
        native.open(build)
    assert e.value.status == Native.MANIFEST
    assert e.value.message == _python_error(build)


@pytest.mark.parametrize("file", ["../unet.onnx", "/etc/passwd", "link.onnx"])
def test_artefacts_outside_the_build_are_refused_like_python(
    native: Native, digits, tmp_path, file
):
    from runtime.manifest import confined

    build = _copy(digits, tmp_path)
    (build / "link.onnx").symlink_to(build / ".." / "elsewhere.onnx")
    (tmp_path / "elsewhere.onnx").write_bytes((build / "unet.onnx").read_bytes())
    _edit(build, lambda d: d["artifacts"][0].update(file=file))
    with pytest.raises(NativeError) as e:
        native.open(build)
    with pytest.raises(ManifestError) as py:
        confined(build, file)
    assert e.value.status == Native.MANIFEST
    assert e.value.message.split(":")[0] == str(py.value).split(":")[0]
    assert ("outside the build folder" in e.value.message) == ("outside the build" in str(py.value))


def test_sample_errors_are_codes_and_messages(native: Native, digits):
    h = native.open(digits)
    try:
        cases = [
            (dict(labels=[1, 10]), "class 10 is out of range: this build has classes 0..9"),
            (dict(labels=[1, 2], batch=9), "batch 9 is outside the engines' range 1..8"),
            (dict(labels=[1], steps="ddim1"), "--steps 'ddim1': invalid timestep respacing"),
            (dict(labels=[1], steps="abc"), "--steps 'abc': invalid timestep respacing"),
            (dict(labels=[1], sampler="euler"), "sampler must be one of ('ddim', 'ddpm')"),
            (dict(labels=[1], eta=2.0), "eta must be in [0, 1]"),
            (dict(labels=[1], upsampler_start_t=1000), "upsampler start timestep 1000 is past"),
            (dict(labels=None, n=0), "num_samples must be >= 1"),
        ]
        for kw, message in cases:
            labels = kw.pop("labels")
            with pytest.raises(NativeError) as e:
                native.sample(h, labels, **kw)
            assert e.value.status == Native.ARGUMENT and message in e.value.message, kw
        assert native.lib.gdx_num_steps(h, b"ddim1") == -1
        assert native.lib.gdx_num_steps(h, b"ddim25") == 25
    finally:
        native.close(h)
    h = native.open(digits, no_classifier=1)
    try:
        with pytest.raises(NativeError) as e:
            native.sample(h, [1], scale=2.0)
        assert "guidance scale 2.000000 needs a classifier" in e.value.message
    finally:
        native.close(h)
    images = np.zeros((1, 32, 32, 3), np.uint8)
    assert native.lib.gdx_sample(None, None, 1, -1.0, None, 0, 0, images.ctypes.data) == 1
    assert "the runtime is NULL" in native.error()


def test_readme_embedding_example_runs_through_the_cpp_wrapper(native_dir, native: Native, digits):
    proc = subprocess.run(
        [str(native_dir / "gdexport-embed-example"), str(digits)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    h = native.open(digits)
    try:
        images = native.sample(h, [1, 2, 3, 4], seed=0)[0]  # the manifest's scale and steps
    finally:
        native.close(h)
    assert proc.stdout.strip() == f"4 images of 32x32, first pixel {images[0, 0, 0, 0]}"
    bad = subprocess.run(
        [str(native_dir / "gdexport-embed-example"), str(digits / "nowhere" / "x")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 1 and "error 2: no manifest.json in" in bad.stderr
