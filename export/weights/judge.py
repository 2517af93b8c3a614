"""The digits judge: an independent clean-image classifier (numpy only, no pickle, no torch).

Multinomial logistic regression fitted by scikit-learn on the clean 16x16 training digits
(examples/train_digits.py --model judge), stored as plain arrays in digits16_judge.npz. It never
sees noisy images and is never used for guidance, so its accuracy on generated samples measures the
samples, not the guidance classifier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WEIGHTS = Path(__file__).resolve().parent / "digits16_judge.npz"


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
