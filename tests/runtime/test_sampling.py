"""Samplers and guidance against closed forms (Gaussian data) and float64 reformulations."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.sampling import (
    NonFiniteError,
    condition_mean,
    condition_score,
    p_mean_variance,
    sample_ddim,
    sample_ddpm,
)
from runtime.schedule import betas_for, make_schedule


class GaussianMixture:
    """Images whose pixels are i.i.d. N(means[k], std^2) given the image's component k.

    With the exact forward process everything is closed form: q(x_t) is a mixture of Gaussians,
    eps(x_t) = E[eps | x_t] = -sqrt(1 - alpha_bar) * grad log q(x_t) (Tweedie), and the classifier
    q(y | x_t) is the posterior responsibility of component y.
    """

    def __init__(self, means, weights, std, noise_schedule="linear"):
        self.means = np.asarray(means, dtype=np.float64)
        self.log_weights = np.log(np.asarray(weights, dtype=np.float64))
        self.std = std
        # Indexed by the original timestep, as the model is.
        self.alphas_cumprod = np.cumprod(1 - betas_for(noise_schedule, 1000))

    def _terms(self, x, t):
        """alpha_bar (B,1,1,1), per-component scores (B,K,C,H,W), responsibilities (B,K,1,1,1)."""
        x = x.astype(np.float64)
        alpha_bar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        var = alpha_bar * self.std**2 + 1 - alpha_bar
        diff = x[:, None] - np.sqrt(alpha_bar)[:, None] * self.means.reshape(1, -1, 1, 1, 1)
        log_lik = -0.5 * (diff**2).sum(axis=(2, 3, 4)) / var.reshape(-1, 1) + self.log_weights
        resp = np.exp(log_lik - log_lik.max(axis=1, keepdims=True))
        resp /= resp.sum(axis=1, keepdims=True)
        return alpha_bar, -diff / var[:, None], resp.reshape(*resp.shape, 1, 1, 1)

    def score(self, x, t):
        _, component_scores, resp = self._terms(x, t)
        return (resp * component_scores).sum(axis=1)

    def eps(self, x, t):
        alpha_bar, component_scores, resp = self._terms(x, t)
        return -np.sqrt(1 - alpha_bar) * (resp * component_scores).sum(axis=1)

    def classifier_grad(self, x, t, y, scale=1.0):
        """scale * grad log q(y | x_t) = scale * (grad log q(x_t | y) - grad log q(x_t))."""
        _, component_scores, resp = self._terms(x, t)
        return scale * (component_scores[:, y] - (resp * component_scores).sum(axis=1))

    def model_fn(self, learn_sigma=False, v=0.0):
        def model(x, t):
            assert x.dtype == np.float32 and t.dtype == np.int64 and t.shape == x.shape[:1]
            eps = self.eps(x, t).astype(np.float32)
            if not learn_sigma:
                return eps
            return np.concatenate([eps, np.full_like(eps, v)], axis=1)

        return model

    def grad_fn(self, y, scale):
        return lambda x, t: self.classifier_grad(x, t, y, scale).astype(np.float32)


def gaussian_output_reference(schedule, mean, std, *, sampler, eta=0.0, v=None):
    """Exact mean and std of a sampler's x_0 for data N(mean, std^2), starting from N(0, 1).

    With Gaussian data the exact eps is affine in x_t, so every step is affine in x plus independent
    Gaussian noise and the moments propagate in closed form (float64). Written from the DDPM / DDIM
    papers' equations rather than the runtime's helpers. Uses MIXTURE's (linear) alpha_bar.
    """
    alphas_cumprod = MIXTURE.alphas_cumprod[schedule.timestep_map]
    mu, var = 0.0, 1.0
    for i in reversed(range(len(alphas_cumprod))):
        ab = alphas_cumprod[i]
        ab_prev = alphas_cumprod[i - 1] if i > 0 else 1.0
        beta = 1 - ab / ab_prev
        q_var = ab * std**2 + 1 - ab
        # eps(x) = sqrt(1 - ab) (x - sqrt(ab) mean) / q_var = e1 x + e0
        e1, e0 = np.sqrt(1 - ab) / q_var, -np.sqrt(1 - ab) * np.sqrt(ab) * mean / q_var
        # x0(x) = (x - sqrt(1 - ab) eps(x)) / sqrt(ab) = x1 x + x0
        x1, x0 = (1 - np.sqrt(1 - ab) * e1) / np.sqrt(ab), -np.sqrt(1 - ab) * e0 / np.sqrt(ab)
        if sampler == "ddim":  # Song et al. 2021, eq. 12
            sigma2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
            c = np.sqrt(1 - ab_prev - sigma2)
            a1, a0 = np.sqrt(ab_prev) * x1 + c * e1, np.sqrt(ab_prev) * x0 + c * e0
            noise_var = sigma2
        else:  # Ho et al. 2020, eq. 7
            c1 = beta * np.sqrt(ab_prev) / (1 - ab)
            c2 = (1 - ab_prev) * np.sqrt(1 - beta) / (1 - ab)
            a1, a0 = c1 * x1 + c2, c1 * x0
            posterior_var = beta * (1 - ab_prev) / (1 - ab)
            frac = None if v is None else (v + 1) / 2
            noise_var = beta if v is None else beta**frac * posterior_var ** (1 - frac)
        mu, var = a1 * mu + a0, a1 * a1 * var + (noise_var if i > 0 else 0.0)
    return mu, np.sqrt(var)


def component_stats(x):
    """Weight of the positive component, and per-component pixel mean and std."""
    pixels = x.reshape(len(x), -1)
    positive = pixels.mean(axis=1) > 0
    return (
        positive.mean(),
        [pixels[~positive].mean(), pixels[positive].mean()],
        [pixels[~positive].std(), pixels[positive].std()],
    )


MIXTURE = GaussianMixture(means=[-0.5, 0.5], weights=[0.7, 0.3], std=0.1)
NUM_SAMPLES = 4000
SHAPE = (NUM_SAMPLES, 2, 2, 2)


@pytest.mark.parametrize(
    ("sampler", "respacing", "options"),
    [
        ("ddpm", "250", {"learn_sigma": False}),
        ("ddpm", "250", {"learn_sigma": True, "v": 0.0}),
        ("ddim", "ddim50", {"learn_sigma": False, "eta": 0.0}),
        ("ddim", "ddim50", {"learn_sigma": True, "eta": 0.5}),
    ],
)
def test_samplers_reproduce_a_gaussian_mixture(sampler, respacing, options):
    schedule = make_schedule("linear", 1000, respacing)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE, dtype=np.float32)
    learn_sigma = options["learn_sigma"]
    model = MIXTURE.model_fn(learn_sigma, options.get("v", 0.3))
    if sampler == "ddpm":
        x = sample_ddpm(model, x_T, schedule, learn_sigma=learn_sigma, clip_denoised=False, rng=rng)
        ref = [
            gaussian_output_reference(schedule, m, 0.1, sampler="ddpm", v=options.get("v"))
            for m in MIXTURE.means
        ]
    else:
        eta = options["eta"]
        x = sample_ddim(
            model, x_T, schedule, learn_sigma=learn_sigma, eta=eta, clip_denoised=False, rng=rng
        )
        ref = [
            gaussian_output_reference(schedule, m, 0.1, sampler="ddim", eta=eta)
            for m in MIXTURE.means
        ]
    assert x.dtype == np.float32 and x.shape == SHAPE

    weight, means, stds = component_stats(x)
    # ~5 standard errors of a binomial proportion at 4000 samples.
    assert abs(weight - 0.3) < 0.035
    for k in range(2):
        # With components this far apart each one is sampled like the lone Gaussian (the
        # discretised samplers are biased in std: DDIM50 gives ~0.078, DDPM250 ~0.105).
        ref_mean, ref_std = ref[k]
        assert abs(means[k] - ref_mean) < 0.006, (k, means[k], ref_mean)
        assert abs(stds[k] / ref_std - 1) < 0.04, (k, stds[k], ref_std)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_moves_mass_to_the_target_component(sampler):
    schedule = make_schedule("linear", 1000, "100" if sampler == "ddpm" else "ddim50")
    rng = np.random.default_rng(1)
    x_T = rng.standard_normal(SHAPE, dtype=np.float32)
    model, grad = MIXTURE.model_fn(), MIXTURE.grad_fn(y=1, scale=4.0)  # toward the 30% component
    if sampler == "ddpm":
        x = sample_ddpm(model, x_T, schedule, learn_sigma=False, grad_fn=grad, rng=rng)
    else:
        x = sample_ddim(model, x_T, schedule, learn_sigma=False, grad_fn=grad)
    assert (x.reshape(NUM_SAMPLES, -1).mean(axis=1) > 0).mean() > 0.9


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_unit_scale_guidance_samples_the_class_conditional(sampler):
    """With the exact classifier at scale 1, guided eps is the class-conditional eps (Algorithm 2
    exactly; Algorithm 1 to first order in beta), so x_0 ~ N(0.5, 0.1^2) as discretised."""
    schedule = make_schedule("linear", 1000, "100" if sampler == "ddpm" else "ddim25")
    rng = np.random.default_rng(2)
    x_T = rng.standard_normal(SHAPE, dtype=np.float32)
    model, grad = MIXTURE.model_fn(), MIXTURE.grad_fn(y=1, scale=1.0)
    if sampler == "ddpm":
        x = sample_ddpm(
            model, x_T, schedule, learn_sigma=False, clip_denoised=False, grad_fn=grad, rng=rng
        )
    else:
        x = sample_ddim(model, x_T, schedule, learn_sigma=False, clip_denoised=False, grad_fn=grad)
    ref_mean, ref_std = gaussian_output_reference(schedule, 0.5, 0.1, sampler=sampler)
    assert (x.reshape(NUM_SAMPLES, -1).mean(axis=1) > 0).all()
    assert abs(x.mean() - ref_mean) < 0.005
    assert abs(x.std() / ref_std - 1) < 0.03, (x.std(), ref_std)


# Guidance formulas one step at a time.


def _posterior_coefficients(betas, i):
    """Ho et al. 2020, eq. 7, from the betas in float64: coef1, coef2, variance."""
    alphas_cumprod = np.cumprod(1 - betas)
    ab, ab_prev = alphas_cumprod[i], (alphas_cumprod[i - 1] if i > 0 else 1.0)
    coef1 = betas[i] * np.sqrt(ab_prev) / (1 - ab)
    coef2 = (1 - ab_prev) * np.sqrt(1 - betas[i]) / (1 - ab)
    return coef1, coef2, betas[i] * (1 - ab_prev) / (1 - ab)


def test_condition_score_gives_the_class_conditional_posterior():
    """Algorithm 2 at scale 1 with the exact classifier: eps' and x_0' are those of q(x_t | y)."""
    schedule = make_schedule("linear", 1000, "ddim50")
    i = 10
    t = np.full(64, schedule.timestep_map[i])
    ab = MIXTURE.alphas_cumprod[t[0]]
    x = (np.random.default_rng(3).standard_normal((64, 2, 2, 2)) * 1.2).astype(np.float32)
    out = p_mean_variance(MIXTURE.eps(x, t), x, i, schedule, learn_sigma=False, clip_denoised=False)
    guided = condition_score(out, x, i, schedule, MIXTURE.classifier_grad(x, t, y=1))

    m, s2 = MIXTURE.means[1], MIXTURE.std**2
    q_var = ab * s2 + 1 - ab
    x64 = x.astype(np.float64)
    # Gaussian posterior of x_0 given x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps, x_0 ~ N(m, s2).
    xstart = m + np.sqrt(ab) * s2 / q_var * (x64 - np.sqrt(ab) * m)
    eps = np.sqrt(1 - ab) * (x64 - np.sqrt(ab) * m) / q_var
    coef1, coef2, _ = _posterior_coefficients(schedule.betas, i)
    np.testing.assert_allclose(guided["pred_xstart"], xstart, rtol=0, atol=2e-5)
    np.testing.assert_allclose(guided["eps"], eps, rtol=0, atol=2e-5)
    np.testing.assert_allclose(guided["mean"], coef1 * xstart + coef2 * x64, rtol=0, atol=2e-5)
    # The unguided step is not already there (the test can fail).
    assert np.abs(out["pred_xstart"] - xstart).max() > 0.1


def test_condition_score_guides_the_clipped_xstart_and_does_not_clip_again():
    """Original order: clip x_0, re-derive eps from it, subtract sqrt(1 - ab) g, no second clip.

    Then x_0' = clip(x_0) + (1 - ab) / sqrt(ab) * g exactly; the usual mistakes move it.
    """
    schedule = make_schedule("cosine", 1000, "ddim50")
    i = 25
    ab = make_schedule("cosine", 1000).alphas_cumprod[schedule.timestep_map[i]]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3, 4, 4)).astype(np.float32)
    raw_eps = rng.standard_normal((8, 3, 4, 4)).astype(np.float32)
    grad = (rng.standard_normal((8, 3, 4, 4)) * 1.5).astype(np.float32)
    out = p_mean_variance(raw_eps, x, i, schedule, learn_sigma=False, clip_denoised=True)
    guided = condition_score(out, x, i, schedule, grad)

    x64, eps64, g64 = (a.astype(np.float64) for a in (x, raw_eps, grad))
    unclipped = (x64 - np.sqrt(1 - ab) * eps64) / np.sqrt(ab)
    expected = np.clip(unclipped, -1, 1) + (1 - ab) / np.sqrt(ab) * g64
    atol = 1e-5
    np.testing.assert_allclose(guided["pred_xstart"], expected, rtol=0, atol=atol)
    coef1, coef2, _ = _posterior_coefficients(schedule.betas, i)
    np.testing.assert_allclose(guided["mean"], coef1 * expected + coef2 * x64, rtol=0, atol=atol)
    np.testing.assert_allclose(
        guided["eps"], (x64 - np.sqrt(ab) * expected) / np.sqrt(1 - ab), rtol=0, atol=atol
    )

    # Each usual mistake would be caught by the assertions above.
    mistakes = {
        "wrong sign": np.clip(unclipped, -1, 1) - (1 - ab) / np.sqrt(ab) * g64,
        "std instead of variance": np.clip(unclipped, -1, 1) + (1 - ab) ** 1.5 / np.sqrt(ab) * g64,
        "clipped again": np.clip(expected, -1, 1),
        "raw eps": unclipped + (1 - ab) / np.sqrt(ab) * g64,
    }
    for name, wrong in mistakes.items():
        assert np.abs(wrong - expected).max() > 100 * atol, name


def test_condition_mean_adds_variance_times_gradient():
    """Algorithm 1: mu + Sigma g, Sigma the model's (learned) variance, not its std."""
    schedule = make_schedule("linear", 1000, "250")
    i = 120
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 4, 4)).astype(np.float32)
    v = rng.uniform(-1, 1, (4, 3, 4, 4)).astype(np.float32)
    model_out = np.concatenate([rng.standard_normal((4, 3, 4, 4)).astype(np.float32), v], axis=1)
    grad = rng.standard_normal((4, 3, 4, 4)).astype(np.float32)
    out = p_mean_variance(model_out, x, i, schedule, learn_sigma=True)
    guided = condition_mean(out, grad)

    _, _, posterior_var = _posterior_coefficients(schedule.betas, i)
    frac = (v.astype(np.float64) + 1) / 2
    variance = np.exp(frac * np.log(schedule.betas[i]) + (1 - frac) * np.log(posterior_var))
    shift = guided["mean"].astype(np.float64) - out["mean"]
    np.testing.assert_allclose(shift, variance * grad, rtol=1e-3, atol=1e-6)
    assert np.abs(np.sqrt(variance) * grad - variance * grad).max() > 1e-2
    np.testing.assert_array_equal(guided["pred_xstart"], out["pred_xstart"])


