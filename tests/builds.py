"""The tiny build the export and runtime tests share: one per test session, exported for real.

`export_build` turns three tiny random-weight components (a class-conditional UNet, a noisy
classifier and a 16 -> 32 upsampler) into ONNX graphs and a manifest; that costs about a minute on
two cores, so the session builds it once (the `build_dir` fixture in conftest.py) and tests that
change a build work on a copy (`copy_build`).

The reference networks are rebuilt here from the same specs and seeds with `build_model`, not read
back from the manifest, so the tests compare the export against an independent reconstruction.
Nothing heavy is imported at module level: runtime-only tests import this file without torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

BATCH_MAX = 16
NUM_CLASSES = 10
DIFFUSION_STEPS = 1000

# Constructor dicts (the original classes' arguments plus diffusion keys).
UNET: dict[str, Any] = {
    "image_size": 16, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
    "attention_resolutions": [2, 4], "channel_mult": [1, 2, 2], "num_head_channels": 32,
    "use_scale_shift_norm": True, "resblock_updown": True, "num_classes": NUM_CLASSES,
    "noise_schedule": "cosine",
}  # fmt: skip
# A shallower trunk than the UNet's: the gradient graph is the slowest to export.
CLASSIFIER: dict[str, Any] = {
    "image_size": 16, "model_channels": 32, "out_channels": NUM_CLASSES, "num_res_blocks": 1,
    "attention_resolutions": [2], "channel_mult": [1, 2], "num_head_channels": 32,
    "use_scale_shift_norm": True, "resblock_updown": True, "pool": "attention",
    "noise_schedule": "cosine",
}  # fmt: skip
UPSAMPLER: dict[str, Any] = {
    "image_size": 32, "small_size": 16, "model_channels": 32, "out_channels": 6,
    "num_res_blocks": 1, "attention_resolutions": [4], "channel_mult": [1, 2],
    "num_head_channels": 32, "use_scale_shift_norm": True, "resblock_updown": True,
    "num_classes": NUM_CLASSES, "noise_schedule": "linear",
}  # fmt: skip
SPECS = {"unet": UNET, "classifier": CLASSIFIER, "upsampler": UPSAMPLER}
SEEDS = {"unet": 0, "classifier": 1, "upsampler": 2}
KINDS = {"unet": "unet", "classifier": "classifier", "upsampler": "superres"}
# The files export_build writes per component, and the role of each.
FILES = {
    "unet": {"unet.onnx": "unet"},
    "classifier": {"classifier_grad.onnx": "classifier_grad", "classifier.onnx": "classifier"},
    "upsampler": {"upsampler.onnx": "upsampler"},
}


def sources(components=("unet", "classifier", "upsampler")) -> dict:
    """ComponentSource per component: the tiny spec with its seed (random weights)."""
    from export.exporter import ComponentSource

    return {c: ComponentSource(SPECS[c], seed=SEEDS[c]) for c in components}


def make_build(out: Path, **options) -> dict[str, Any]:
    """Export the three tiny components into `out` (batch 1..16); returns the manifest."""
    from export.exporter import export_build

    options.setdefault("batch_max", BATCH_MAX)
    options.setdefault("log", lambda line: None)
    return export_build(out, sources(), **options)


def reference_model(component: str):
    """The PyTorch network a component was exported from, rebuilt from its spec and seed."""
    import torch

    from export.loading import build_model

    torch.manual_seed(SEEDS[component])
    return build_model(SPECS[component], kind=KINDS[component])


def copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def subset_build(src: Path, dst: Path, components: tuple[str, ...]) -> Path:
    """A copy of the build holding only `components`, with the manifest export_build would write
    for them (their artefacts only; no classifier -> guidance scale 0)."""
    data = json.loads((src / "manifest.json").read_text())
    dst.mkdir(parents=True)
    keep = {f for c in components for f in FILES[c]}
    for f in keep:
        shutil.copy2(src / f, dst / f)
    data["components"] = {k: v for k, v in data["components"].items() if k in components}
    data["artifacts"] = [a for a in data["artifacts"] if a["file"] in keep]
    data["parity"]["components"] = [
        r for r in data["parity"]["components"] if r["artifact"] in keep
    ]
    if "classifier" not in components:
        data["sampling"]["scale"] = 0.0
    if "upsampler" not in components:
        data["sampling"]["upsampler_respacing"] = None
    (dst / "manifest.json").write_text(json.dumps(data, indent=1))
    return dst
