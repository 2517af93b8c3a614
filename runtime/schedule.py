"""Noise schedules and timestep respacing, exact to the original guided-diffusion code.

Everything here is float64 numpy, computed the way `gaussian_diffusion.py` and `respace.py` compute
it, so the tables match the original to the last bit (checked against golden tables in the tests).
Samplers cast a table entry to float32 where they use it.

After respacing, a schedule has K steps indexed by the *respaced* index i in [0, K); the model must
be called with the *original* timestep `schedule.timestep_map[i]` (the original's `_WrappedModel`
does this mapping behind the model's back; here it is an explicit table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NOISE_SCHEDULES = ("linear", "cosine")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999
) -> np.ndarray:
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1] (Nichol & Dhariwal 2021, eq. 17).

    Returns (T,) float64. Scalar Python math on purpose: it is what the original does, so the values
    agree bit for bit (numpy's vectorised cos may differ in the last ulp).
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def betas_for(noise_schedule: str, num_diffusion_timesteps: int) -> np.ndarray:
    """The original's `get_named_beta_schedule`: (T,) float64 betas for "linear" or "cosine"."""
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if noise_schedule == "linear":
        # Ho et al.'s linear schedule, rescaled so that any T gives the same alpha_bar curve.
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if noise_schedule == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown noise schedule {noise_schedule!r}: valid ones are "
        + ", ".join(repr(s) for s in NOISE_SCHEDULES)
    )


def _parse_section_counts(spec: str) -> list[int]:
    try:
        return [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"invalid timestep respacing {spec!r}: expected 'ddimN' (e.g. 'ddim25'), a step count "
            "(e.g. '250'), comma-separated section counts (e.g. '10,5,3'), or '' for all steps"
        ) from None


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int] | None) -> set[int]:
    """The original timesteps kept by respacing (the original's `respace.space_timesteps`).

    - "ddimN": the smallest integer stride s with len(range(0, T, s)) == N; keeps range(0, T, s),
      so the last step T-1 is kept only when s divides T-1.
    - "N" or "N1,N2,...": T is cut into len(sections) near-equal sections, and each section keeps
      its count of steps, evenly spaced, first and last of the section included.
    - "" or None: all T steps.
    """
    if section_counts is None or (isinstance(section_counts, str) and not section_counts.strip()):
        return set(range(num_timesteps))
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired_count = int(section_counts[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"invalid timestep respacing {section_counts!r}: expected 'ddimN', e.g. 'ddim25'"
                ) from None
            if not 2 <= desired_count <= num_timesteps:
                raise ValueError(
                    f"invalid timestep respacing {section_counts!r}: 'ddimN' needs 2 <= N <= "
                    f"{num_timesteps} (the model's diffusion steps), e.g. 'ddim25'"
                )
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired_count} steps out of {num_timesteps} with an "
                f"integer stride (respacing {section_counts!r}); use a plain count such as "
                f"'{desired_count}' for evenly spread non-integer strides"
            )
        section_counts = _parse_section_counts(section_counts)
    section_counts = [int(c) for c in section_counts]
    if not section_counts:
        raise ValueError("section_counts is an empty list: give at least one count")
    if any(c < 0 for c in section_counts):
        raise ValueError(f"section counts must be >= 0, got {section_counts}")

    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"cannot divide section {i} of {size} steps into {section_count} "
                f"(T={num_timesteps}, sections {section_counts})"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulated by addition and rounded half to even, exactly as the original: a closed form
        # round(j * frac_stride) differs for some (size, count) pairs.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Schedule:
    """The diffusion tables of one (possibly respaced) schedule, (K,) float64 each.

    Index with the respaced index i; `timestep_map[i]` ((K,) int64) is the original timestep the
    model and the classifier must be called with. Names and formulas are the original
    `GaussianDiffusion`'s. Build with `Schedule.from_betas` or `make_schedule`.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timestep_map: np.ndarray

    @property
    def num_timesteps(self) -> int:
        """K, the number of (respaced) steps."""
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(
        cls, betas: Sequence[float] | np.ndarray, timestep_map: Sequence[int] | None = None
    ) -> Schedule:
        """Tables of the original `GaussianDiffusion.__init__` from (K,) betas.

        timestep_map: (K,) original timesteps for the respaced steps; default arange(K).
        """
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1:
            raise ValueError(f"betas must be 1-D, got shape {betas.shape}")
        if betas.shape[0] < 2:
            raise ValueError(
                f"a schedule needs at least 2 steps, got {betas.shape[0]} (the original's "
                "posterior_log_variance_clipped reads posterior_variance[1])"
            )
        if not ((betas > 0).all() and (betas <= 1).all()):
            bad = np.flatnonzero(~((betas > 0) & (betas <= 1)))
            raise ValueError(
                f"betas must lie in (0, 1]; index {bad[0]} is {betas[bad[0]]!r} "
                f"({bad.size} bad values)"
            )
        num = betas.shape[0]
        if timestep_map is None:
            tmap = np.arange(num, dtype=np.int64)
        else:
            tmap = np.array(timestep_map, dtype=np.int64)
            if tmap.shape != (num,):
                raise ValueError(
                    f"timestep_map has shape {tmap.shape}, expected ({num},) to match the betas"
                )

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
        # Variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            alphas_cumprod_next=alphas_cumprod_next,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            posterior_variance=posterior_variance,
            # posterior_variance[0] is 0; the log is clipped by repeating entry 1.
            posterior_log_variance_clipped=np.log(
                np.append(posterior_variance[1], posterior_variance[1:])
            ),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev)
            * np.sqrt(alphas)
            / (1.0 - alphas_cumprod),
            timestep_map=tmap,
        )
        return cls(**{name: _read_only(value) for name, value in tables.items()})


def make_schedule(
    noise_schedule: str, diffusion_steps: int, respacing: str | Sequence[int] | None = ""
) -> Schedule:
    """The schedule the original's `SpacedDiffusion` samples with.

    noise_schedule: "linear" or "cosine"; diffusion_steps: T the model was trained with;
    respacing: as `space_timesteps` ("" or None keeps all T steps). The kept steps get new betas
    1 - alpha_bar_t / alpha_bar_prev_kept so that alphas_cumprod is unchanged at the kept steps.
    """
    base_alphas_cumprod = np.cumprod(1.0 - betas_for(noise_schedule, diffusion_steps), axis=0)
    use_timesteps = space_timesteps(diffusion_steps, respacing)
    new_betas = []
    timestep_map = []
    last_alpha_cumprod = 1.0
    for i, alpha_cumprod in enumerate(base_alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
            last_alpha_cumprod = alpha_cumprod
            timestep_map.append(i)
    return Schedule.from_betas(new_betas, timestep_map)


def truncate(schedule: Schedule, max_t: int) -> Schedule:
    """The schedule's first steps, those whose original timestep is <= max_t.

    alphas_cumprod is a running product from step 0, so the kept steps keep their exact tables; a
    sampler over the result starts at the last kept step (SDEdit's truncated reverse process).
    """
    keep = int((schedule.timestep_map <= max_t).sum())
    if keep < 2:
        raise ValueError(
            f"start timestep {max_t} keeps {keep} of the respaced steps "
            f"{schedule.timestep_map.tolist()[:8]}...: raise it or use more steps"
        )
    return Schedule.from_betas(schedule.betas[:keep], schedule.timestep_map[:keep])
