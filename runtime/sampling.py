"""DDPM and DDIM sampling for ADM models as small pure numpy functions (k-diffusion style).

Exact to the original guided-diffusion `GaussianDiffusion` (`p_sample_loop`, `ddim_sample_loop`,
`condition_mean`, `condition_score`) for eps-predicting models with LEARNED_RANGE variance
(learn_sigma=True) or FIXED_LARGE variance (learn_sigma=False).

Conventions shared with the rest of the runtime:

- State x is float32 (B, C, H, W). Schedule tables are float64; an entry is cast to float32 where it
  is used, as the original's `_extract_into_tensor(...).float()` does, so the arithmetic is float32.
- `i` is the respaced index (one per step, the same for the whole batch); the model and the
  classifier are called with the original timestep `schedule.timestep_map[i]` as a (B,) int64 array.
- `model_fn(x, t) -> out`: the raw model output, (B, C, H, W), or (B, 2C, H, W) when learn_sigma
  (eps, then the variance interpolation v in [-1, 1]). Class labels or a low-res image are bound by
  the caller in a closure.
- `grad_fn(x, t) -> g`: (B, C, H, W) float32, scale * d log p(y | x_t) / d x_t, the guidance scale
  already applied and the labels bound by the caller.
- No hidden randomness: noise is an argument (array or callable) or comes from an explicit
  `np.random.Generator`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from runtime.schedule import Schedule

ModelFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
GradFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# noise(step, shape) -> (B, C, H, W) standard normal; step is the loop iteration k.
NoiseFn = Callable[[int, tuple[int, ...]], np.ndarray]
Callback = Callable[[dict[str, Any]], None]

_f32 = np.float32


class NonFiniteError(FloatingPointError):
    """A model output, classifier gradient or sample holds NaN or inf at some sampling step."""

    def __init__(self, what: str, values: np.ndarray, step: int, index: int, timestep: int):
        n_nan = int(np.isnan(values).sum())
        n_inf = int(np.isinf(values).sum())
        super().__init__(
            f"{what} has non-finite values at sampling step {step} (respaced index {index}, "
            f"timestep {timestep}): {n_nan} NaN and {n_inf} inf out of {values.size}"
        )
        self.what = what
        self.step = step
        self.index = index
        self.timestep = timestep


def _check_finite(what: str, values: np.ndarray, step: int, index: int, timestep: int) -> None:
    if not np.isfinite(values).all():
        raise NonFiniteError(what, values, step, index, timestep)


def _check_index(i: int, schedule: Schedule) -> None:
    if not 0 <= i < schedule.num_timesteps:
        raise IndexError(
            f"respaced index {i} is out of range for a schedule of {schedule.num_timesteps} steps"
        )


# Equations of the forward process (Ho et al. 2020, eqs. 4, 6, 7 and 11).


def xstart_from_eps(x: np.ndarray, i: int, eps: np.ndarray, schedule: Schedule) -> np.ndarray:
    """x_0 = (x_t - sqrt(1 - alpha_bar_i) eps) / sqrt(alpha_bar_i), (B, C, H, W) float32."""
    return (
        _f32(schedule.sqrt_recip_alphas_cumprod[i]) * x
        - _f32(schedule.sqrt_recipm1_alphas_cumprod[i]) * eps
    )


def eps_from_xstart(x: np.ndarray, i: int, xstart: np.ndarray, schedule: Schedule) -> np.ndarray:
    """The eps that maps x_t to xstart, the inverse of `xstart_from_eps`; float32."""
    return (_f32(schedule.sqrt_recip_alphas_cumprod[i]) * x - xstart) / _f32(
        schedule.sqrt_recipm1_alphas_cumprod[i]
    )


def posterior_mean(xstart: np.ndarray, x: np.ndarray, i: int, schedule: Schedule) -> np.ndarray:
    """Mean of q(x_{i-1} | x_i, x_0) (Ho et al. 2020, eq. 7), (B, C, H, W) float32."""
    return (
        _f32(schedule.posterior_mean_coef1[i]) * xstart + _f32(schedule.posterior_mean_coef2[i]) * x
    )


def p_mean_variance(
    model_out: np.ndarray,
    x: np.ndarray,
    i: int,
    schedule: Schedule,
    *,
    learn_sigma: bool,
    clip_denoised: bool = True,
) -> dict[str, np.ndarray]:
    """The reverse step p(x_{i-1} | x_i) an eps model defines (the original's `p_mean_variance`).

    model_out: (B, C, H, W), or (B, 2C, H, W) when learn_sigma; x: (B, C, H, W) float32; i: the
    respaced index. Returns float32 "mean", "pred_xstart", "eps" (B, C, H, W) and "variance",
    "log_variance" (broadcastable to x: per element when learn_sigma, else a scalar).

    learn_sigma interpolates the log variance between the posterior variance and beta (Nichol &
    Dhariwal 2021, eq. 15); otherwise the variance is the original's FIXED_LARGE: beta_i, with
    posterior_variance[1] at i = 0.
    """
    _check_index(i, schedule)
    x = np.asarray(x, dtype=np.float32)
    model_out = np.asarray(model_out)
    channels = x.shape[1]
    expected = (x.shape[0], 2 * channels, *x.shape[2:]) if learn_sigma else x.shape
    if model_out.shape != expected:
        raise ValueError(
            f"model output has shape {model_out.shape}, expected {expected} for x of shape "
            f"{x.shape} with learn_sigma={learn_sigma}"
            + (
                ": does the model learn sigma? then pass learn_sigma=True"
                if not learn_sigma and model_out.shape == (x.shape[0], 2 * channels, *x.shape[2:])
                else ""
            )
        )
    model_out = model_out.astype(np.float32, copy=False)

    if learn_sigma:
        eps, v = model_out[:, :channels], model_out[:, channels:]
        min_log = _f32(schedule.posterior_log_variance_clipped[i])
        max_log = _f32(np.log(schedule.betas[i]))
        frac = (v + 1) / 2  # v in [-1, 1] -> [0, 1]
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = np.exp(log_variance)
    else:
        eps = model_out
        var64 = schedule.posterior_variance[1] if i == 0 else schedule.betas[i]
        variance, log_variance = _f32(var64), _f32(np.log(var64))

    pred_xstart = xstart_from_eps(x, i, eps, schedule)
    if clip_denoised:
        np.clip(pred_xstart, -1, 1, out=pred_xstart)
    return {
        "mean": posterior_mean(pred_xstart, x, i, schedule),
        "variance": variance,
        "log_variance": log_variance,
        "pred_xstart": pred_xstart,
        "eps": eps,
    }


# Classifier guidance (Dhariwal & Nichol 2021, section 4). Each takes a `p_mean_variance` dict and
# returns a new one. They are not eps-function wrappers because the original guides the eps
# re-derived from the *clipped* x_0, which a wrapper around the raw eps cannot reproduce.


def condition_mean(out: Mapping[str, np.ndarray], grad: np.ndarray) -> dict[str, np.ndarray]:
    """Algorithm 1 (DDPM): shift the mean by Sigma * g, g = s * grad log p(y | x_t).

    The shift uses the variance, not the standard deviation. Other entries are unchanged (the
    original leaves pred_xstart unguided too). grad: (B, C, H, W) float32.
    """
    if grad.shape != out["mean"].shape:
        raise ValueError(
            f"classifier gradient has shape {grad.shape}, expected {out['mean'].shape} like x"
        )
    guided = dict(out)
    guided["mean"] = out["mean"] + out["variance"] * grad
    return guided


def condition_score(
    out: Mapping[str, np.ndarray], x: np.ndarray, i: int, schedule: Schedule, grad: np.ndarray
) -> dict[str, np.ndarray]:
    """Algorithm 2 (DDIM): eps' = eps - sqrt(1 - alpha_bar_i) * g, g = s * grad log p(y | x_t).

    As the original does, eps is re-derived from out["pred_xstart"] (so from the clipped x_0), and
    the guided x_0 derived from eps' is *not* clipped again; the mean follows from it. Returns a new
    dict with "eps", "pred_xstart" and "mean" replaced. grad: (B, C, H, W) float32.
    """
    if grad.shape != x.shape:
        raise ValueError(f"classifier gradient has shape {grad.shape}, expected {x.shape} like x")
    alpha_bar = _f32(schedule.alphas_cumprod[i])
    eps = eps_from_xstart(x, i, out["pred_xstart"], schedule)
    eps = eps - np.sqrt(_f32(1) - alpha_bar) * grad
    guided = dict(out)
    guided["eps"] = eps
    guided["pred_xstart"] = xstart_from_eps(x, i, eps, schedule)
    guided["mean"] = posterior_mean(guided["pred_xstart"], x, i, schedule)
    return guided


def ddpm_step(out: Mapping[str, np.ndarray], i: int, noise: np.ndarray | None) -> np.ndarray:
    """x_{i-1} = mean + exp(log_variance / 2) * noise, no noise at i = 0 (the original's p_sample)."""
    if i == 0:
        return out["mean"]
    if noise is None:
        raise ValueError(f"ddpm_step needs noise at respaced index {i} > 0")
    return out["mean"] + np.exp(_f32(0.5) * out["log_variance"]) * noise


def ddim_step(
    out: Mapping[str, np.ndarray],
    x: np.ndarray,
    i: int,
    schedule: Schedule,
    *,
    eta: float,
    noise: np.ndarray | None,
) -> np.ndarray:
    """One DDIM update (Song et al. 2021, eq. 12) from out["pred_xstart"] (the original's ddim_sample).

    eps is re-derived from pred_xstart (so it follows clipping and guidance). noise may be None when
    eta == 0 or i == 0, where it is not used.
    """
    eps = eps_from_xstart(x, i, out["pred_xstart"], schedule)
    alpha_bar = _f32(schedule.alphas_cumprod[i])
    alpha_bar_prev = _f32(schedule.alphas_cumprod_prev[i])
    one = _f32(1)
    # Song et al. 2021, eq. 16; eta = 1 gives the DDPM posterior variance.
    sigma = (
        _f32(eta)
        * np.sqrt((one - alpha_bar_prev) / (one - alpha_bar))
        * np.sqrt(one - alpha_bar / alpha_bar_prev)
    )
    mean_pred = (
        out["pred_xstart"] * np.sqrt(alpha_bar_prev)
        + np.sqrt(one - alpha_bar_prev - sigma * sigma) * eps
    )
    if i == 0 or sigma == 0:
        return mean_pred
    if noise is None:
        raise ValueError(f"ddim_step needs noise at respaced index {i} > 0 with eta={eta}")
    return mean_pred + sigma * noise


def _noise_source(
    noise: np.ndarray | NoiseFn | None,
    rng: np.random.Generator | None,
    shape: tuple[int, ...],
    num_steps: int,
    *,
    needed: bool,
    caller: str,
) -> Callable[[int], np.ndarray] | None:
    """A function from loop iteration k to (B, C, H, W) float32 noise, or None if none is needed."""
    if noise is not None and rng is not None:
        raise ValueError(f"{caller}: pass noise or rng, not both")
    if noise is None:
        if not needed:
            return None
        if rng is None:
            raise ValueError(
                f"{caller} needs noise: pass noise=(K, B, C, H, W) array or callable, or "
                "rng=np.random.default_rng(seed)"
            )
        return lambda k: rng.standard_normal(shape, dtype=np.float32)
    if callable(noise):
        noise_fn = noise

        def draw(k: int) -> np.ndarray:
            z = np.asarray(noise_fn(k, shape))
            if z.shape != shape:
                raise ValueError(
                    f"{caller}: noise callable returned shape {z.shape} at step {k}, expected {shape}"
                )
            return z.astype(np.float32, copy=False)

        return draw if needed else None
    noise = np.asarray(noise)
    if noise.shape != (num_steps, *shape):
        raise ValueError(
            f"{caller}: noise has shape {noise.shape}, expected {(num_steps, *shape)} "
            f"(one (B, C, H, W) slice per step of the {num_steps}-step schedule, slice k used at "
            "loop iteration k)"
        )
    noise = noise.astype(np.float32, copy=False)
    return (lambda k: noise[k]) if needed else None


def _initial_state(x_T: np.ndarray, caller: str) -> np.ndarray:
    x = np.asarray(x_T, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"{caller}: x_T must be (B, C, H, W), got shape {x.shape}")
    return x


def _call_model(model_fn: ModelFn, x: np.ndarray, t: np.ndarray, k: int, i: int) -> np.ndarray:
    model_out = np.asarray(model_fn(x, t))
    _check_finite("model output", model_out, k, i, int(t[0]))
    return model_out


def _call_grad(grad_fn: GradFn, x: np.ndarray, t: np.ndarray, k: int, i: int) -> np.ndarray:
    grad = np.asarray(grad_fn(x, t), dtype=np.float32)
    _check_finite("classifier gradient", grad, k, i, int(t[0]))
    return grad


def _emit(
    callback: Callback,
    k: int,
    i: int,
    t: int,
    x: np.ndarray,
    out: Mapping[str, np.ndarray],
    sample: np.ndarray,
) -> None:
    info = {"step": k, "i": i, "t": t, "x": x, "pred_xstart": out["pred_xstart"], "sample": sample}
    callback(info)


def sample_ddpm(
    model_fn: ModelFn,
    x_T: np.ndarray,
    schedule: Schedule,
    *,
    learn_sigma: bool,
    clip_denoised: bool = True,
    grad_fn: GradFn | None = None,
    noise: np.ndarray | NoiseFn | None = None,
    rng: np.random.Generator | None = None,
    callback: Callback | None = None,
) -> np.ndarray:
    """Ancestral sampling, the original's `p_sample_loop`; with grad_fn, Algorithm 1 guidance.

    x_T: (B, C, H, W) noise. noise: (K, B, C, H, W) with slice k used at iteration k (respaced
    index i = K-1-k; the last slice is unused, as in the original), or noise(k, shape), or None to
    draw from rng. callback(info) after every step, info = {"step": k, "i": i, "t": original
    timestep, "x": x_i, "pred_xstart", "sample": x_{i-1}} (arrays owned by the sampler, don't
    modify them). Returns x_0, (B, C, H, W) float32.
    """
    x = _initial_state(x_T, "sample_ddpm")
    num_steps = schedule.num_timesteps
    noise_at = _noise_source(noise, rng, x.shape, num_steps, needed=True, caller="sample_ddpm")
    for k, i in enumerate(range(num_steps - 1, -1, -1)):
        t_int = int(schedule.timestep_map[i])
        t = np.full(x.shape[0], t_int, dtype=np.int64)
        out = p_mean_variance(
            _call_model(model_fn, x, t, k, i),
            x,
            i,
            schedule,
            learn_sigma=learn_sigma,
            clip_denoised=clip_denoised,
        )
        z = noise_at(k)
        if grad_fn is not None:
            out = condition_mean(out, _call_grad(grad_fn, x, t, k, i))
        sample = ddpm_step(out, i, z)
        _check_finite("sample", sample, k, i, t_int)
        if callback is not None:
            _emit(callback, k, i, t_int, x, out, sample)
        x = sample
    return x


def sample_ddim(
    model_fn: ModelFn,
    x_T: np.ndarray,
    schedule: Schedule,
    *,
    learn_sigma: bool,
    eta: float = 0.0,
    clip_denoised: bool = True,
    grad_fn: GradFn | None = None,
    noise: np.ndarray | NoiseFn | None = None,
    rng: np.random.Generator | None = None,
    callback: Callback | None = None,
) -> np.ndarray:
    """DDIM sampling (Song et al. 2021), the original's `ddim_sample_loop`; with grad_fn,
    Algorithm 2 guidance.

    x_T: (B, C, H, W) noise. eta = 0 is deterministic and needs no noise; eta > 0 needs noise
    (K, B, C, H, W) / noise(k, shape) / rng, as `sample_ddpm`. callback as `sample_ddpm`, with
    "pred_xstart" the guided one. Returns x_0, (B, C, H, W) float32.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x = _initial_state(x_T, "sample_ddim")
    num_steps = schedule.num_timesteps
    noise_at = _noise_source(noise, rng, x.shape, num_steps, needed=eta > 0, caller="sample_ddim")
    for k, i in enumerate(range(num_steps - 1, -1, -1)):
        t_int = int(schedule.timestep_map[i])
        t = np.full(x.shape[0], t_int, dtype=np.int64)
        out = p_mean_variance(
            _call_model(model_fn, x, t, k, i),
            x,
            i,
            schedule,
            learn_sigma=learn_sigma,
            clip_denoised=clip_denoised,
        )
        if grad_fn is not None:
            out = condition_score(out, x, i, schedule, _call_grad(grad_fn, x, t, k, i))
        sample = ddim_step(
            out, x, i, schedule, eta=eta, noise=None if noise_at is None else noise_at(k)
        )
        _check_finite("sample", sample, k, i, t_int)
        if callback is not None:
            _emit(callback, k, i, t_int, x, out, sample)
        x = sample
    return x