def test_condition_mean_approximates_the_class_conditional_mean():
    """At small beta, mu + beta g ~ the posterior mean under q(x | y) (exact shift beta/sqrt(alpha) g)."""
    schedule = make_schedule("linear", 1000)
    i = 500
    t = np.full(32, i)
    x = np.random.default_rng(6).standard_normal((32, 2, 2, 2)).astype(np.float32)
    out = p_mean_variance(MIXTURE.eps(x, t), x, i, schedule, learn_sigma=False, clip_denoised=False)
    guided = condition_mean(out, MIXTURE.classifier_grad(x, t, y=1).astype(np.float32))

    ab = MIXTURE.alphas_cumprod[i]
    m, s2 = MIXTURE.means[1], MIXTURE.std**2
    x64 = x.astype(np.float64)
    xstart = m + np.sqrt(ab) * s2 / (ab * s2 + 1 - ab) * (x64 - np.sqrt(ab) * m)
    coef1, coef2, _ = _posterior_coefficients(schedule.betas, i)
    exact_shift = coef1 * xstart + coef2 * x64 - out["mean"]
    shift = guided["mean"] - out["mean"]
    assert np.abs(exact_shift).max() > 1e-3
    np.testing.assert_allclose(shift, exact_shift, rtol=0.02, atol=2e-5)


