"""Every preset builds the network of its released checkpoint: tensor names, order, shapes, count.

The oracle is ../shared/checkpoints/<stem>.json, written from the released files themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export.loading import build_model
from export.presets import PRESETS

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CHECKPOINTS = SHARED / "checkpoints"
NUM_RELEASED = 15
# The JSON files' `kind` -> ours.
KIND = {"model": "unet", "sr": "superres", "classifier": "classifier"}

pytestmark = pytest.mark.skipif(
    not CHECKPOINTS.is_dir(), reason=f"shared checkpoint descriptions {CHECKPOINTS} are absent"
)


def _description(name: str) -> Path:
    return CHECKPOINTS / (PRESETS[name].get("checkpoint", "").removesuffix(".pt") + ".json")


def _released(name: str) -> dict:
    return json.loads(_description(name).read_text())


# Presets of the released checkpoints (others, like the shipped digits family, have no JSON).
RELEASED = [n for n in PRESETS if _description(n).is_file()]


def _meta_state_dict(spec, **kw) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = build_model(spec, **kw)
    return model.state_dict()


def _released_fp16_presets() -> list[str]:
    """Presets whose original `convert_to_fp16` cast something (use_fp16 True)."""
    return [n for n in RELEASED if _released(n)["fp16_after_convert_to_fp16"]]


def test_presets_cover_every_released_checkpoint():
    files = {p.stem for p in CHECKPOINTS.glob("*.json") if p.name != "summary.json"}
    covered = {_description(n).stem for n in RELEASED}
    assert len(files) == NUM_RELEASED, sorted(files)
    assert covered == files, f"no preset for {sorted(files - covered)}"
    assert len(RELEASED) == NUM_RELEASED, RELEASED


@pytest.mark.parametrize("name", RELEASED)
def test_preset_matches_released_checkpoint(name):
    released = _released(name)
    with torch.device("meta"):
        model = build_model(name)
    assert model.spec.kind == KIND[released["kind"]]
    assert type(model).__name__ == released["arch"]["class"]

    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    want = [(k, shape) for k, shape, _ in released["state_dict"]]
    assert [k for k, _ in got] == [k for k, _ in want], "tensor names or their order differ"
    bad = [f"{k}: {a} vs released {b}" for (k, a), (_, b) in zip(got, want) if a != b]
    assert not bad, "wrong shapes:\n" + "\n".join(bad[:10])
    assert len(got) == released["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == released["params"]


@pytest.mark.parametrize("name", RELEASED)
def test_released_flags_dict_builds_the_same_network(name):
    # The JSON's `flags` are the original scripts' values after defaults: another route in.
    released = _released(name)
    from_flags = _meta_state_dict(released["flags"], kind=KIND[released["kind"]])
    want = [(k, list(shape)) for k, shape, _ in released["state_dict"]]
    assert [(k, list(v.shape)) for k, v in from_flags.items()] == want


@pytest.mark.parametrize("name", _released_fp16_presets())
def test_convert_trunk_casts_what_the_original_casts(name):
    # The original's convert_to_fp16 casts the trunk's convolutions only; norms, linears, the
    # embeddings and the output head stay fp32.
    with torch.device("meta"):
        model = build_model(name)
    model.convert_trunk(torch.float16)
    half = [k for k, v in model.state_dict().items() if v.dtype == torch.float16]
    assert half == _released(name)["fp16_after_convert_to_fp16"]
