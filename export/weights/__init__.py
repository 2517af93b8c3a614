"""The shipped digits demo family (examples/train_digits.py); the judge that scores its samples
is examples/digits_judge_logreg.py (its weights are here, digits16_judge.npz).

`path(preset)` is the checkpoint of a digits preset: `load_model("digits-16", path("digits-16"))`.
"""

from __future__ import annotations

from pathlib import Path

from export.presets import PRESETS

HERE = Path(__file__).resolve().parent


def path(preset: str) -> Path:
    """The shipped checkpoint of a `digits-*` preset; raises FileNotFoundError naming the fix."""
    if preset not in PRESETS or not preset.startswith("digits"):
        raise KeyError(f"{preset!r} is not a shipped preset; shipped: "
                       f"{', '.join(n for n in PRESETS if n.startswith('digits'))}")  # fmt: skip
    p = HERE / PRESETS[preset]["checkpoint"]
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} is missing: train it with `python examples/train_digits.py --model all`"
        )
    return p
