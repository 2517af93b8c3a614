"""`gdexport export`: components -> ONNX graphs + manifest in a build folder, atomically.

Everything is written into a staging folder inside the build folder first; only when every graph
exported, passed the TensorRT op check and (unless skipped) the parity check, are the files moved
in and the manifest written, last. An interrupted or failed export leaves no manifest.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.loading import build_model, load_model
from export.spec import ModelSpec, resolve_spec
from runtime.manifest import (
    FORMAT,
    MANIFEST_NAME,
    VERSION,
    Manifest,
    ManifestError,
    TensorSpec,
    sha256_of,
    write_json_atomic,
)

COMPONENT_KIND = {"unet": "unet", "classifier": "classifier", "upsampler": "superres"}
ROLE_FILES = {
    "unet": [("unet", "unet.onnx")],
    "classifier": [("classifier_grad", "classifier_grad.onnx"), ("classifier", "classifier.onnx")],
    "upsampler": [("upsampler", "upsampler.onnx")],
}


class ExportError(RuntimeError):
    """An export that could not complete; nothing was left in the build folder."""


@dataclass
class ComponentSource:
    """Where a component comes from: a spec, and a checkpoint or a seed for random weights."""

    spec: str | dict[str, Any] | ModelSpec
    checkpoint: str | Path | None = None
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        if self.checkpoint is None:
            return {"random_seed": self.seed}
        path = Path(self.checkpoint).resolve()
        return {"checkpoint": str(path), "checkpoint_sha256": sha256_of(path)}


def load_component(component: str, source: ComponentSource) -> nn.Module:
    """The reference network of a component, from its checkpoint or seeded random weights."""
    kind = COMPONENT_KIND[component]
    if source.checkpoint is not None:
        return load_model(source.spec, source.checkpoint, kind=kind)
    spec = resolve_spec(source.spec, kind)
    torch.manual_seed(source.seed)
    return build_model(spec)


def load_component_from_manifest(manifest: Manifest, component: str) -> nn.Module:
    """Rebuild the reference a build was exported from (for `gdexport check`)."""
    c = manifest.components[component]
    spec = ModelSpec(**c["spec"])
    w = c["weights"]
    if "checkpoint" in w:
        path = Path(w["checkpoint"])
        if not path.is_file():
            raise ManifestError(
                f"the {component} checkpoint {path} recorded in the manifest is gone; "
                f"checking needs the reference weights"
            )
        return load_model(spec, path, kind=spec.kind)
    torch.manual_seed(w["random_seed"])
    return build_model(spec)


def tool_versions() -> dict[str, str]:
    import onnx

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        versions["gdexport"] = version("gdexport")
    except Exception:
        versions["gdexport"] = "unknown"
    return versions


def graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    names = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 11: "float64"}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else "batch" for d in t.shape.dim)
        return TensorSpec(v.name, names.get(t.elem_type, str(t.elem_type)), shape)

    init = {i.name for i in m.graph.initializer}
    return [spec(i) for i in m.graph.input if i.name not in init], [spec(o) for o in m.graph.output]


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ExportError(
            f"cannot write to build folder {out}: {e.strerror or e}; choose another -o"
        ) from None


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
    """The manifest entry of `staging/file`: an ONNX graph, or a TensorRT plan built from
    `graph` (whose inputs and outputs the plan has)."""
    path = staging / file
    inputs, outputs = graph_io(graph or path)
    data = path.with_name(file + ".data")
    entry = {
        "file": file,
        "role": role,
        "precision": precision,
        "backend": "tensorrt" if graph is not None else "onnxruntime",
        "format": "plan" if graph is not None else "onnx",
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


def commit_build(out: Path, staging: Path, manifest: dict[str, Any]) -> None:
    """Move staged files into `out` and write the manifest last, atomically.

    The old manifest goes first, so at no moment does a manifest point at files being replaced.
    """
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    write_json_atomic(out / MANIFEST_NAME, manifest)


def export_build(
    out: str | Path,
    components: dict[str, ComponentSource],
    *,
    batch_min: int = 1,
    batch_opt: int = 1,
    batch_max: int = 16,
    check: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export every given component ("unet", "classifier", "upsampler") into `out`.

    Returns the manifest written. Raises ExportError (or SpecError / CheckpointError for bad
    inputs, before anything is written).
    """
    from export.onnx_export import OPSET, export_onnx
    from export.parity import check_artifact, format_table
    from export.trt_ops import check_tensorrt_ops

    out = Path(out)
    if not components:
        raise ExportError(
            "nothing to export: give --preset/--model-flags/--config for at least one component"
        )
    if not 1 <= batch_min <= batch_opt <= batch_max:
        raise ExportError(
            f"batch range must satisfy 1 <= min <= opt <= max, got {batch_min}/{batch_opt}/{batch_max}"
        )
    models = {name: load_component(name, src) for name, src in components.items()}
    check_writable(out)
    batch = {"min": batch_min, "opt": batch_opt, "max": batch_max}
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        import onnx

        artifacts, rows = [], []
        for name, model in models.items():
            for role, file in ROLE_FILES[name]:
                log(f"exporting {name} -> {file}")
                kind = "superres" if role == "upsampler" else role
                export_onnx(kind, model, staging / file, batch_max=batch_max)
                problems = check_tensorrt_ops(
                    onnx.load(str(staging / file), load_external_data=False)
                )
                if problems:
                    raise ExportError(
                        f"{file} has {len(problems)} op(s) TensorRT cannot parse: "
                        + "; ".join(map(str, problems[:5]))
                    )
                artifacts.append(
                    artifact_entry(
                        staging, file, role, "fp32", batch, opset=OPSET, trt_op_check="pass"
                    )
                )
                if check:
                    batches = (1, 4, 16) if role == "classifier_grad" else (1, 3)
                    batches = tuple(b for b in batches if batch_min <= b <= batch_max) or (
                        batch_min,
                    )
                    rows.append(check_artifact(staging / file, role, model, batches=batches))
        if rows:
            log(format_table(rows))
            bad = [r for r in rows if not r.passed]
            if bad:
                raise ExportError(
                    "parity check failed for "
                    + ", ".join(
                        f"{r.artifact} (max abs {r.max_abs:.2e} > {r.tol:.0e})" for r in bad
                    )
                    + "; nothing was written"
                )
        manifest = make_manifest(models, components, artifacts, rows)
        commit_build(out, staging, manifest)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_manifest(
    models: dict[str, nn.Module],
    sources: dict[str, ComponentSource],
    artifacts: list[dict[str, Any]],
    rows: list,
) -> dict[str, Any]:
    comps = {}
    for name, model in models.items():
        spec: ModelSpec = model.spec
        comps[name] = {
            "kind": spec.kind,
            "preset": spec.preset,
            "image_size": spec.image_size,
            "num_classes": spec.num_classes,
            "low_res_size": spec.ctor.get("small_size"),
            "diffusion": spec.diffusion,
            "weights": sources[name].describe(),
            "spec": spec.to_json(),
        }
    base = models.get("unet")
    clf = models.get("classifier")
    scale = None
    if clf is not None:
        scale = clf.spec.recommended_scale
        if scale is None and base is not None:
            scale = base.spec.recommended_scale
    sampling = {
        "scale": scale if scale is not None else (1.0 if clf is not None else 0.0),
        "respacing": base.spec.recommended_respacing if base is not None else "250",
        "upsampler_respacing": models["upsampler"].spec.recommended_respacing
        if "upsampler" in models
        else None,
        "upsampler_start_t": models["upsampler"].spec.recommended_start_t
        if "upsampler" in models
        else None,
        "grayscale": base.spec.grayscale if base is not None else False,
        "sampler": "ddim",
        "clip_denoised": True,
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tools": tool_versions(),
        "components": comps,
        "sampling": sampling,
        "artifacts": artifacts,
        "parity": {"components": [r.to_json() for r in rows]},
    }
