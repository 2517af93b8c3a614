"""`gdexport export`: components -> ONNX graphs + manifest in a build folder, atomically.

Everything is written into a staging folder inside the build folder first; only when every graph
exported, passed the TensorRT op check and (unless skipped) the parity check, are the files moved
in and the manifest written, last. An interrupted or failed export leaves no manifest.
"""

from __future__ import annotations

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

from export.graphs import EngineOptions, ExportError, StagedGraph, finish_graph
from export.loading import build_model, load_model
from export.spec import ModelSpec, resolve_spec
from runtime.manifest import Manifest, ManifestError, ManifestWriter, sha256_of
from runtime.roles import COMPONENT_KIND, roles_of

# Raised by the export and the build alike (defined with the loop every graph goes through).
__all__ = ["ComponentSource", "ExportError", "export_build", "load_component"]


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
        flag = {"unet": "--preset"}.get(component, f"--{component}-preset")
        return load_model(source.spec, source.checkpoint, kind=kind, flag=flag)
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


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ExportError(
            f"cannot write to build folder {out}: {e.strerror or e}; choose another -o"
        ) from None


def check_finite(models: dict[str, nn.Module], sources: dict[str, ComponentSource]) -> None:
    """Refuse weights with NaN or inf before anything is exported: such a network exports and
    may even match its own reference, but samples nothing."""
    for name, model in models.items():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                where = sources[name].checkpoint or f"random weights (seed {sources[name].seed})"
                raise ExportError(
                    f"the {name} weights hold {bad} non-finite value(s) (NaN or inf) in {key} "
                    f"({where}); nothing was written. A diverged or corrupted checkpoint: use an "
                    f"earlier or the EMA checkpoint, or check how the file was converted"
                )


def new_staging(out: Path) -> Path:
    """A fresh staging folder in `out` (named for this process), after removing those left by
    builds that were killed: a staging folder whose process no longer runs."""
    for old in out.glob(".staging-*"):
        pid = old.name.split("-")[1] if old.name.count("-") >= 2 else ""
        if old.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=out))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


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
    check_finite(models, components)
    check_writable(out)
    batch = {"min": batch_min, "opt": batch_opt, "max": batch_max}
    staging = new_staging(out)
    try:
        from export import onnx_export
        from export.parity import format_table, tolerance_for

        writer = ManifestWriter.new(
            components=component_records(models, components),
            sampling=sampling_defaults(models),
            tools=tool_versions(),
        )
        rows = []
        for name, model in models.items():
            for role in roles_of(name):
                log(f"exporting {name} -> {role.file}")
                onnx_export.export_onnx(role.name, model, staging / role.file, batch_max=batch_max)
                graph = StagedGraph(
                    role.name, "fp32", staging / role.file, tol=tolerance_for("fp32")
                )
                entries, new_rows = finish_graph(
                    graph, model, staging, batch, EngineOptions(), check=check, log=log
                )
                writer.put_artifacts(entries)
                rows += new_rows
        if rows:
            log(format_table(rows))
        writer.put_parity(rows)
        return writer.commit(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def component_records(
    models: dict[str, nn.Module], sources: dict[str, ComponentSource]
) -> dict[str, Any]:
    """The manifest's "components": what the runtime needs of each network, and its source."""
    comps = {}
    for name, model in models.items():
        spec: ModelSpec = model.spec
        comps[name] = {
            "kind": spec.kind,
            "preset": spec.preset,
            "image_size": spec.image_size,
            "num_classes": spec.num_classes,
            "low_res_size": spec.low_res_size,
            "diffusion": spec.diffusion,
            "weights": sources[name].describe(),
            "spec": spec.to_json(),
        }
    return comps


def sampling_defaults(models: dict[str, nn.Module]) -> dict[str, Any]:
    """The manifest's "sampling": the defaults `runtime.sample` uses (the presets' advice)."""
    base = models.get("unet")
    clf = models.get("classifier")
    up = models.get("upsampler")
    scale = None
    if clf is not None:
        scale = clf.spec.recommended_scale
        if scale is None and base is not None:
            scale = base.spec.recommended_scale
    return {
        "scale": scale if scale is not None else (1.0 if clf is not None else 0.0),
        "respacing": base.spec.recommended_respacing if base is not None else "250",
        "upsampler_respacing": up.spec.recommended_respacing if up is not None else None,
        "upsampler_start_t": up.spec.recommended_start_t if up is not None else None,
        "grayscale": base.spec.grayscale if base is not None else False,
        "sampler": "ddim",
        "clip_denoised": True,
    }
