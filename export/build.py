"""`gdexport build`: precision-carrying graphs, and TensorRT plans where TensorRT and a GPU exist.

Precision lives in the ONNX graph: a precision leaf (`export/precision/`) turns each fp32 graph
into a graph of its precision, and every graph goes through one loop (`export.graphs`): op
check -> engine -> parity through the backend that runs it -> manifest entry. Without TensorRT
the ONNX Runtime artefacts of the same precision are the build's engines. The trajectory parity
runs on the staged engines, and the build is committed (files, then the manifest) only after.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from export.exporter import (
    ComponentSource,
    ExportError,
    export_build,
    load_component_from_manifest,
    new_staging,
)
from export.graphs import EngineOptions, finish_graph, save_ort_optimized
from export.precision import PRECISIONS, precision_leaf
from runtime.manifest import MANIFEST_NAME, Manifest, ManifestError, ManifestWriter
from runtime.roles import COMPONENT_KIND, ENGINE_ROLES, ROLES


def tensorrt_available() -> tuple[bool, str]:
    """(usable, why not): TensorRT importable and a CUDA GPU visible to cuda-python."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or OSError from missing shared libraries
        return False, f"TensorRT is not installed ({type(e).__name__})"
    try:
        from runtime.backends.tensorrt import gpu_identity

        gpu_identity(0)
    except Exception as e:
        return False, f"no CUDA GPU ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return True, ""


def choose_backend(requested: str) -> str:
    """`auto` -> tensorrt where usable, else onnxruntime; `tensorrt` fails clearly without it."""
    if requested == "onnxruntime":
        return requested
    ok, why = tensorrt_available()
    if requested == "tensorrt" and not ok:
        raise ExportError(
            f"--backend tensorrt: {why}. Install TensorRT with `pip install 'gdexport[trt]'` on a "
            f"machine with an NVIDIA GPU, or use --backend onnxruntime"
        )
    return "tensorrt" if ok else "onnxruntime"


def _same_export(manifest: Manifest, sources: dict[str, ComponentSource]) -> bool:
    """Whether the build's fp32 export came from these specs and weights."""
    from export.exporter import load_component

    if set(manifest.components) != set(sources):
        return False
    for name, src in sources.items():
        c = manifest.components[name]
        with torch.device("meta"):
            spec = load_component(name, ComponentSource(src.spec, None, src.seed)).spec
        if spec.to_json() != c["spec"] or src.describe() != c["weights"]:
            return False
    return True


