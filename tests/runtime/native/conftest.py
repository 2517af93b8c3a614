"""Fixtures of the native runtime tests: the library built once (examples/build_native.sh), one
digits build exported once, a ctypes binding of the C ABI, and an OpenVINO backend for the
Python runtime (so the two runtimes can run the same engines and only the loop differs)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
BUILD = ROOT / "build" / "native"


def _toolchain_missing() -> str | None:
    if shutil.which("cmake") is None:
        return "needs cmake"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "needs a C++ compiler"
    return None


def build_native(build_dir: Path, *cmake_args: str) -> Path:
    """Run examples/build_native.sh against this interpreter's openvino into `build_dir`."""
    why = _toolchain_missing()
    if why:
        pytest.skip(f"the native runtime {why} (none found on PATH)")
    pytest.importorskip("openvino", reason="the native runtime builds against the openvino wheel")
    env = dict(os.environ, PYTHON=sys.executable, BUILD_DIR=str(build_dir))
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "build_native.sh"), *cmake_args],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return build_dir


@pytest.fixture(scope="session")
def native_dir() -> Path:
    """build/native with libgdexport_rt.so and gdexport-sample (incremental: cheap if built)."""
    return build_native(BUILD)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The shipped digits family (UNet, classifier gradient, upsampler), exported without the
    parity check, batch 1..8. GDX_NATIVE_DIGITS=FOLDER reuses such an export (for quick
    reruns while developing; its manifest must say batch max 8)."""
    if os.environ.get("GDX_NATIVE_DIGITS"):
        return Path(os.environ["GDX_NATIVE_DIGITS"])
    from export.exporter import ComponentSource, export_build
    from export.weights import path as weights_path

    out = tmp_path_factory.mktemp("native-digits") / "build"
    names = {
        "unet": "digits-16",
        "classifier": "digits-16-classifier",
        "upsampler": "digits-16-32-upsampler",
    }
    sources = {c: ComponentSource(p, weights_path(p)) for c, p in names.items()}
    export_build(out, sources, batch_max=8, check=False, log=lambda s: None)
    return out


# -- the C ABI through ctypes -----------------------------------------------------------------


class Options(ctypes.Structure):
    _fields_ = [
        ("engine", ctypes.c_char_p), ("unet_file", ctypes.c_char_p),
        ("precision", ctypes.c_char_p), ("device", ctypes.c_char_p), ("threads", ctypes.c_int),
        ("no_classifier", ctypes.c_int), ("no_upsampler", ctypes.c_int),
    ]  # fmt: skip


class Params(ctypes.Structure):
    _fields_ = [
        ("labels", ctypes.POINTER(ctypes.c_int64)), ("n", ctypes.c_int),
        ("scale", ctypes.c_double), ("steps", ctypes.c_char_p), ("sampler", ctypes.c_char_p),
        ("eta", ctypes.c_double), ("seed", ctypes.c_uint64), ("first_index", ctypes.c_int64),
        ("batch", ctypes.c_int), ("upsampler_start_t", ctypes.c_int), ("upsample", ctypes.c_int),
    ]  # fmt: skip


class NativeError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"[{status}] {message}")
        self.status = status
        self.message = message


class Native:
    """A thin ctypes binding of gdexport.h (what a C caller sees)."""

    OK, ARGUMENT, MANIFEST, ENGINE, NONFINITE = 0, 1, 2, 3, 4

    def __init__(self, lib_path: Path):
        lib = ctypes.CDLL(str(lib_path))
        handle = ctypes.c_void_p
        lib.gdx_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(Options), ctypes.POINTER(handle)]
        lib.gdx_last_error.restype = ctypes.c_char_p
        lib.gdx_close.argtypes = [handle]
        for name in ("gdx_image_size", "gdx_base_image_size", "gdx_has_upsampler",
                     "gdx_has_classifier", "gdx_num_classes", "gdx_batch_max"):  # fmt: skip
            getattr(lib, name).argtypes = [handle]
        lib.gdx_num_steps.argtypes = [handle, ctypes.c_char_p]
        lib.gdx_default_params.restype = Params
        lib.gdx_sample.argtypes = [
            handle, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_double,
            ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p,
        ]  # fmt: skip
        lib.gdx_sample_ex.argtypes = [handle, ctypes.POINTER(Params)] + [ctypes.c_void_p] * 4
        lib.gdx_standard_normal.argtypes = [
            ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p,
        ]  # fmt: skip
        self.lib = lib

    def error(self) -> str:
        return self.lib.gdx_last_error().decode()

    def open(self, build: Path, **options) -> ctypes.c_void_p:
        opts = Options(**{k: v.encode() if isinstance(v, str) else v for k, v in options.items()})
        h = ctypes.c_void_p()
        status = self.lib.gdx_open(str(build).encode(), ctypes.byref(opts), ctypes.byref(h))
        if status:
            assert not h.value
            raise NativeError(status, self.error())
        return h

    def sample(self, h, labels=None, n=None, *, base=False, trajectory=False, **params):
        """(images NHWC uint8, labels, base x NCHW float32 or None, trajectory or None)."""
        p = self.lib.gdx_default_params()
        lab = None
        if labels is not None:
            lab = np.ascontiguousarray(labels, np.int64)
            p.labels = lab.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
        p.n = len(lab) if n is None else n
        for k, v in params.items():
            setattr(p, k, v.encode() if isinstance(v, str) else v)
        up = p.upsample and self.lib.gdx_has_upsampler(h)
        s = self.lib.gdx_image_size(h) if up else self.lib.gdx_base_image_size(h)
        bs = self.lib.gdx_base_image_size(h)
        images = np.zeros((max(p.n, 0), s, s, 3), np.uint8)
        out_labels = np.zeros(max(p.n, 0), np.int64)
        x0 = np.zeros((max(p.n, 0), 3, bs, bs), np.float32) if base else None
        traj = None
        if trajectory:
            k = self.lib.gdx_num_steps(h, p.steps)
            traj = np.zeros((k, p.n, 3, bs, bs), np.float32)
        status = self.lib.gdx_sample_ex(
            h, ctypes.byref(p), images.ctypes.data, out_labels.ctypes.data,
            None if x0 is None else x0.ctypes.data, None if traj is None else traj.ctypes.data,
        )  # fmt: skip
        if status:
            raise NativeError(status, self.error())
        return images, out_labels, x0, traj

    def close(self, h) -> None:
        self.lib.gdx_close(h)


@pytest.fixture(scope="session")
def native(native_dir: Path) -> Native:
    return Native(native_dir / "libgdexport_rt.so")
