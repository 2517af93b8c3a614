"""The build's one loop per graph: op check -> engine -> parity through one Backend -> entry.

Every graph a build makes, whatever its precision (the fp32 export, the fp16 and int8 leaves in
`export/precision/`), goes through `finish_graph`: the TensorRT op check, the engine
(a TensorRT plan where TensorRT runs, else the graph itself for ONNX Runtime), the parity check of
that engine against the PyTorch reference through the backend that will run it, and the
manifest entries. A graph whose engine disagrees with the reference, or gives non-finite
outputs, fails the build before anything is committed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from runtime.manifest import TensorSpec, sha256_of
from runtime.roles import ROLES

ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 11: "float64"}


class ExportError(RuntimeError):
    """An export or build that could not complete; the build folder was left as it was."""


@dataclass
class StagedGraph:
    """A graph of one role and precision in the staging folder, before its engine and check.

    `fields`: extra manifest fields of its entry; `note`: appended to its parity row's `what`;
    `tol`: the parity tolerance (see `export.parity.tolerance_for`), None to report only;
    `source`: for an OpenVINO IR `.xml`, the ONNX graph it was converted from (whose inputs and
    outputs it has, and which passed the op check)."""

    role: str
    precision: str
    path: Path
    fields: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    tol: Any = None
    source: Path | None = None


@dataclass
class EngineOptions:
    """Where the build's engines run, and TensorRT's settings where that is TensorRT."""

    backend: str = "onnxruntime"  # or "tensorrt", or "openvino" (bf16 IR)
    workspace_gb: float = 4.0
    opt_level: int = 3
    timing_cache: Path | None = None


def graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A graph's inputs and outputs as the manifest records them ("batch" for dynamic dims)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else "batch" for d in t.shape.dim)
        return TensorSpec(v.name, ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape)

    init = {i.name for i in m.graph.initializer}
    return [spec(i) for i in m.graph.input if i.name not in init], [spec(o) for o in m.graph.output]


def artifact_entry(
    staging: Path,
    file: str,
    role: str,
    precision: str,
    batch: dict[str, int],
    *,
    graph: Path | None = None,
    **extra,
) -> dict[str, Any]:
    """The manifest entry of `staging/file`: an ONNX graph, or a TensorRT plan (`.plan`) or
    OpenVINO IR (`.xml` + `.bin`) made from `graph` (whose inputs and outputs it has)."""
    path = staging / file
    inputs, outputs = graph_io(graph or path)
    backend, fmt = ("onnxruntime", "onnx")
    if graph is not None:
        backend, fmt = ("openvino", "ir") if path.suffix == ".xml" else ("tensorrt", "plan")
    data = path.with_suffix(".bin") if fmt == "ir" else path.with_name(file + ".data")
    entry = {
        "file": file,
        "role": role,
        "precision": precision,
        "backend": backend,
        "format": fmt,
        "sha256": sha256_of(path),
        "bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
        "inputs": [t.to_json() for t in inputs],
        "outputs": [t.to_json() for t in outputs],
        "batch": batch,
    }
    if data.exists():
        entry["external_data"] = {"file": data.name, "sha256": sha256_of(data)}
    if graph is not None:
        entry["source_graph"] = graph.name
    entry.update(extra)
    return entry


def check_ops(path: Path) -> None:
    """Raise ExportError when the graph has ops or attributes TensorRT cannot parse."""
    import onnx

    from export.trt_ops import check_tensorrt_ops

    problems = check_tensorrt_ops(onnx.load(str(path), load_external_data=False))
    if problems:
        raise ExportError(
            f"{path.name} has {len(problems)} op(s) TensorRT cannot parse: "
            + "; ".join(map(str, problems[:5]))
        )


def finish_graph(
    graph: StagedGraph,
    model: nn.Module,
    staging: Path,
    batch: dict[str, int],
    engines: EngineOptions,
    *,
    check: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], list]:
    """Op check, engine, parity, entries: (manifest entries, parity rows) of one staged graph.

    Raises ExportError when the engine's outputs are non-finite or out of tolerance."""
    from export.onnx_export import OPSET
    from export.parity import check_artifact

    if graph.path.suffix == ".xml":  # OpenVINO IR of an ONNX graph checked at its export
        entries = [
            artifact_entry(
                graph.path.parent, graph.path.name, graph.role, graph.precision, batch,
                graph=graph.source, openvino=_openvino_version(), **graph.fields,
            )
        ]  # fmt: skip
        engine_path, backend = graph.path, "openvino"
    else:
        check_ops(graph.path)
        entries = [
            artifact_entry(
                graph.path.parent, graph.path.name, graph.role, graph.precision, batch,
                opset=OPSET, trt_op_check="pass", **graph.fields,
            )
        ]  # fmt: skip
        engine_path, backend = graph.path, "onnxruntime"
    if engines.backend == "tensorrt" and backend == "onnxruntime":
        entries.append(_trt_engine(graph, staging, batch, engines, log))
        engine_path, backend = staging / entries[-1]["file"], "tensorrt"
    rows = []
    if check:
        row = check_artifact(
            engine_path, graph.role, model, precision=graph.precision, tol=graph.tol,
            batches=ROLES[graph.role].batches_within(batch), backend=backend, batch=batch,
        )  # fmt: skip
        row.what += graph.note
        rows.append(row)
        if not row.finite:
            raise ExportError(
                f"{engine_path.name}: the {'engine' if backend == 'tensorrt' else 'graph'} or "
                f"the PyTorch reference gives non-finite outputs (NaN or inf) on seeded inputs; "
                f"the weights or the conversion are broken. Nothing was written; check the "
                f"checkpoint (every weight must be finite) and rebuild"
            )
        if row.passed is False:
            raise ExportError(
                f"parity check failed for {row.artifact} (max abs {row.max_abs:.2e} > "
                f"{row.tol:.0e} against the PyTorch reference); nothing was written"
            )
    return entries, rows


def _openvino_version() -> str:
    import openvino

    return openvino.__version__


def _trt_engine(graph: StagedGraph, staging: Path, batch, engines: EngineOptions, log) -> dict:
    from export.trt_build import engine_from_onnx

    plan_file = graph.path.name.replace(".onnx", ".plan")
    if graph.precision == "fp32":
        plan_file = graph.path.name.replace(".onnx", ".fp32.plan")
    inputs, _ = graph_io(graph.path)
    log(f"building TensorRT engine {plan_file}")
    extra = engine_from_onnx(
        graph.path, staging / plan_file, batch=batch, inputs=inputs, precision=graph.precision,
        timing_cache=engines.timing_cache, workspace_gb=engines.workspace_gb,
        opt_level=engines.opt_level, log=log,
    )  # fmt: skip
    return artifact_entry(
        staging, plan_file, graph.role, graph.precision, batch, graph=graph.path, **extra
    )


def save_ort_optimized(entry: dict[str, Any], src: Path, staging: Path, log) -> dict[str, Any]:
    """Save ONNX Runtime's optimised graph of `src` beside it, recorded as the entry's
    `ort_optimized` (level "extended": fusions that hold on any CPU; the runtime loads it when
    its onnxruntime version matches). Graphs with external data are left as they are."""
    import onnxruntime as ort

    if "external_data" in entry:
        return entry
    opt_file = entry["file"].replace(".onnx", ".ortopt.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(staging / opt_file)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])
    log(f"saved ONNX Runtime's optimised graph {opt_file}")
    return dict(
        entry,
        ort_optimized={
            "file": opt_file,
            "sha256": sha256_of(staging / opt_file),
            "level": "extended",
            "onnxruntime": ort.__version__,
        },
    )
