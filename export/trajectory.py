"""Trajectory parity: the same seeded guided loop on the reference and on a build's engines.

Both sides run `runtime.sampling` with identical initial and per-step noise; only the model and
gradient callables differ (PyTorch reference vs the engines). Reported per stage: the largest
per-step error of x_t and of the x0 prediction, and the final-sample error.

The pass mark is on the final sample, what users get. Intermediate x_t is reported, not judged:
DDIM's first step from t = T multiplies the model's eps error by sqrt(abar_prev / abar_T) (for the
1000-step cosine schedule abar_T = 2.4e-9, so 7,700x at 5 steps, 1,300x at 25), and a 1e-7 fp32
difference becomes a 1e-3 one mid-way, then shrinks again as the chain converges.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from export import reference
from runtime.pipeline import Pipeline
from runtime.sampling import sample_ddim, sample_ddpm
from runtime.schedule import make_schedule

TRAJ_TOL = {"fp32": 1e-3}


@dataclass
class TrajectoryRow:
    case: str
    precision: str
    steps: str
    per_step_max_abs: float
    x0_max_abs: float
    final_max_abs: float
    tol: float | None
    passed: bool | None

    def to_json(self) -> dict:
        return asdict(self)


def _run(kind, model_fn, x_T, schedule, learn_sigma, grad_fn, noise):
    xs, x0s = [], []

    def cb(info):
        xs.append(info["x"].copy())
        x0s.append(info["pred_xstart"].copy())

    if kind == "ddim":
        final = sample_ddim(
            model_fn, x_T, schedule, learn_sigma=learn_sigma, grad_fn=grad_fn, callback=cb
        )
    else:
        final = sample_ddpm(
            model_fn,
            x_T,
            schedule,
            learn_sigma=learn_sigma,
            grad_fn=grad_fn,
            noise=noise,
            callback=cb,
        )
    return np.stack(xs), np.stack(x0s), final


def trajectory_parity(
    pipe: Pipeline,
    models: dict,
    *,
    steps: str = "25",
    batch: int = 2,
    scale: float | None = None,
    seed: int = 0,
    cases: tuple[str, ...] = ("ddim", "ddpm", "cascade"),
) -> list[TrajectoryRow]:
    """Run each case on both sides; `models` maps component name -> reference network."""
    precision = pipe.unet_artifact.precision
    tol = TRAJ_TOL.get(precision)
    rng = np.random.default_rng(seed)
    base = pipe.base
    n_classes = pipe.num_classes
    y = None if n_classes is None else rng.integers(0, n_classes, batch).astype(np.int64)
    if scale is None:
        scale = pipe.default_scale
    size = base["image_size"]
    diff = base["diffusion"]
    schedule = make_schedule(diff["noise_schedule"], diff["diffusion_steps"], steps)
    x_T = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    noise = rng.standard_normal((schedule.num_timesteps, batch, 3, size, size), dtype=np.float32)
    unet_ref = reference.model_fn(models["unet"], y=y if base.get("num_classes") else None)
    grad_ref = (
        reference.grad_fn(models["classifier"], y, scale)
        if scale and "classifier" in models
        else None
    )
    unet_eng = pipe.unet_fn(y if "y" in pipe.engine("unet").inputs else None)
    grad_eng = pipe.grad_fn(y, scale) if grad_ref is not None else None
    rows = []
    finals = {}
    for case in cases:
        if case == "cascade":
            continue
        a = _run(case, unet_ref, x_T, schedule, diff["learn_sigma"], grad_ref, noise)
        b = _run(case, unet_eng, x_T, schedule, diff["learn_sigma"], grad_eng, noise)
        finals[case] = (a[2], b[2])
        label = f"{case} guided (scale {scale:g})" if grad_ref is not None else f"{case} unguided"
        rows.append(_row(label, precision, steps, a, b, tol))
    if "cascade" in cases and pipe.has_upsampler and "upsampler" in models:
        up = pipe.upsampler_info
        low_res = finals.get("ddim", (None, None))[0]
        if low_res is None:
            low_res = np.clip(x_T, -1, 1)
        up_schedule = make_schedule(
            up["diffusion"]["noise_schedule"], up["diffusion"]["diffusion_steps"], steps
        )
        us = up["image_size"]
        up_T = rng.standard_normal((batch, 3, us, us), dtype=np.float32)
        y_up = y if models["upsampler"].num_classes else None
        a = _run("ddim", reference.model_fn(models["upsampler"], y=y_up, low_res=low_res), up_T,
                 up_schedule, up["diffusion"]["learn_sigma"], None, None)  # fmt: skip
        b = _run(
            "ddim",
            pipe.upsampler_fn(low_res, y_up),
            up_T,
            up_schedule,
            up["diffusion"]["learn_sigma"],
            None,
            None,
        )
        rows.append(_row("cascade upsampler (ddim)", precision, steps, a, b, tol))
    return rows


def _row(case, precision, steps, a, b, tol) -> TrajectoryRow:
    per_step = float(np.abs(a[0] - b[0]).max())
    x0 = float(np.abs(a[1] - b[1]).max())
    final = float(np.abs(a[2] - b[2]).max())
    return TrajectoryRow(
        case, precision, steps, per_step, x0, final, tol, None if tol is None else final <= tol
    )


def format_rows(rows: list[TrajectoryRow]) -> str:
    head = f"{'trajectory':<34} {'prec':<5} {'steps':<6} {'x_t max':>10} {'x0 max':>10} {'final max':>10} {'tol':>8}  pass"
    lines = [head, "-" * len(head)]
    for r in rows:
        tol = f"{r.tol:.0e}" if r.tol is not None else "-"
        ok = "-" if r.passed is None else ("yes" if r.passed else "NO")
        lines.append(
            f"{r.case:<34} {r.precision:<5} {r.steps:<6} {r.per_step_max_abs:>10.2e} "
            f"{r.x0_max_abs:>10.2e} {r.final_max_abs:>10.2e} {tol:>8}  {ok}"
        )
    return "\n".join(lines)
