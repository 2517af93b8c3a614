"""What `gdexport build --int8` runs: calibration set, Q/DQ graphs, their measured quality.

For each engine role of the build (UNet, classifier gradient, upsampler) with recorded calls:
quantise the fp32 graph, measure it against the fp32 graph on the recorded trajectories and
against the PyTorch reference (`check_artifact`, report only), and record both in its manifest
entry. The classifier gradient is kept only where its accuracy holds (`quality.gradient_holds`);
otherwise the build keeps no int8 gradient graph, the int8 pipeline runs the float one, and the
manifest's "int8" section says which and why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.dataset import CalibrationError, record_calibration_set
from calibration.quality import compare_graphs, format_error, gradient_holds
from calibration.quantize import DEFAULT_KEEP, QuantizeError, describe_exclusions, quantize_graph

COMPONENT_OF = {"unet": "unet", "classifier_grad": "classifier", "upsampler": "upsampler"}
INT8_NOTE = "; int8 Q/DQ graph (report only: no tolerance for int8)"


@dataclass
class Int8Graphs:
    """The staged int8 graphs of a build, their manifest entries and parity rows."""

    graphs: dict[str, Path] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    rows: list = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def without_old_int8(data: dict[str, Any]) -> dict[str, Any]:
        """The manifest data less a previous int8 build's artefacts and parity rows."""
        parity = dict(data.get("parity", {}))
        parity["components"] = [r for r in parity.get("components", []) if r["precision"] != "int8"]
        parity["trajectories"] = [
            r for r in parity.get("trajectories", []) if r["precision"] != "int8"
        ]
        artifacts = [a for a in data["artifacts"] if a["precision"] != "int8"]
        return dict(data, artifacts=artifacts, parity=parity)


def int8_graphs(
    manifest,
    models: Mapping[str, Any],
    staging: Path,
    *,
    method: str = "percentile",
    keep: Iterable[str] = DEFAULT_KEEP,
    samples: int | None = None,
    steps: str | None = None,
    reduce_range: bool = False,
    log: Callable[[str], None] = print,
) -> Int8Graphs:
    """Quantise every engine graph of `manifest` into `staging` (`ROLE.int8.onnx`).

    Uses BUILD/calibration/, recording or completing it first (`samples`, `steps`: settings for
    a new set; None = the existing set's or the defaults). `reduce_range`: 7-bit weights, for
    graphs ONNX Runtime will run on x86 CPUs (see `quantize_graph`). Raises ExportError on failure.
    """
    from export.exporter import ExportError

    try:
        return _int8_graphs(
            manifest, models, staging, method, list(keep), samples, steps, reduce_range, log
        )
    except (CalibrationError, QuantizeError) as e:
        raise ExportError(str(e)) from e


def _int8_graphs(
    manifest, models, staging, method, keep, samples, steps, reduce_range, log
) -> Int8Graphs:
    from export.exporter import artifact_entry
    from export.onnx_export import OPSET
    from export.parity import check_artifact

    out = manifest.folder
    calib = record_calibration_set(out, samples=samples, steps=steps, log=log)
    c = calib.config
    log(
        f"calibration set: {calib.samples} samples, steps {c.steps}"
        + (f" (upsampler {c.upsampler_steps})" if c.upsampler_steps else "")
        + f", guidance scale {c.scale:g}, seed {c.seed}: "
        + ", ".join(f"{r} {calib.calls(r)} calls" for r in calib.roles)
    )
    result = Int8Graphs()
    result.summary = {
        "calibration": {
            "method": method,
            "samples": calib.samples,
            "steps": c.steps,
            "upsampler_steps": c.upsampler_steps,
            "scale": c.scale,
            "seed": c.seed,
            "sampler": f"{c.sampler} eta {c.eta:g}",
            "folder": calib.folder.name,
        },
        "keep_fp32": keep,
        "components": {},
    }
    for role in ("unet", "classifier_grad", "upsampler"):
        fp32 = manifest.artifact(role, "fp32", "onnxruntime")
        if fp32 is None or fp32.precision != "fp32":
            continue
        if not calib.calls(role):
            fallback = _float_fallback(manifest, role)
            why = "no calls recorded (guidance scale 0 when the set was recorded)"
            log(f"{role}: not quantised, {why}; the int8 pipeline runs {fallback}")
            result.summary["components"][role] = {
                "quantized": False, "why": why, "runs": fallback,
            }  # fmt: skip
            continue
        file = fp32.file.replace(".onnx", ".int8.onnx")
        path = staging / file
        q = quantize_graph(
            manifest.verify(fp32), path, calib, role, method=method, keep=keep,
            reduce_range=reduce_range, log=log,
        )  # fmt: skip
        err = compare_graphs(manifest.path_of(fp32), path, calib.feeds(role))
        log(format_error(file, err) + f"; kept in float: {describe_exclusions(q.excluded)}")
        if role == "classifier_grad":
            ok, why = gradient_holds(err, _alphas_cumprod(manifest))
            if not ok:
                path.unlink()
                for extra in staging.glob(file + ".data"):
                    extra.unlink()
                fallback = _float_fallback(manifest, role)
                log(f"{role}: int8 does not hold ({why}); the int8 pipeline runs {fallback}")
                result.summary["components"][role] = {
                    "quantized": False, "why": why, "runs": fallback, "error": err.to_json(),
                }  # fmt: skip
                continue
        result.summary["components"][role] = {"quantized": True, "file": file}
        if role == "classifier_grad":
            result.summary["components"][role]["why"] = why
        entry = artifact_entry(
            staging, file, role, "int8", fp32.batch, opset=OPSET, trt_op_check="pass",
            source_graph=fp32.file, **q.manifest_fields(),
            calibration_error=err.to_json(),
        )  # fmt: skip
        entry["calibration"].update(result.summary["calibration"])
        result.entries.append(entry)
        result.graphs[role] = path
        batches = (1, 4, 16) if role == "classifier_grad" else (1, 3)
        batches = tuple(b for b in batches if fp32.batch["min"] <= b <= fp32.batch["max"]) or (
            fp32.batch["min"],
        )
        row = check_artifact(
            path, role, models[COMPONENT_OF[role]], precision="int8", batches=batches, tol=None
        )
        row.what += INT8_NOTE
        result.rows.append(row)
    if "unet" not in result.graphs:
        raise QuantizeError(f"the build in {out} has no fp32 UNet graph to quantise")
    return result


def _alphas_cumprod(manifest):
    """alpha_bar over all model timesteps of the schedule guidance runs on (the base UNet's)."""
    from runtime.schedule import make_schedule

    d = manifest.components["unet"]["diffusion"]
    return make_schedule(d["noise_schedule"], d["diffusion_steps"]).alphas_cumprod


def _float_fallback(manifest, role: str) -> str:
    """The graph the int8 pipeline picks for `role` when the build has no int8 one
    (`Pipeline.from_manifest`: the first ONNX Runtime artefact of the role)."""
    art = manifest.artifact(role, None, "onnxruntime")
    return f"{art.file} ({art.precision})" if art is not None else "none"