# DDIM and DDPM agree where they should.


def fake_model(learn_sigma=False, v=-1.0):
    """A smooth nonlinear stand-in for a network, recording the timesteps it is called with."""

    def model(x, t):
        model.calls.append(t.copy())
        eps = np.tanh(1.3 * x) + 0.1 * np.sin(t / 100.0).reshape(-1, 1, 1, 1)
        eps = eps.astype(np.float32)
        return np.concatenate([eps, np.full_like(eps, v)], axis=1) if learn_sigma else eps

    model.calls = []
    return model


def test_ddim_eta_1_is_the_ddpm_posterior_step():
    """eta = 1: sigma^2 is the posterior variance and the DDIM mean is the posterior mean."""
    schedule = make_schedule("cosine", 1000, "20")
    rng = np.random.default_rng(7)
    x_T = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    noise = rng.standard_normal((20, 3, 2, 4, 4)).astype(np.float32)
    steps = []
    model = fake_model()
    x = sample_ddim(
        model, x_T, schedule, learn_sigma=False, eta=1.0, noise=noise, callback=steps.append
    )

    assert [s["step"] for s in steps] == list(range(20))
    assert [s["i"] for s in steps] == list(range(19, -1, -1))
    assert [s["t"] for s in steps] == schedule.timestep_map[::-1].tolist()
    for calls, step in zip(model.calls, steps, strict=True):
        np.testing.assert_array_equal(calls, np.full(3, step["t"]))
    np.testing.assert_array_equal(x, steps[-1]["sample"])
    ab = np.cumprod(1 - schedule.betas)
    for s in steps:
        k, i, x_t = s["step"], s["i"], s["x"].astype(np.float64)
        eps = np.tanh(1.3 * x_t) + 0.1 * np.sin(s["t"] / 100.0)
        xstart = np.clip((x_t - np.sqrt(1 - ab[i]) * eps) / np.sqrt(ab[i]), -1, 1)
        np.testing.assert_allclose(s["pred_xstart"], xstart, rtol=0, atol=2e-5)
        coef1, coef2, posterior_var = _posterior_coefficients(schedule.betas, i)
        expected = coef1 * s["pred_xstart"] + coef2 * x_t
        if i > 0:
            expected += np.sqrt(posterior_var) * noise[k]
        np.testing.assert_allclose(s["sample"], expected, rtol=0, atol=2e-5)
        assert s["x"].dtype == s["sample"].dtype == np.float32


