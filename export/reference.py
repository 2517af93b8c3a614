"""The reference backend: the PyTorch networks as the numpy callables the runtime's samplers take.

The same `runtime.sampling` loop then runs over the reference, ONNX Runtime and TensorRT, which is
what every trajectory-level parity check compares. Each call converts numpy -> torch -> numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from export.onnx_export import classifier_gradient


def model_fn(
    model: nn.Module, *, y: np.ndarray | None = None, low_res: np.ndarray | None = None
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(x (B,C,H,W) float32, t (B,) int64 original timesteps) -> raw model output (float32).

    `y` (B,) int64 labels for class-conditional models; `low_res` (B,3,h,w) for the upsampler.
    """
    y_t = None if y is None else torch.from_numpy(np.asarray(y, np.int64))
    lr_t = None if low_res is None else torch.from_numpy(np.asarray(low_res, np.float32))

    @torch.no_grad()
    def call(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        xt, tt = torch.from_numpy(x), torch.from_numpy(np.asarray(t, np.int64))
        if lr_t is not None:
            out = model(xt, tt, lr_t, y_t)
        else:
            out = model(xt, tt, y_t)
        return out.float().numpy()

    return call


def grad_fn(
    classifier: nn.Module, y: np.ndarray, scale: float
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(x, t) -> scale * d/dx sum_b log_softmax(classifier(x, t))[b, y_b], via torch.autograd."""
    grad = classifier_gradient(classifier)
    y_t = torch.from_numpy(np.asarray(y, np.int64))
    s = torch.tensor(float(scale))

    def call(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        g = grad(torch.from_numpy(x), torch.from_numpy(np.asarray(t, np.int64)), y_t, s)
        return g.float().numpy()

    return call
