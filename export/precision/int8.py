"""The int8 leaf of `gdexport build --int8`: calibration set, Q/DQ graphs, their measured quality.

For each engine role of the build (UNet, classifier gradient, upsampler) with recorded calls:
quantise the fp32 graph and measure it against the fp32 graph on the recorded trajectories
(recorded in its manifest entry); the build loop then checks its engine against the PyTorch
reference (report only: int8 has no tolerance). The classifier gradient is kept only where its accuracy holds (`quality.gradient_holds`);
otherwise the build keeps no int8 gradient graph, the int8 pipeline runs the float one, and the
manifest's "int8" section says which and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from calibration.dataset import CalibrationError, record_calibration_set
from calibration.quality import compare_graphs, format_error, gradient_holds
from calibration.quantize import DEFAULT_KEEP, QuantizeError, describe_exclusions, quantize_graph
from export.graphs import ExportError, StagedGraph
from runtime.roles import ROLES

INT8_NOTE = "; int8 Q/DQ graph (report only: no tolerance for int8)"


class Int8:
    """Q/DQ graphs calibrated on BUILD/calibration/ (recorded or completed first: `samples`,
    `steps` are settings for a new set, None = the existing set's or the defaults).
    `reduce_range`: 7-bit weights, for graphs ONNX Runtime runs on x86 CPUs without VNNI (see
    `quantize_graph`)."""

    name = "int8"

    def __init__(
        self,
        method: str = "percentile",
        keep: Iterable[str] = DEFAULT_KEEP,
        samples: int | None = None,
        steps: str | None = None,
        reduce_range: bool = False,
    ):
        self.method, self.keep = method, list(keep)
        self.samples, self.steps, self.reduce_range = samples, steps, reduce_range
        self.summary: dict[str, Any] = {}

    def prepare(self, manifest, models, staging: Path, log) -> None:
        self.manifest = manifest
        try:
            self.calib = record_calibration_set(
                manifest.folder, samples=self.samples, steps=self.steps, log=log
            )
        except (CalibrationError, QuantizeError) as e:
            raise ExportError(str(e)) from e
        calib, c = self.calib, self.calib.config
        log(
            f"calibration set: {calib.samples} samples, steps {c.steps}"
            + (f" (upsampler {c.upsampler_steps})" if c.upsampler_steps else "")
            + f", guidance scale {c.scale:g}, seed {c.seed}: "
            + ", ".join(f"{r} {calib.calls(r)} calls" for r in calib.roles)
        )
        self.summary = {
            "calibration": {
                "method": self.method,
                "samples": calib.samples,
                "steps": c.steps,
                "upsampler_steps": c.upsampler_steps,
                "scale": c.scale,
                "seed": c.seed,
                "sampler": f"{c.sampler} eta {c.eta:g}",
                "folder": calib.folder.name,
            },
            "keep_fp32": self.keep,
            "weight_range": "7-bit" if self.reduce_range else "8-bit",
            "components": {},
        }
        if manifest.artifact("unet", "fp32", "onnxruntime") is None:
            raise ExportError(f"the build in {manifest.folder} has no fp32 UNet graph to quantise")

    def graph(self, role, fp32: Path, model, staging: Path, batch, log) -> StagedGraph | None:
        try:
            return self._graph(role, fp32, staging, log)
        except (CalibrationError, QuantizeError) as e:
            raise ExportError(str(e)) from e

    def _graph(self, role, fp32: Path, staging: Path, log) -> StagedGraph | None:
        manifest, calib = self.manifest, self.calib
        components = self.summary["components"]
        if not calib.calls(role):
            fallback = float_fallback(manifest, role)
            why = "no calls recorded (guidance scale 0 when the set was recorded)"
            log(f"{role}: not quantised, {why}; the int8 pipeline runs {fallback}")
            components[role] = {"quantized": False, "why": why, "runs": fallback}
            return None
        file = ROLES[role].file.replace(".onnx", ".int8.onnx")
        path = staging / file
        q = quantize_graph(
            fp32, path, calib, role, method=self.method, keep=self.keep,
            reduce_range=self.reduce_range, log=log,
        )  # fmt: skip
        err = compare_graphs(fp32, path, calib.feeds(role))
        log(format_error(file, err) + f"; kept in float: {describe_exclusions(q.excluded)}")
        why = None
        if role == "classifier_grad":
            ok, why = gradient_holds(err, _alphas_cumprod(manifest))
            if not ok:
                path.unlink()
                for extra in staging.glob(file + ".data"):
                    extra.unlink()
                fallback = float_fallback(manifest, role)
                log(f"{role}: int8 does not hold ({why}); the int8 pipeline runs {fallback}")
                components[role] = {
                    "quantized": False, "why": why, "runs": fallback, "error": err.to_json(),
                }  # fmt: skip
                return None
        components[role] = {"quantized": True, "file": file}
        if why is not None:
            components[role]["why"] = why
        fields = dict(
            source_graph=fp32.name, **q.manifest_fields(), calibration_error=err.to_json()
        )
        fields["calibration"].update(self.summary["calibration"])
        return StagedGraph(role, "int8", path, fields=fields, note=INT8_NOTE, tol=None)

    def finish(self, writer) -> None:
        writer.put_section("int8", self.summary)


def _alphas_cumprod(manifest):
    """alpha_bar over all model timesteps of the schedule guidance runs on (the base UNet's)."""
    from runtime.schedule import make_schedule

    d = manifest.components["unet"]["diffusion"]
    return make_schedule(d["noise_schedule"], d["diffusion_steps"]).alphas_cumprod


def float_fallback(manifest, role: str) -> str:
    """The graph the int8 pipeline runs for `role` when the build has no int8 one: the nearest
    precision on the UNet's backend, by the rule `Pipeline.from_manifest` applies."""
    art = manifest.nearest(role, "int8", "onnxruntime")
    return f"{art.file} ({art.precision})" if art is not None else "none"
