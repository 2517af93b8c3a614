"""fp16 graphs: the reference re-exported with its trunk's convolutions in half.

GroupNorm, softmax, the timestep embedding, the output head and the classifier's log-softmax stay
fp32 islands by construction, as the original's own fp16 mode runs (`convert_to_fp16`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from export.graphs import StagedGraph
from runtime.roles import ROLES

FP16_ON_CPU_NOTE = (
    "; ONNX Runtime on x86 CPUs runs most fp16 ops as fp32 behind inserted casts, so this "
    "measures fp16 storage rounding of weights and activations, not fp16 arithmetic"
)


def half_copy(model: nn.Module) -> nn.Module:
    """A copy of the reference with its trunk in float16 (the model itself is left fp32)."""
    half = copy.deepcopy(model)
    half.convert_trunk(torch.float16)
    return half


class Fp16:
    name = "fp16"

    def prepare(self, manifest, models, staging, log) -> None:
        pass

    def graph(self, role, fp32: Path, model, staging: Path, batch, log) -> StagedGraph:
        from export import onnx_export
        from export.parity import tolerance_for

        file = ROLES[role].file.replace(".onnx", ".fp16.onnx")
        log(f"exporting {ROLES[role].component} -> {file} (fp16 trunk, fp32 islands)")
        onnx_export.export_onnx(role, half_copy(model), staging / file, batch_max=batch["max"])
        return StagedGraph(
            role, "fp16", staging / file, note=FP16_ON_CPU_NOTE, tol=tolerance_for("fp16")
        )

    def finish(self, writer) -> None:
        pass
