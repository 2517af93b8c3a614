"""`gdexport check BUILD`: every artefact against the PyTorch reference, and whole trajectories.

Each artefact is run through the backend that runs it (ONNX Runtime; TensorRT where TensorRT
and a GPU are present, OpenVINO where a CPU with bf16 units is; elsewhere those artefacts are
listed as not checked). The figures replace the
same artefacts' and precisions' earlier ones in the manifest; the rest are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from export.exporter import load_component_from_manifest
from export.graphs import ExportError
from export.parity import check_artifact, format_table, tolerance_for
from runtime.manifest import Manifest, ManifestWriter
from runtime.roles import ROLES


def run_check(
    build: Path,
    *,
    trajectory: bool = False,
    steps: str = "25",
    precision: str | None = None,
    log: Callable[[str], None] = print,
) -> bool:
    """Print the parity tables, record them in the manifest, return whether all passed.

    Raises ExportError when an engine gives non-finite outputs along a trajectory."""
    from export.build import tensorrt_available

    manifest = Manifest.load(build)
    models = {name: load_component_from_manifest(manifest, name) for name in manifest.components}
    from export.precision.bf16 import bf16_ready

    trt_ok, trt_why = tensorrt_available()
    ov_ok, ov_why = bf16_ready()  # the only OpenVINO artefacts are bf16 IR
    rows, skipped = [], []
    for art in manifest.artifacts:
        if precision and art.precision != precision:
            continue
        if art.backend == "tensorrt" and not trt_ok:
            skipped.append(f"{art.file} (tensorrt: {trt_why}; check it on a machine with it)")
            continue
        if art.backend == "openvino" and not ov_ok:
            skipped.append(f"{art.file} (openvino: {ov_why}; check it on a machine with it)")
            continue
        path = manifest.verify(art)
        rows.append(check_artifact(
            path, art.role, models[ROLES[art.role].component], precision=art.precision,
            batches=ROLES[art.role].batches_within(art.batch), tol=tolerance_for(art.precision),
            backend=art.backend, batch=art.batch,
        ))  # fmt: skip
    log(format_table(rows))
    for s in skipped:
        log(f"skipped {s}")
    ok = all(r.passed is not False for r in rows)
    writer = ManifestWriter.of(manifest)
    writer.put_parity(rows)
    if trajectory:
        measured, traj_rows = _trajectories(manifest, models, precision, steps, trt_ok, ov_ok, log)
        ok = ok and all(r.passed is not False for r in traj_rows)
        writer.put_trajectories(measured, traj_rows)
    writer.commit(manifest.folder)
    return ok


def _trajectories(manifest: Manifest, models, precision, steps, trt_ok, ov_ok, log):
    from export.trajectory import format_rows, trajectory_parity
    from runtime.pipeline import Pipeline
    from runtime.sampling import NonFiniteError

    backends = (
        ("onnxruntime",) + (("tensorrt",) if trt_ok else ()) + (("openvino",) if ov_ok else ())
    )
    pairs = sorted(
        {
            (a.precision, a.backend)
            for a in manifest.artifacts
            if a.role == "unet" and a.backend in backends
            and (precision is None or a.precision == precision)
        }
    )  # fmt: skip
    rows = []
    for prec, backend in pairs:
        with Pipeline.from_manifest(manifest, precision=prec, backend=backend) as pipe:
            try:
                rows += trajectory_parity(pipe, models, steps=steps)
            except NonFiniteError as e:
                raise ExportError(
                    f"the {prec} {backend} engines of {manifest.folder} give non-finite values "
                    f"along a sampling trajectory ({e}): the build is broken; rebuild it, and "
                    f"check that the checkpoint's weights are finite"
                ) from None
    log(format_rows(rows))
    return {p for p, _ in pairs}, rows
