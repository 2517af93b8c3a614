"""Shared pieces of the digits demo: the data split, the forward process, EMA, image grids.

The digits are scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16),
resized bilinearly to 16x16 (the base model and the classifier) and 32x32 (the upsampler's
target) and scaled to [-1, 1]. Grey levels are replicated into 3 channels: every ADM network and
the ONNX exporter take RGB, so the demo family has the released checkpoints' interface.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.schedule import Schedule, make_schedule

WEIGHTS = Path(__file__).resolve().parents[1] / "export" / "weights"
ASSETS = Path(__file__).resolve().parent / "assets"
SPLIT_SEED = 0
HOLDOUT_FRACTION = 0.1
NOISE_SCHEDULE = "cosine"
DIFFUSION_STEPS = 1000


@dataclass(frozen=True)
class Digits:
    """One split of the digits. x16: (N, 3, 16, 16), x32: (N, 3, 32, 32) float32 in [-1, 1];
    y: (N,) int64 labels 0..9."""

    x16: torch.Tensor
    x32: torch.Tensor
    y: torch.Tensor


def resize(x8: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, 8, 8) in [0, 1] -> (N, 3, size, size) in [-1, 1], bilinear (align_corners=False)."""
    x = F.interpolate(x8, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).repeat(1, 3, 1, 1)


def load_digits_split() -> tuple[Digits, Digits]:
    """(train, held-out): a fixed 90/10 split by a seeded permutation (the same on every machine)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x8 = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    y = torch.from_numpy(data.target.astype(np.int64))
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_hold = int(round(HOLDOUT_FRACTION * len(y)))
    parts = []
    for idx in (perm[n_hold:], perm[:n_hold]):
        idx_t = torch.from_numpy(np.sort(idx))
        parts.append(Digits(resize(x8[idx_t], 16), resize(x8[idx_t], 32), y[idx_t]))
    return parts[0], parts[1]


def schedule() -> Schedule:
    """The full 1000-step cosine schedule every digits model is trained with."""
    return make_schedule(NOISE_SCHEDULE, DIFFUSION_STEPS)


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sched: Schedule
) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4)."""
    a = torch.tensor(sched.sqrt_alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    s = torch.tensor(sched.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    return a * x0 + s * noise


class EMA:
    """Exponential moving average of a model's parameters, with the usual warm-up
    decay = min(decay, (1 + n) / (10 + n)) so that short runs do not keep the initialisation."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p, 1 - d)


def grey(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W), the channel mean (samples' channels differ slightly)."""
    return np.asarray(x, np.float32).mean(axis=1)


def save_grid(images: np.ndarray, path: Path, *, cols: int, zoom: int = 4) -> None:
    """(N, 3, H, W) or (N, H, W) in [-1, 1] -> a PNG grid, pixels enlarged `zoom` times."""
    from PIL import Image

    imgs = grey(images) if images.ndim == 4 else np.asarray(images, np.float32)
    n, h, w = imgs.shape
    rows = -(-n // cols)
    pad = 1
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 64, np.uint8)
    pix = ((np.clip(imgs, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = pix[k]  # fmt: skip
    img = Image.fromarray(canvas, mode="L").resize(
        (canvas.shape[1] * zoom, canvas.shape[0] * zoom), Image.NEAREST
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
