"""The digits judge: an independent clean-image classifier (numpy only, no pickle, no torch).

Multinomial logistic regression fitted by scikit-learn on the clean 16x16 training digits
(examples/train_digits.py --model judge), stored as plain arrays in digits16_judge.npz. It never
sees noisy images and is never used for guidance, so its accuracy on generated samples measures the
samples, not the guidance classifier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Shipped with the digits weights (written by examples/train_digits.py --model judge).
WEIGHTS = Path(__file__).resolve().parents[1] / "export" / "weights" / "digits16_judge.npz"


class Judge:
    """`judge.logits(x)` / `judge.predict(x)` for x (N, 3, 16, 16) or (N, 16, 16) in [-1, 1]."""

    def __init__(self, path: str | Path = WEIGHTS):
        with np.load(path, allow_pickle=False) as f:
            self.weight = f["weight"].astype(np.float64)  # (10, 256)
            self.bias = f["bias"].astype(np.float64)  # (10,)
            self.held_out_accuracy = float(f["held_out_accuracy"])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, 10) float64 class scores."""
        x = np.asarray(x, np.float64)
        if x.ndim == 4:
            x = x.mean(axis=1)  # a sample's 3 channels differ slightly; grey is their mean
        if x.shape[1:] != (16, 16):
            raise ValueError(f"the judge takes (N, 3, 16, 16) or (N, 16, 16) images, got {x.shape}")
        return x.reshape(len(x), -1) @ self.weight.T + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N,) int64 predicted digit."""
        return self.logits(x).argmax(axis=1)


def grey(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W) float64, the channel mean."""
    return np.asarray(images, np.float64).mean(axis=1)


def diversity(images: np.ndarray, classes: np.ndarray) -> float:
    """Mean over classes (with >= 2 members) of the mean pairwise L2 distance within the class."""
    flat = grey(images).reshape(len(images), -1)
    per_class = []
    for c in np.unique(classes):
        members = flat[classes == c]
        if len(members) < 2:
            continue
        d = np.sqrt(((members[:, None] - members[None]) ** 2).sum(-1))
        per_class.append(d[np.triu_indices(len(members), 1)].mean())
    return float(np.mean(per_class)) if per_class else float("nan")
