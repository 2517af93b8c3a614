"""`gdexport check BUILD`: every artefact against the PyTorch reference, and whole trajectories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from export.exporter import load_component_from_manifest
from export.parity import check_artifact, format_table, tolerance_for
from runtime.manifest import MANIFEST_NAME, Manifest, write_json_atomic


def run_check(
    build: Path,
    *,
    trajectory: bool = False,
    steps: str = "25",
    precision: str | None = None,
    log: Callable[[str], None] = print,
) -> bool:
    """Print the parity tables, record them in the manifest, return whether all passed."""
    manifest = Manifest.load(build)
    models = {name: load_component_from_manifest(manifest, name) for name in manifest.components}
    component_of = {
        "unet": "unet",
        "classifier_grad": "classifier",
        "classifier": "classifier",
        "upsampler": "upsampler",
    }
    rows, skipped = [], []
    for art in manifest.artifacts:
        if precision and art.precision != precision:
            continue
        if art.backend != "onnxruntime":
            skipped.append(
                f"{art.file} ({art.backend}: checked by `gdexport check` on a machine with it)"
            )
            continue
        path = manifest.verify(art)
        model = models[component_of[art.role]]
        batches = (1, 4, 16) if art.role == "classifier_grad" else (1, 3)
        batches = tuple(b for b in batches if art.batch["min"] <= b <= art.batch["max"]) or (
            art.batch["min"],
        )
        rows.append(check_artifact(path, art.role, model, precision=art.precision, batches=batches,
                                   tol=tolerance_for(art.precision)))  # fmt: skip
    log(format_table(rows))
    for s in skipped:
        log(f"skipped {s}")
    ok = all(r.passed is not False for r in rows)
    traj_rows = []
    if trajectory:
        from export.trajectory import format_rows, trajectory_parity
        from runtime.pipeline import Pipeline

        precisions = sorted(
            {
                a.precision
                for a in manifest.artifacts
                if a.role == "unet" and a.backend == "onnxruntime"
            }
        )
        for prec in precisions:
            if precision and prec != precision:
                continue
            with Pipeline.from_manifest(build, precision=prec, backend="onnxruntime") as pipe:
                traj_rows += trajectory_parity(pipe, models, steps=steps)
        log(format_rows(traj_rows))
        ok = ok and all(r.passed is not False for r in traj_rows)
    data = manifest.data
    parity = data.setdefault("parity", {})
    by_key = {(r["artifact"]): r for r in parity.get("components", [])}
    by_key.update({r.artifact: r.to_json() for r in rows})
    parity["components"] = list(by_key.values())
    if traj_rows:
        parity["trajectories"] = [r.to_json() for r in traj_rows]
    write_json_atomic(Path(manifest.folder) / MANIFEST_NAME, data)
    return ok
