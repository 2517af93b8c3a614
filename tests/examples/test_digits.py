"""The shipped digits family (export/weights/): it loads through its presets, guidance works, and
the upsampler beats bilinear upsampling on held-out digits.

Judged by an independent clean-image classifier (examples/digits_judge_logreg.py) that guidance never
sees, and by RMSE against the real held-out 32x32 digits; samples come from the runtime's DDIM over
the PyTorch reference callables. About 20 s on two CPU cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from digits_common import load_digits_split  # noqa: E402
from digits_judge_logreg import Judge  # noqa: E402
from guidance_sweep import upsample  # noqa: E402

from export import weights  # noqa: E402
from export.loading import build_model, load_model  # noqa: E402
from export.reference import grad_fn, model_fn  # noqa: E402
from runtime.sampling import sample_ddim  # noqa: E402
from runtime.schedule import make_schedule  # noqa: E402

PRESETS = ("digits-16", "digits-16-classifier", "digits-16-32-upsampler")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and the machine is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family() -> dict[str, torch.nn.Module]:
    return {p: load_model(p, weights.path(p)) for p in PRESETS}


@pytest.fixture(scope="module")
def held_out():
    return load_digits_split()[1]


def _grey(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64).mean(axis=1)


def test_weights_load_through_presets(family):
    kinds = {"digits-16": "UNetModel", "digits-16-classifier": "EncoderUNetModel",
             "digits-16-32-upsampler": "SuperResModel"}  # fmt: skip
    for name, model in family.items():
        assert type(model).__name__ == kinds[name]
        assert model.spec.preset == name
        fresh = build_model(name).state_dict()
        trained = model.state_dict()
        assert list(trained) == list(fresh)
        # Trained weights, not the initialisation: the zero-initialised output layers moved.
        assert any(not torch.equal(trained[k], fresh[k]) for k in fresh)
    total = sum(weights.path(p).stat().st_size for p in PRESETS)
    assert total < 30e6, f"the shipped checkpoints take {total / 1e6:.1f} MB"


def test_judge_is_accurate_on_clean_held_out_digits(held_out):
    judge = Judge()
    acc = (judge.predict(held_out.x16.numpy()) == held_out.y.numpy()).mean()
    assert acc >= 0.9
    assert acc == pytest.approx(judge.held_out_accuracy, abs=1e-6)


def test_guidance_raises_judge_accuracy(family):
    base, classifier = family["digits-16"], family["digits-16-classifier"]
    n = 64
    labels = np.random.default_rng(1).integers(0, 10, n)
    x_T = np.random.default_rng(0).standard_normal((n, 3, 16, 16), dtype=np.float32)
    sched = make_schedule("cosine", 1000, "ddim15")
    judge = Judge()

    def accuracy(scale: float) -> float:
        g = grad_fn(classifier, labels, scale) if scale else None
        x = sample_ddim(model_fn(base), x_T, sched, learn_sigma=False, grad_fn=g)
        assert np.isfinite(x).all() and np.abs(x).max() < 1.5
        return float((judge.predict(x) == labels).mean())

    unguided, guided = accuracy(0.0), accuracy(4.0)
    # Unguided samples ignore the random target labels: near chance (0.1).
    assert unguided < 0.3, unguided
    assert guided >= 0.75, (unguided, guided)
    assert guided - unguided >= 0.5, (unguided, guided)


def test_unguided_samples_look_like_digits(family):
    # Confident judge scores on unguided samples, as on real digits; noise or blobs are not.
    base = family["digits-16"]
    x_T = np.random.default_rng(2).standard_normal((32, 3, 16, 16), dtype=np.float32)
    x = sample_ddim(model_fn(base), x_T, make_schedule("cosine", 1000, "ddim15"), learn_sigma=False)
    logits = Judge().logits(x)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.median(p.max(1)) > 0.6
    assert len(np.unique(p.argmax(1))) >= 6  # not collapsed onto a few classes


def test_upsampler_beats_bilinear_on_held_out_digits(family, held_out):
    up = family["digits-16-32-upsampler"]
    low, target = held_out.x16[:48].numpy(), held_out.x32[:48].numpy()
    # The shipped recipe: DDIM (ddim25 grid, eta 0) over the steps t <= 500, from the noised
    # bilinear upsample (guidance_sweep.upsample); 13 network calls.
    out = upsample(up, low, seed=3, respacing="ddim25", start_t=500)
    bilinear = F.interpolate(torch.from_numpy(low), size=(32, 32), mode="bilinear").numpy()

    def rmse(a):
        return np.sqrt(((_grey(a) - _grey(target)) ** 2).mean(axis=(1, 2)))

    ours, bil = rmse(out), rmse(bilinear)
    assert ours.mean() < 0.6 * bil.mean(), (ours.mean(), bil.mean())
    # Clean on every image, not only on average: no speckled outliers.
    assert ours.max() < bil.max(), (ours.max(), bil.max())
    assert (ours < bil).mean() >= 0.9
