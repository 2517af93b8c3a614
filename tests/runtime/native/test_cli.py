"""gdexport-sample's flag errors (exit 2 with a message) and one AddressSanitizer run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.native.conftest import build_native


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "missing option --engine"),
        (["--engine", "{b}", "--bogus"], "no such option: --bogus"),
        (["--engine", "{b}", "--seed", "x"], "--seed: 'x' is not an integer"),
        (["--engine", "{b}", "--seed", "-1"], "seed must be >= 0"),
        (["--engine", "{b}", "--scale", "-1"], "guidance scale must be >= 0"),
        (["--engine", "{b}", "--sampler", "euler"], "is not one of 'ddim', 'ddpm'"),
        (["--engine", "{b}", "--classes", "1,x"], "--classes takes comma-separated integers"),
        (["--engine", "{b}", "--num-samples"], "option --num-samples requires an argument"),
        (["--engine", "/nonexistent/build"], "--engine /nonexistent/build does not exist"),
        (["--engine", "{b}", "--classes", "1,12", "--steps", "ddim2"], "class 12 is out of range"),
    ],
)
def test_flag_errors_exit_2(native_dir: Path, digits, tmp_path, args, message):
    args = [a.format(b=digits) for a in args]
    proc = subprocess.run(
        [str(native_dir / "gdexport-sample"), "--out", str(tmp_path / "o"), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "o").exists()  # bad input leaves nothing behind


def test_cli_under_address_sanitizer(digits, tmp_path):
    """The library and CLI built with -fsanitize=address,undefined (leak checks on) sample a
    guided cascade and refuse bad input with no sanitizer report."""
    build = build_native(
        Path(__file__).resolve().parents[3] / "build" / "native-asan",
        "-DGDX_SANITIZE=ON",
        "-DCMAKE_BUILD_TYPE=Debug",  # -O0 compiles twice as fast; OpenVINO does the work
    )
    env = dict(
        os.environ,
        ASAN_OPTIONS="detect_leaks=1:exitcode=23",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=24",
        # oneTBB (under OpenVINO) dlopens with RTLD_DEEPBIND, which ASan refuses, unless told.
        TBB_ENABLE_SANITIZERS="1",
    )
    cli = str(build / "gdexport-sample")
    runs = [
        (0, ["--engine", str(digits), "--classes", "1,2,3", "--steps", "ddim3", "--batch", "2"]),
        (2, ["--engine", str(digits), "--classes", "1,99", "--steps", "ddim3"]),  # bad label
        (2, ["--engine", str(tmp_path / "missing")]),
    ]
    for want, args in runs:
        proc = subprocess.run(
            [cli, *args, "--out", str(tmp_path / "o")],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert proc.returncode == want, proc.stderr[-4000:]
        assert "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, proc.stderr
    with np.load(tmp_path / "o" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (3, 32, 32, 3)
