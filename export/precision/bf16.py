"""bf16 for CPUs with bf16 units: each fp32 graph as OpenVINO IR, run at bf16 arithmetic.

OpenVINO's CPU plugin runs bf16 on AVX512-BF16 and AMX-BF16 (`INFERENCE_PRECISION_HINT`): it
keeps what needs fp32 (normalisations, softmax) in fp32 itself, so the graph stays the fp32 one
with fp32 weights. The artefact is that graph as OpenVINO IR (`unet.bf16.xml` + `.bin`, with
the ConvTranspose fix of `runtime.backends.openvino` already applied), which loads faster than
ONNX and names its precision in the manifest; the runtime compiles it with the bf16 hint.

The classifier gradient stays fp32 (the build's fp32 graph, on the runtime's CPU backend): guided
DDIM amplifies gradient error at the high-noise steps, and a bf16 gradient moved the digits
family's 25-step guided DDIM samples by up to 1.98 (of a [-1, 1] range) where a bf16 UNet with the
fp32 gradient moved them by 0.019 (fp16 storage: 0.011; AMD EPYC Zen 4, OpenVINO 2026).
"""

from __future__ import annotations

from pathlib import Path

from export.graphs import ExportError, StagedGraph
from runtime.roles import ROLES

BF16_NOTE = "; OpenVINO CPU at bf16 inference precision"


def bf16_ready() -> tuple[bool, str]:
    """(usable, why not): openvino importable and its CPU plugin reports native bf16."""
    from runtime.backends import BackendError
    from runtime.backends.openvino import cpu_has_bf16

    try:
        ok = cpu_has_bf16()
    except BackendError as e:
        return False, str(e)
    if not ok:
        from runtime import cpu

        return False, (
            f"this CPU ({cpu.cpu_info()['model']}) has no bf16 units (AVX512-BF16 or AMX-BF16), "
            f"so bf16 would be emulated slowly and measure nothing real"
        )
    return True, ""


KEPT_FP32 = {
    "classifier_grad": (
        "guided DDIM amplifies the gradient's bf16 error at high-noise steps; the bf16 pipeline "
        "runs the fp32 gradient graph"
    ),
}


class Bf16:
    name = "bf16"

    def prepare(self, manifest, models, staging, log) -> None:
        ok, why = bf16_ready()
        if not ok:
            raise ExportError(
                f"--bf16: {why}. Build --fp32 (or --int8) on this machine, or build --bf16 on a "
                f"CPU with bf16 units"
            )

    def graph(self, role, fp32: Path, model, staging: Path, batch, log) -> StagedGraph | None:
        import openvino as ov

        from export.parity import tolerance_for
        from runtime.backends.openvino import read_model

        if role in KEPT_FP32:
            log(f"{role}: kept fp32 ({KEPT_FP32[role]})")
            return None
        file = ROLES[role].file.replace(".onnx", ".bf16.xml")
        log(f"converting {fp32.name} -> {file} (OpenVINO IR, bf16 inference precision)")
        ov.save_model(read_model(fp32), str(staging / file), compress_to_fp16=False)
        return StagedGraph(
            role, "bf16", staging / file, note=BF16_NOTE, tol=tolerance_for("bf16"), source=fp32,
        )  # fmt: skip

    def finish(self, writer) -> None:
        writer.put_section("bf16", {"kept_fp32": dict(KEPT_FP32), "openvino": _version()})


def _version() -> str:
    import openvino

    return openvino.__version__


__all__ = ["Bf16", "bf16_ready", "ExportError"]
