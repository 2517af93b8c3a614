"""`gdexport build`: precision-carrying graphs, and TensorRT plans where TensorRT and a GPU exist.

Precision lives in the ONNX graph. fp16 graphs are exported from the reference with its trunk's
convolutions in half, as the original's own fp16 mode runs: GroupNorm, softmax, the timestep
embedding, the output head and the classifier's log-softmax stay fp32 islands by construction.
Without TensorRT the ONNX Runtime artefacts of the same precision are the build's engines.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from export.exporter import (
    COMPONENT_KIND,
    ROLE_FILES,
    ComponentSource,
    ExportError,
    artifact_entry,
    commit_build,
    export_build,
    load_component_from_manifest,
)
from runtime.manifest import MANIFEST_NAME, Manifest, ManifestError

PRECISIONS = ("fp32", "fp16", "int8")
FP16_ON_CPU_NOTE = (
    "; ONNX Runtime on x86 CPUs runs most fp16 ops as fp32 behind inserted casts, so this "
    "measures fp16 storage rounding of weights and activations, not fp16 arithmetic"
)
# The engines a build makes: the classifier's logits graph is for evaluation only.
ENGINE_ROLES = ("unet", "classifier_grad", "upsampler")


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
    `int8_options` go to `calibration.int8.int8_graphs` (method, keep, samples, steps).
    """
    out = Path(out)
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
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
    if engine_backend == "onnxruntime":
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
    from export.onnx_export import OPSET, export_onnx
    from export.parity import check_artifact, format_table, tolerance_for
    from export.trt_ops import check_tensorrt_ops

    out = manifest.folder
    data = manifest.data
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        import onnx

        models = {
            name: load_component_from_manifest(manifest, name) for name in manifest.components
        }
        new_artifacts, rows = [], []
        int8 = None
        if precision == "int8":
            from calibration.int8 import int8_graphs

            # ONNX Runtime's x86 int8 kernels overflow with full-range weights on CPUs
            # without VNNI; TensorRT needs no margin.
            reduce = engine_backend == "onnxruntime"
            int8 = int8_graphs(
                manifest, models, staging, log=log, reduce_range=reduce, **(int8_options or {})
            )
            new_artifacts += int8.entries
            rows += int8.rows
        for name, model in models.items():
            for role, fp32_file in ROLE_FILES[name]:
                if role not in ENGINE_ROLES:
                    continue
                fp32_art = manifest.artifact(role, "fp32", "onnxruntime")
                batch = fp32_art.batch
                if precision == "fp32":
                    graph_file = fp32_file
                    graph_path = out / fp32_file
                elif precision == "int8":
                    graph_path = int8.graphs.get(role)
                    if graph_path is None:  # kept in float: the manifest's "int8" section says why
                        continue
                else:
                    graph_file = fp32_file.replace(".onnx", f".{precision}.onnx")
                    graph_path = staging / graph_file
                    log(f"exporting {name} -> {graph_file} (fp16 trunk, fp32 islands)")
                    half = _half_copy(model)
                    kind = "superres" if role == "upsampler" else role
                    export_onnx(kind, half, graph_path, batch_max=batch["max"])
                    problems = check_tensorrt_ops(
                        onnx.load(str(graph_path), load_external_data=False)
                    )
                    if problems:
                        raise ExportError(
                            f"{graph_file}: ops TensorRT cannot parse: {problems[:5]}"
                        )
                    new_artifacts.append(
                        artifact_entry(
                            staging,
                            graph_file,
                            role,
                            precision,
                            batch,
                            opset=OPSET,
                            trt_op_check="pass",
                        )
                    )
                    batches = tuple(b for b in (1, 3) if batch["min"] <= b <= batch["max"]) or (
                        batch["min"],
                    )
                    row = check_artifact(graph_path, role, model, precision=precision, batches=batches,
                                         tol=tolerance_for(precision))  # fmt: skip
                    row.what += FP16_ON_CPU_NOTE
                    rows.append(row)
                if engine_backend == "tensorrt":
                    new_artifacts.append(
                        _trt_engine(
                            graph_path,
                            staging,
                            out,
                            role,
                            precision,
                            batch,
                            workspace_gb,
                            opt_level,
                            log,
                        )
                    )
        if engine_backend == "onnxruntime":
            new_artifacts = _with_ort_optimized(out, staging, data, new_artifacts, precision, log)
        if rows:
            log(format_table(rows))
        if int8 is not None:  # a rebuild may quantise fewer graphs than the last one
            data = int8.without_old_int8(data)
        data = _merged_manifest(data, new_artifacts, rows)
        if int8 is not None:
            data["int8"] = int8.summary
        commit_build(out, staging, data)
        if trajectory_steps and precision != "fp32":
            _record_trajectory(out, models, precision, trajectory_steps, log)
        return Manifest.load(out).data
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _with_ort_optimized(out, staging, data, new_artifacts, precision, log) -> list[dict]:
    """Save ONNX Runtime's optimised graph beside each engine of this precision, recorded as the
    artefact's `ort_optimized` (level "extended": fusions that hold on any CPU; the runtime loads
    it when its onnxruntime version matches). Graphs with external data are left as they are."""
    import onnxruntime as ort

    from runtime.manifest import sha256_of

    engines = [a for a in new_artifacts if a["backend"] == "onnxruntime"]
    if precision == "fp32":
        engines += [
            dict(a) for a in data["artifacts"]
            if a["precision"] == "fp32" and a["backend"] == "onnxruntime" and a["role"] in ENGINE_ROLES
        ]  # fmt: skip
    updated = {}
    for a in engines:
        if a["role"] not in ENGINE_ROLES or "external_data" in a:
            continue
        src = staging / a["file"] if (staging / a["file"]).exists() else out / a["file"]
        opt_file = a["file"].replace(".onnx", ".ortopt.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(staging / opt_file)
        opts.log_severity_level = 3
        ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])
        a = dict(a)
        a["ort_optimized"] = {
            "file": opt_file,
            "sha256": sha256_of(staging / opt_file),
            "level": "extended",
            "onnxruntime": ort.__version__,
        }
        updated[a["file"]] = a
        log(f"saved ONNX Runtime's optimised graph {opt_file}")
    kept = [a for a in new_artifacts if a["file"] not in updated]
    return kept + list(updated.values())


