"""Precision leaves: each turns a build's fp32 graph of a role into a graph of its precision.

    leaf = precision_leaf("fp16")
    leaf.prepare(manifest, models, staging, log)        # int8: record or reuse calibration
    graph = leaf.graph(role, fp32_path, model, staging, batch, log)   # a StagedGraph, or None
    leaf.finish(writer)                                  # int8: the manifest's "int8" section

The build (`export.build`) runs every graph through the same loop (`export.graphs.finish_graph`);
a leaf only makes graphs. fp32 is the identity: the export's own graphs. fp16 re-exports the
reference with its trunk in half (fp32 islands by construction, as the original's fp16 mode
runs), which keeps GroupNorm, softmax and the timestep embedding fp32 exactly where the original
keeps them; bf16 (CPUs with bf16 units) converts the fp32 graph to OpenVINO IR, compiled at bf16
inference precision; int8 inserts Q/DQ pairs into the fp32 graph, calibrated on recorded trajectories.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from export.graphs import StagedGraph

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class PrecisionLeaf(Protocol):
    name: str

    def prepare(self, manifest, models: dict[str, nn.Module], staging: Path, log) -> None: ...

    def graph(
        self, role: str, fp32: Path, model: nn.Module, staging: Path, batch: dict[str, int], log
    ) -> StagedGraph | None: ...

    def finish(self, writer) -> None: ...


class Fp32:
    """The export's own graphs: on ONNX Runtime nothing to make, on TensorRT fp32 plans."""

    name = "fp32"

    def prepare(self, manifest, models, staging, log) -> None:
        pass

    def graph(self, role, fp32, model, staging, batch, log) -> StagedGraph | None:
        from export.parity import tolerance_for

        return StagedGraph(role, "fp32", fp32, tol=tolerance_for("fp32"))

    def finish(self, writer) -> None:
        pass


def precision_leaf(precision: str, options: dict[str, Any] | None = None) -> PrecisionLeaf:
    """The leaf of a precision; `options` for int8 (method, keep, samples, steps, reduce_range)."""
    from export.graphs import ExportError

    if precision == "fp32":
        return Fp32()
    if precision == "fp16":
        from export.precision.fp16 import Fp16

        return Fp16()
    if precision == "bf16":
        from export.precision.bf16 import Bf16

        return Bf16()
    if precision == "int8":
        from export.precision.int8 import Int8

        return Int8(**(options or {}))
    raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")


Log = Callable[[str], None]