def test_ddim_eta_1_matches_ddpm_with_the_posterior_variance():
    """Whole trajectories: DDPM with learned v = -1 (log variance = posterior's) is DDIM eta = 1."""
    schedule = make_schedule("linear", 1000, "ddim25")
    rng = np.random.default_rng(8)
    x_T = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((25, 2, 3, 8, 8)).astype(np.float32)
    ddim = sample_ddim(fake_model(), x_T, schedule, learn_sigma=False, eta=1.0, noise=noise)
    ddpm = sample_ddpm(
        fake_model(learn_sigma=True, v=-1.0), x_T, schedule, learn_sigma=True, noise=noise
    )
    np.testing.assert_allclose(ddim, ddpm, rtol=0, atol=1e-4)
    assert np.abs(ddim - x_T).max() > 0.5


def test_ddpm_noise_slices_and_fixed_large_variance():
    """Slice k at iteration k, none at i = 0; fixed variance is beta_i (posterior_variance[1] at 0)."""
    schedule = make_schedule("linear", 1000, "10")
    rng = np.random.default_rng(9)
    x_T = rng.standard_normal((2, 1, 2, 2)).astype(np.float32)
    noise = rng.standard_normal((10, 2, 1, 2, 2)).astype(np.float32)
    noise[-1] = np.nan  # drawn but unused, as in the original
    steps = []
    zero_model = lambda x, t: np.zeros_like(x)  # noqa: E731
    sample_ddpm(
        zero_model,
        x_T,
        schedule,
        learn_sigma=False,
        clip_denoised=False,
        noise=noise,
        callback=steps.append,
    )
    for s in steps:
        k, i, x_t = s["step"], s["i"], s["x"].astype(np.float64)
        coef1, coef2, _ = _posterior_coefficients(schedule.betas, i)
        ab = np.cumprod(1 - schedule.betas)[i]
        mean = coef1 * x_t / np.sqrt(ab) + coef2 * x_t
        if i > 0:
            mean += np.sqrt(schedule.betas[i]) * noise[k]
        np.testing.assert_allclose(s["sample"], mean, rtol=1e-5, atol=1e-6)

    out = p_mean_variance(np.zeros_like(x_T), x_T, 0, schedule, learn_sigma=False)
    _, _, posterior_var_1 = _posterior_coefficients(schedule.betas, 1)
    np.testing.assert_allclose(out["variance"], posterior_var_1, rtol=1e-6)
    np.testing.assert_allclose(out["log_variance"], np.log(posterior_var_1), rtol=1e-6)


