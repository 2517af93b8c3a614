"""Time per guided sample: the native CLI (gdexport-sample, OpenVINO) vs `python -m runtime.sample`
(ONNX Runtime) vs the Python runtime on the same OpenVINO engines, on one build, in one run;
and the native runtime's footprint (library + CLI + the OpenVINO libraries it loads).

    python examples/benchmark_native.py BUILD_DIR [--num-samples 16] [--steps ddim25] [--repeat 3]

Needs build/native (bash examples/build_native.sh). Sampling time excludes opening the engines;
each figure is the best of --repeat runs. Prints a Markdown table and writes --json if given.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def _cli_seconds(args: list[str]) -> tuple[float, float]:
    """(sampling seconds the native CLI reports, wall seconds of the whole command)."""
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    m = re.search(r"([0-9.]+) s sampling", proc.stdout)
    return float(m.group(1)), wall


def _python_seconds(args: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    return float(json.loads(proc.stdout)["timings"]["total_s"]), wall


def _python_openvino_seconds(build: Path, labels: list[int], scale: float, steps: str) -> float:
    """The Python runtime's loop over the same OpenVINO engines (`--backend openvino`)."""
    sys.path.insert(0, str(ROOT))
    from runtime.pipeline import Pipeline

    with Pipeline.from_manifest(build, backend="openvino") as pipe:
        pipe.sample(labels[:1], scale=scale, steps="ddim2", seed=0)  # warm-up
        t0 = time.perf_counter()
        pipe.sample(labels, scale=scale, steps=steps, seed=0)
        return time.perf_counter() - t0


def footprint(native: Path) -> dict[str, int]:
    """Bytes of the library, the CLI, and the OpenVINO shared objects the CLI maps while it
    samples an ONNX build (read from ldd plus the plugins OpenVINO loads: CPU and ONNX)."""
    import openvino

    libs = Path(openvino.__file__).parent / "libs"
    files = {native / "libgdexport_rt.so", native / "gdexport-sample"}
    todo = [native / "libgdexport_rt.so", *libs.glob("libopenvino_intel_cpu_plugin.so"),
            *libs.glob("libopenvino_onnx_frontend.so*")]  # fmt: skip
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        files.add(f)
        out = subprocess.run(["ldd", str(f)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"=> (\S+)", line)
            if m and Path(m.group(1)).resolve().parent == libs.resolve():
                todo.append(Path(m.group(1)).resolve())
    sizes = {str(f.name): f.stat().st_size for f in sorted({p.resolve() for p in files})}
    return sizes


@click.command()
@click.argument("build", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--num-samples", default=16, show_default=True)
@click.option("--steps", default="ddim25", show_default=True)
@click.option("--scale", default=4.0, show_default=True)
@click.option("--repeat", default=3, show_default=True)
@click.option("--native", "native", type=click.Path(path_type=Path), default=ROOT / "build/native")
@click.option("--json", "json_out", type=click.Path(path_type=Path))
def main(build, num_samples, steps, scale, repeat, native, json_out):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    labels = [i % 10 for i in range(num_samples)]
    classes = ",".join(map(str, labels))
    common = ["--classes", classes, "--scale", str(scale), "--steps", steps, "--seed", "0"]
    rows: dict[str, list[tuple[float, float]]] = {"native": [], "python_ort": []}
    py_ov: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeat):
            rows["native"].append(_cli_seconds(
                [str(native / "gdexport-sample"), "--engine", str(build), *common,
                 "--out", f"{tmp}/n{r}"]
            ))  # fmt: skip
            rows["python_ort"].append(_python_seconds(
                [sys.executable, "-m", "runtime.sample", "--engine", str(build), *common,
                 "--json", "--out", f"{tmp}/p{r}"]
            ))  # fmt: skip
            py_ov.append(_python_openvino_seconds(build, labels, scale, steps))
    best = {k: min(v) for k, v in rows.items()}
    per = {
        "native_openvino": best["native"][0] / num_samples,
        "python_onnxruntime": best["python_ort"][0] / num_samples,
        "python_openvino": min(py_ov) / num_samples,
    }
    sizes = footprint(native)
    ov_bytes = sum(v for k, v in sizes.items() if k not in ("libgdexport_rt.so", "gdexport-sample"))
    cpu = next(
        (line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines()
         if line.startswith("Model name")), "unknown",
    )  # fmt: skip
    result = {
        "cpu": cpu, "cores": os.cpu_count(), "num_samples": num_samples, "steps": steps,
        "scale": scale, "seconds_per_sample": per,
        "ratio_python_ort_over_native": per["python_onnxruntime"] / per["native_openvino"],
        "ratio_python_openvino_over_native": per["python_openvino"] / per["native_openvino"],
        "wall_s": {"native": best["native"][1], "python_ort": best["python_ort"][1]},
        "footprint_bytes": sizes, "openvino_bytes": ov_bytes,
    }  # fmt: skip
    print(f"CPU: {cpu} ({os.cpu_count()} cores); {num_samples} guided samples, {steps}, "
          f"scale {scale}, with the upsampler; best of {repeat}")  # fmt: skip
    print("| runtime | engines | s per guided sample | vs native |")
    print("|---|---|---:|---:|")
    print(f"| gdexport-sample (C++) | OpenVINO | {per['native_openvino']:.4f} | 1.00 |")
    print(f"| Python runtime | OpenVINO | {per['python_openvino']:.4f} | "
          f"{result['ratio_python_openvino_over_native']:.2f} |")  # fmt: skip
    print(f"| python -m runtime.sample | ONNX Runtime | {per['python_onnxruntime']:.4f} | "
          f"{result['ratio_python_ort_over_native']:.2f} |")  # fmt: skip
    mib = 1 / (1 << 20)
    print(
        f"footprint: libgdexport_rt.so {sizes['libgdexport_rt.so'] * mib:.2f} MiB, "
        f"gdexport-sample {sizes['gdexport-sample'] * mib:.2f} MiB, OpenVINO libraries "
        f"{ov_bytes * mib:.1f} MiB ({', '.join(k for k in sizes if 'gdexport' not in k)})"
    )
    if json_out:
        json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