def _half_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    half = copy.deepcopy(model)
    half.convert_trunk(torch.float16)
    return half


def _trt_engine(graph_path, staging, out, role, precision, batch, workspace_gb, opt_level, log):
    from export.exporter import graph_io
    from export.trt_build import engine_from_onnx

    plan_file = graph_path.name.replace(".onnx", ".plan")
    if precision == "fp32":
        plan_file = graph_path.name.replace(".onnx", ".fp32.plan")
    inputs, _ = graph_io(graph_path)
    log(f"building TensorRT engine {plan_file}")
    extra = engine_from_onnx(
        graph_path, staging / plan_file, batch=batch, inputs=inputs, precision=precision,
        timing_cache=out / "timing.cache", workspace_gb=workspace_gb, opt_level=opt_level, log=log,
    )  # fmt: skip
    return artifact_entry(staging, plan_file, role, precision, batch, graph=graph_path, **extra)


def _merged_manifest(data: dict[str, Any], new_artifacts: list[dict], rows: list) -> dict[str, Any]:
    files = {a["file"] for a in new_artifacts}
    data = dict(data)
    data["artifacts"] = [a for a in data["artifacts"] if a["file"] not in files] + new_artifacts
    parity = dict(data.get("parity", {}))
    by_file = {r["artifact"]: r for r in parity.get("components", [])}
    by_file.update({r.artifact: r.to_json() for r in rows})
    parity["components"] = list(by_file.values())
    data["parity"] = parity
    return data


def _record_trajectory(out: Path, models, precision: str, steps: str, log) -> None:
    """Run the fp16 (etc.) pipeline against the fp32 reference loop and record the figures."""
    from export.trajectory import format_rows, trajectory_parity
    from runtime.manifest import write_json_atomic
    from runtime.pipeline import Pipeline

    with Pipeline.from_manifest(out, precision=precision, backend="onnxruntime") as pipe:
        if pipe.unet_artifact.precision != precision:
            return
        rows = trajectory_parity(pipe, models, steps=steps)
    log(format_rows(rows))
    manifest = Manifest.load(out)
    data = manifest.data
    kept = [
        r for r in data.get("parity", {}).get("trajectories", []) if r["precision"] != precision
    ]
    data.setdefault("parity", {})["trajectories"] = kept + [r.to_json() for r in rows]
    write_json_atomic(out / MANIFEST_NAME, data)


__all__ = ["build", "choose_backend", "tensorrt_available", "COMPONENT_KIND", "PRECISIONS"]
