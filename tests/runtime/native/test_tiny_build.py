"""The native runtime on the session's tiny build (tests/builds.py), which covers what the digits
build does not: a class-conditional UNet and upsampler (the `y` feeds), learned variances
(learn_sigma, 2C output channels) and the linear schedule (the upsampler's)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.images import to_uint8
from runtime.pipeline import Pipeline
from tests.runtime.native.conftest import Native

LABELS = [0, 4, 9]


@pytest.mark.parametrize("sampler, steps", [("ddim", "ddim5"), ("ddpm", "6")])
def test_tiny_build_matches_python(native: Native, build_dir, sampler, steps):
    h = native.open(build_dir)
    try:
        assert native.lib.gdx_has_upsampler(h) and native.lib.gdx_num_classes(h) == 10
        images, labels, x0, traj = native.sample(
            h, LABELS, base=True, trajectory=True, sampler=sampler, steps=steps, scale=1.0,
            seed=4, upsampler_start_t=0,
        )  # fmt: skip
    finally:
        native.close(h)
    kw = dict(scale=1.0, steps=steps, sampler=sampler, seed=4, upsampler_start_t=0)
    with Pipeline.from_manifest(build_dir) as pipe:
        assert pipe.base["diffusion"]["learn_sigma"]
        assert pipe.upsampler_info["diffusion"]["noise_schedule"] == "linear"
        ort = pipe.sample(LABELS, **kw)
    with Pipeline.from_manifest(build_dir, backend="openvino") as pipe:
        ov = pipe.sample(LABELS, save_trajectory=True, **kw)
    assert labels.tolist() == LABELS
    assert np.abs(traj - ov.trajectory["x"]).max() <= 1e-4
    base = np.abs(to_uint8(x0).astype(int) - ov.base_images.astype(int))
    assert (base <= 1).mean() >= 0.999
    for ref in (ov.images, ort.images):
        diff = np.abs(images.astype(int) - ref.astype(int))
        assert (diff <= 1).mean() >= 0.999, (diff.max(), (diff <= 1).mean())
