"""The digits comparison's measures: diversity by hand, and a run on the tiny (16x16) build."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from digits_int8 import diversity, judge_int8  # noqa: E402


def test_diversity_is_mean_within_class_distance():
    a = np.zeros((4, 4), np.float32)
    imgs = np.stack([a, a + 0.5, a + 1.0, a - 1.0])  # grey images, then replicated to 3 channels
    imgs = np.repeat(imgs[:, None], 3, axis=1)
    # class 0: pairwise distances 0.5*4, 1.0*4, 0.5*4 (16 pixels); class 1 has one member: skipped
    assert diversity(imgs, np.array([0, 0, 0, 1])) == pytest.approx((2 + 4 + 2) / 3)
    assert np.isnan(diversity(imgs[:1], np.array([0])))


def test_judge_int8_on_tiny_build(int8_build):
    build, _ = int8_build
    got = judge_int8(build, samples=4, steps="ddim2", batch=4)
    for p in ("fp32", "int8"):
        assert 0 <= got[p]["accuracy"] <= 1 and got[p]["classifier"].startswith("classifier_grad")
    assert 0 < got["agreement"]["rmse_mean"] <= got["agreement"]["rmse_max"] <= 2