# Noise sources, errors, and the torch-free import.


def test_noise_sources_are_interchangeable():
    schedule = make_schedule("cosine", 1000, "8")
    x_T = np.random.default_rng(10).standard_normal((2, 1, 3, 3)).astype(np.float32)
    noise = np.random.default_rng(11).standard_normal((8, 2, 1, 3, 3)).astype(np.float32)
    calls = []

    def noise_fn(k, shape):
        calls.append((k, shape))
        return noise[k]

    for sampler, kwargs in ((sample_ddpm, {}), (sample_ddim, {"eta": 0.7})):
        from_array = sampler(fake_model(), x_T, schedule, learn_sigma=False, noise=noise, **kwargs)
        from_fn = sampler(fake_model(), x_T, schedule, learn_sigma=False, noise=noise_fn, **kwargs)
        np.testing.assert_array_equal(from_array, from_fn)
        a = sampler(
            fake_model(), x_T, schedule, learn_sigma=False, rng=np.random.default_rng(0), **kwargs
        )
        b = sampler(
            fake_model(), x_T, schedule, learn_sigma=False, rng=np.random.default_rng(0), **kwargs
        )
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - from_array).max() > 1e-3
    assert calls == 2 * [(k, (2, 1, 3, 3)) for k in range(8)]


def test_missing_or_misshapen_noise_is_an_error():
    schedule = make_schedule("cosine", 1000, "8")
    x_T = np.zeros((2, 1, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="needs noise"):
        sample_ddpm(fake_model(), x_T, schedule, learn_sigma=False)
    with pytest.raises(ValueError, match="needs noise"):
        sample_ddim(fake_model(), x_T, schedule, learn_sigma=False, eta=0.5)
    sample_ddim(fake_model(), x_T, schedule, learn_sigma=False)  # eta = 0 needs none
    with pytest.raises(ValueError, match=r"expected \(8, 2, 1, 3, 3\)"):
        sample_ddpm(fake_model(), x_T, schedule, learn_sigma=False, noise=np.zeros((7, 2, 1, 3, 3)))
    with pytest.raises(ValueError, match="not both"):
        sample_ddpm(
            fake_model(),
            x_T,
            schedule,
            learn_sigma=False,
            noise=np.zeros((8, 2, 1, 3, 3)),
            rng=np.random.default_rng(0),
        )
    with pytest.raises(ValueError, match=r"returned shape \(3,\) at step 0"):
        sample_ddpm(
            fake_model(), x_T, schedule, learn_sigma=False, noise=lambda k, shape: np.zeros(3)
        )
    with pytest.raises(ValueError, match="pass learn_sigma=True"):
        sample_ddim(fake_model(learn_sigma=True), x_T, schedule, learn_sigma=False)
    with pytest.raises(ValueError, match=r"model output has shape \(2, 1, 3, 3\), expected"):
        sample_ddim(fake_model(), x_T, schedule, learn_sigma=True)


def test_non_finite_values_name_the_step_and_timestep():
    schedule = make_schedule("linear", 1000, "ddim10")  # timesteps 0, 100, ..., 900

    def broken_model(x, t):
        eps = np.zeros_like(x)
        if t[0] == 700:
            eps[0, 0, 0, 0] = np.nan
        return eps

    x_T = np.zeros((2, 1, 3, 3), dtype=np.float32)
    with pytest.raises(FloatingPointError, match=r"model output .* step 2 .*timestep 700"):
        sample_ddim(broken_model, x_T, schedule, learn_sigma=False)

    noise = np.zeros((10, 2, 1, 3, 3), dtype=np.float32)
    noise[4, 1] = np.inf
    with pytest.raises(NonFiniteError, match=r"sample .* step 4 .*timestep 500") as info:
        sample_ddpm(lambda x, t: np.zeros_like(x), x_T, schedule, learn_sigma=False, noise=noise)
    assert (info.value.step, info.value.index, info.value.timestep) == (4, 5, 500)

    bad_grad = lambda x, t: np.full_like(x, np.inf)  # noqa: E731
    with pytest.raises(NonFiniteError, match="classifier gradient"):
        sample_ddim(
            lambda x, t: np.zeros_like(x), x_T, schedule, learn_sigma=False, grad_fn=bad_grad
        )


def test_runtime_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import runtime.schedule, runtime.sampling\n"
        "assert sys.modules.get('torch') is None\n"
    )
    root = Path(__file__).parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
