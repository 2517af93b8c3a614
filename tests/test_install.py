"""The runtime installs from the package's base dependencies plus onnxruntime alone, and samples
from a build without torch: a fresh virtual environment, `pip install <copy of the repo>
onnxruntime`, then `runtime.sample` on the session build from outside the source tree.

About 20 s with pip's cache warm (not `slow`); skipped, with pip's reason, where no package index
is reachable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIP_OPTIONS = "--disable-pip-version-check --quiet --retries 1 --timeout 30".split()

# Runs in the fresh environment: imports the runtime, samples, and reports what got imported.
PROBE = textwrap.dedent(
    """
    import json, sys
    import runtime.sample, runtime.pipeline
    from runtime.pipeline import Pipeline
    with Pipeline.from_manifest(sys.argv[1]) as pipe:
        result = pipe.sample([1, 2], scale=1.0, steps="ddim3", upsampler_steps="ddim2", seed=0)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "export"))
    try:
        import torch  # noqa: F401
        torch_installed = True
    except ImportError:
        torch_installed = False
    print(json.dumps({
        "runtime": runtime.sample.__file__,
        "shape": list(result.images.shape),
        "loaded": loaded,
        "torch_installed": torch_installed,
    }))
    """
)


def _copy_sources(dst: Path) -> Path:
    """The package sources only, so pip's in-tree build writes nothing into the checkout."""
    dst.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dst)
    if (ROOT / "README.md").exists():
        shutil.copy2(ROOT / "README.md", dst)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.plan", "*.engine")
    for package in ("runtime", "export", "calibration"):
        if (ROOT / package).is_dir():
            shutil.copytree(ROOT / package, dst / package, ignore=ignore)
    return dst


def _run(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw
    )


def test_runtime_installs_with_onnxruntime_alone_and_samples_without_torch(build_dir, tmp_path):
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", venv], timeout=120)
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtual environment here: {made.stderr.strip()[-300:]}")
    python = venv / "bin" / "python"
    src = _copy_sources(tmp_path / "src")
    try:
        installed = _run(
            [python, "-m", "pip", "install", *PIP_OPTIONS, src, "onnxruntime"],
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("pip install took over 10 minutes (no package index reachable?)")
    if installed.returncode != 0:
        pytest.skip(f"pip install failed (offline?): {installed.stderr.strip()[-500:]}")

    listed = _run([python, "-m", "pip", "list", "--format=json"], timeout=120)
    packages = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "gdexport" in packages and "onnxruntime" in packages
    assert "torch" not in packages, "the base install pulled in torch"

    # From outside the checkout, so `runtime` can only come from the installed wheel.
    probe = _run([python, "-c", PROBE, build_dir], timeout=300, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(report["runtime"]).is_relative_to(venv), report["runtime"]
    assert report["shape"] == [2, 32, 32, 3]
    assert report["loaded"] == [], "the runtime imported torch or export"
    assert report["torch_installed"] is False

    # The console entry point of the runtime works there too.
    out = tmp_path / "samples"
    cli = [python, "-m", "runtime.sample", "--engine", build_dir / "unet.onnx", "--out", out]
    sampled = _run(
        [*cli, *"--classes 3 --steps ddim2 --no-upsampler --json".split()],
        timeout=300,
        cwd=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr
    assert json.loads(sampled.stdout)["labels"] == [3]
    assert (out / "samples.npz").is_file() and (out / "grid.png").is_file()