def build(
    out: str | Path,
    *,
    precision: str = "fp16",
    sources: dict[str, ComponentSource] | None = None,
    backend: str = "auto",
    batch: dict[str, int] | None = None,
    workspace_gb: float = 4.0,
    opt_level: int = 3,
    trajectory_steps: str | None = "25",
    check: bool = True,
    log: Callable[[str], None] = print,
    int8_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export `out` if it has no current export of `sources`, then build every engine there.

    int8: Q/DQ graphs calibrated on OUT/calibration/ (recorded first when absent);
    `int8_options` go to the int8 leaf, `export.precision.int8.Int8` (method, keep, samples,
    steps, reduce_range).
    """
    out = Path(out)
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        if backend == "tensorrt":
            raise ExportError(
                "--bf16 builds OpenVINO artefacts for CPUs with bf16 units; for TensorRT build "
                "--fp16 or --int8"
            )
        from export.precision.bf16 import bf16_ready

        ok, why = bf16_ready()
        if not ok:  # before any export work
            raise ExportError(
                f"--bf16: {why}. Build --fp32 (or --int8) on this machine, or build --bf16 on "
                f"a CPU with bf16 units"
            )
        engine_backend = "openvino"
    else:
        engine_backend = choose_backend(backend)
    batch = batch or {"min": 1, "opt": 1, "max": 16}
    manifest = None
    if (out / MANIFEST_NAME).is_file():
        try:
            manifest = Manifest.load(out)
        except ManifestError:
            manifest = None
    if sources:
        if manifest is None or not _same_export(manifest, sources):
            export_build(
                out, sources, batch_min=batch["min"], batch_opt=batch["opt"], batch_max=batch["max"],
                check=check, log=log,
            )  # fmt: skip
            manifest = Manifest.load(out)
    elif manifest is None:
        raise ExportError(
            f"{out} holds no export: give the model (--preset / --set / --model-flags / --config) "
            f"so that `gdexport build` exports it first"
        )
    if engine_backend == "openvino":
        log("bf16: OpenVINO IR artefacts for this CPU's bf16 units")
    elif engine_backend == "onnxruntime":
        log(
            f"no TensorRT here ({tensorrt_available()[1]}): building ONNX Runtime {precision} artefacts instead"
        )
    return _build_engines(
        manifest, precision, engine_backend, workspace_gb, opt_level, trajectory_steps, log,
        int8_options=int8_options,
    )  # fmt: skip


def _build_engines(
    manifest, precision, engine_backend, workspace_gb, opt_level, trajectory_steps, log,
    int8_options=None,
):  # fmt: skip
    from export.parity import format_table

    out = manifest.folder
    options = dict(int8_options or {})
    if precision == "int8":
        options.setdefault("reduce_range", int8_needs_reduce_range(engine_backend)[0])
    leaf = precision_leaf(precision, options)
    engines = EngineOptions(engine_backend, workspace_gb, opt_level, out / "timing.cache")
    staging = new_staging(out)
    try:
        models = {
            name: load_component_from_manifest(manifest, name) for name in manifest.components
        }
        writer = ManifestWriter.of(manifest)
        if precision != "fp32":  # a rebuild may make fewer graphs than the last one
            writer.drop_precision(precision)
        leaf.prepare(manifest, models, staging, log)
        rows = []
        for role in ENGINE_ROLES:
            fp32 = manifest.artifact(role, "fp32", "onnxruntime")
            if fp32 is None:
                continue
            model = models[ROLES[role].component]
            graph = leaf.graph(role, manifest.verify(fp32), model, staging, fp32.batch, log)
            if graph is None:  # kept in float: the leaf's manifest section says why
                continue
            # The export checked its own fp32 graphs; what is new here is checked here.
            check = not (precision == "fp32" and engine_backend == "onnxruntime")
            entries, new_rows = finish_graph(
                graph, model, staging, fp32.batch, engines, check=check, log=log
            )
            if engine_backend == "onnxruntime":
                src = graph.path
                entries[0] = save_ort_optimized(entries[0], src, staging, log)
            writer.put_artifacts(entries)
            rows += new_rows
        leaf.finish(writer)
        if precision == "int8":
            why = int8_needs_reduce_range(engine_backend, options["reduce_range"])[1]
            writer.put_section("int8", {**writer.data["int8"], "weight_range_why": why})
        if rows:
            log(format_table(rows))
        writer.put_parity(rows)
        if trajectory_steps and precision != "fp32":
            staged = Manifest(writer.data, out, staging=staging)
            traj = _trajectory_rows(
                staged, models, precision, engine_backend, trajectory_steps, log
            )
            writer.put_trajectories([precision], traj)
        if engine_backend != "tensorrt":
            staged = Manifest(writer.data, out, staging=staging)
            choice = choose_cpu_runtime(staged, precision, log)
            if choice is not None:
                section = dict(writer.data.get("runtime") or {})
                if section.get("cpu") != choice["cpu"]:
                    section = {"cpu": choice["cpu"]}  # timed on another CPU: start afresh
                section.setdefault("choices", {})[precision] = choice["choice"]
                writer.put_section("runtime", section)
        return writer.commit(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def int8_needs_reduce_range(engine_backend: str, given: bool | None = None) -> tuple[bool, str]:
    """(7-bit weights?, why): ONNX Runtime's x86 int8 kernels sum pairs of u8 x s8 products in
    saturating 16-bit lanes on CPUs without an int8 dot-product unit (VNNI, AMX-INT8), which
    full-range weights overflow; with one they accumulate in 32 bits and 7 bits only cost
    accuracy. TensorRT needs no margin. `given`: the user's choice, explained as such."""
    from runtime import cpu

    unit = cpu.int8_dot_product()
    model = cpu.cpu_info()["model"]
    if given is not None and given != (engine_backend == "onnxruntime" and unit is None):
        return given, f"{'7' if given else '8'}-bit weights as asked (reduce_range={given})"
    if engine_backend != "onnxruntime":
        return False, f"8-bit weights: {engine_backend} needs no accumulator margin"
    if unit is None:
        return True, (
            f"7-bit weights: {model} has no VNNI or AMX-INT8, so x86 int8 kernels accumulate in "
            f"16 bits; an 8-bit-weight graph run on it would overflow"
        )
    return False, (
        f"8-bit weights: {model} has {unit} (32-bit int8 accumulation); run this int8 graph on "
        f"ONNX Runtime only on CPUs with VNNI or AMX (OpenVINO runs it anywhere)"
    )


def choose_cpu_runtime(staged: Manifest, precision: str, log, calls: int = 3) -> dict | None:
    """Time the ONNX UNet artefact of `precision` on ONNX Runtime and OpenVINO, alternating call
    by call, and return {"cpu": identity, "choice": {backend, why, ms per call}}; None where only
    one backend can run it (OpenVINO absent, or an OpenVINO IR artefact)."""
    import importlib.util

    from calibration.speed import time_backends, unet_feeds
    from runtime import cpu
    from runtime.backends import BackendError, open_backend

    art = staged.artifact("unet", precision)
    if art is None or art.backend != "onnxruntime" or importlib.util.find_spec("openvino") is None:
        return None
    path = staged.verify(art)
    engines = {}
    try:
        for name in ("onnxruntime", "openvino"):
            try:
                engines[name] = open_backend(path, name, batch=art.batch)
            except BackendError as e:
                log(f"runtime choice: {name} cannot run {art.file} ({e})")
        if len(engines) < 2:
            return None
        seconds = time_backends(engines, unet_feeds(staged), calls=calls, warmup=1)
    finally:
        for e in engines.values():
            e.close()
    ms = {n: round(1e3 * v, 3) for n, v in seconds.items()}
    best = min(ms, key=ms.get)
    others = ", ".join(f"{n} {v:g} ms" for n, v in ms.items() if n != best)
    model = cpu.cpu_info()["model"]
    why = (
        f"fastest {precision} UNet call at batch 1 on {model}: {best} {ms[best]:g} ms vs {others} "
        f"(median of {calls} alternating calls)"
    )
    log(f"runtime backend for {precision}: {best} ({why})")
    return {"cpu": cpu.identity(), "choice": {"backend": best, "why": why, "ms_per_unet_call": ms}}


def _trajectory_rows(staged: Manifest, models, precision, engine_backend, steps, log) -> list:
    """The staged pipeline of `precision` against the fp32 reference loop (report only below
    fp32); non-finite samples fail the build."""
    from export.trajectory import format_rows, trajectory_parity
    from runtime.pipeline import Pipeline
    from runtime.sampling import NonFiniteError

    with Pipeline.from_manifest(staged, precision=precision, backend=engine_backend) as pipe:
        if pipe.unet_artifact.precision != precision:
            return []
        try:
            rows = trajectory_parity(pipe, models, steps=steps)
        except NonFiniteError as e:
            raise ExportError(
                f"the {precision} engines give non-finite values along a sampling trajectory "
                f"({e}); nothing was written. Rebuild at another precision or check the weights"
            ) from None
    log(format_rows(rows))
    return rows


__all__ = [
    "build", "choose_backend", "choose_cpu_runtime", "int8_needs_reduce_range",
    "tensorrt_available", "COMPONENT_KIND", "PRECISIONS",
]  # fmt: skip
