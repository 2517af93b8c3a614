"""The int8-vs-fp32 measures and the classifier-gradient gate, on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.quality import GRAD_MAX_X0_SHIFT, GraphError, compare_graphs, gradient_holds
from runtime.schedule import make_schedule


def _alpha_bar_cosine(t: int, T: int = 1000, s: float = 0.008) -> float:
    """Nichol & Dhariwal 2021 eq. 17, discretised as the original: alpha_bar((t + 1) / T)."""

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return f((t + 1) / T) / f(0)


def _error(abs_at: dict[int, float], cosine=0.999, rel=0.02) -> GraphError:
    return GraphError(
        calls=len(abs_at), rel_rms=rel, worst_rel_rms=rel, cosine_min=cosine, cosine_mean=cosine,
        by_timestep={str(t): rel for t in abs_at},
        abs_by_timestep={str(t): e for t, e in abs_at.items()},
    )  # fmt: skip


def test_gradient_gate_weighs_error_by_the_guided_x0_shift():
    alphas = make_schedule("cosine", 1000).alphas_cumprod
    a = _alpha_bar_cosine(500)
    limit_at_500 = GRAD_MAX_X0_SHIFT * math.sqrt(a) / (1 - a)  # the largest error that passes
    assert gradient_holds(_error({500: 0.9 * limit_at_500, 100: 1e-3}), alphas)[0]
    ok, why = gradient_holds(_error({500: 1.1 * limit_at_500, 100: 1e-3}), alphas)
    assert not ok and "t = 500" in why
    # at t = 999 the cosine schedule's alpha_bar is ~2e-9: a 1e-4 error moves x0 by ~2
    assert not gradient_holds(_error({999: 1e-4}), alphas)[0]
    assert not gradient_holds(_error({500: 1e-6}, cosine=0.95), alphas)[0]
    assert not gradient_holds(_error({500: 1e-6}, rel=0.3), alphas)[0]


def test_compare_graphs_measures(build_dir):
    """A graph against itself: zero error, cosine 1, one entry per timestep fed."""
    rng = np.random.default_rng(0)
    feeds = [
        {"x": rng.standard_normal((2, 3, 16, 16), dtype=np.float32), "t": np.array([t, t]),
         "y": np.array([1, 2])}
        for t in (10, 500)
    ]  # fmt: skip
    same = compare_graphs(build_dir / "unet.onnx", build_dir / "unet.onnx", feeds)
    assert same.rel_rms == 0 and same.cosine_min == pytest.approx(1)
    assert set(same.by_timestep) == {"10", "500"} and same.calls == 2
