"""How far an int8 graph is from its fp32 graph on the recorded trajectories.

Both graphs run in ONNX Runtime on the same recorded feeds (every step of every calibration
trajectory). The figures are relative to the fp32 output's magnitude, because what a sampler does
with eps or a gradient depends on its direction and size, not on absolute units:

    rel_rms       ||int8 - fp32|| / ||fp32|| over all calls
    worst_rel_rms the same per call (one step of one shard), its maximum
    cosine_min    the smallest per-sample cosine similarity of int8 and fp32 outputs
    cosine_mean   its mean
    by_timestep   rel_rms per model timestep t
    abs_by_timestep  the RMS of int8 - fp32 per model timestep t (output units)

The classifier gradient is also judged by what its error does to the sampler. Guidance shifts the
x0 prediction by (1 - alpha_bar_t) / sqrt(alpha_bar_t) * grad (Dhariwal & Nichol 2021, Algorithm 2:
eps' = eps - sqrt(1 - alpha_bar_t) grad, then x0 from eps'), and nothing clips it: an error dg
moves x0 by that factor times dg. The factor is 16 at t = 960 of a cosine schedule but 2e4 at
t = 999, so the gate weighs the error at each recorded timestep by it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.backends.onnxruntime import OrtBackend

# The classifier gradient is quantised only if it keeps its direction and size this well on the
# recorded trajectories; otherwise its float graph guides the int8 UNet.
GRAD_MIN_COSINE = 0.99
GRAD_MAX_REL_RMS = 0.1
# Largest RMS shift of the guided x0 prediction (images span [-1, 1]) the int8 gradient may cause.
GRAD_MAX_X0_SHIFT = 0.05


@dataclass
class GraphError:
    """int8 vs fp32 on recorded calls (see the module docstring)."""

    calls: int
    rel_rms: float
    worst_rel_rms: float
    cosine_min: float
    cosine_mean: float
    by_timestep: dict[str, float]
    abs_by_timestep: dict[str, float]

    def to_json(self) -> dict:
        return asdict(self)


def compare_graphs(
    reference: str | Path,
    candidate: str | Path,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    max_calls: int | None = None,
    threads: int | None = None,
) -> GraphError:
    """Run both graphs on each feeds dict (first output of each) and measure their difference."""
    err2 = ref2 = 0.0
    worst = 0.0
    cosines: list[np.ndarray] = []
    by_t: dict[int, list[float]] = {}
    abs_t: dict[int, list[float]] = {}
    calls = 0
    with (
        OrtBackend(reference, threads=threads) as ref,
        OrtBackend(candidate, threads=threads) as cand,
    ):
        for f in feeds:
            if max_calls is not None and calls >= max_calls:
                break
            want = next(iter(ref(f).values())).astype(np.float64)
            got = next(iter(cand(f).values())).astype(np.float64)
            d2 = float(((got - want) ** 2).sum())
            w2 = float((want**2).sum())
            err2 += d2
            ref2 += w2
            rel = np.sqrt(d2 / max(w2, 1e-30))
            worst = max(worst, float(rel))
            a, b = got.reshape(len(got), -1), want.reshape(len(want), -1)
            denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            cosines.append((a * b).sum(axis=1) / np.maximum(denom, 1e-30))
            t = int(np.asarray(f["t"]).reshape(-1)[0]) if "t" in f else -1
            by_t.setdefault(t, []).append(float(rel))
            abs_t.setdefault(t, []).append(d2 / want.size)
            calls += 1
    if calls == 0:
        raise ValueError("no feeds to compare on")
    cos = np.concatenate(cosines)
    return GraphError(
        calls=calls,
        rel_rms=float(np.sqrt(err2 / max(ref2, 1e-30))),
        worst_rel_rms=worst,
        cosine_min=float(cos.min()),
        cosine_mean=float(cos.mean()),
        by_timestep={
            str(t): float(np.sqrt(np.mean(np.square(v)))) for t, v in sorted(by_t.items())
        },
        abs_by_timestep={str(t): float(np.sqrt(np.mean(v))) for t, v in sorted(abs_t.items())},
    )


def x0_shift(error: GraphError, alphas_cumprod: np.ndarray) -> tuple[float, int]:
    """(largest RMS shift of the guided x0 prediction the gradient error causes, at which t)."""
    shifts = {
        int(t): (1 - alphas_cumprod[int(t)]) / np.sqrt(alphas_cumprod[int(t)]) * e
        for t, e in error.abs_by_timestep.items()
        if int(t) >= 0
    }
    t = max(shifts, key=shifts.get)
    return float(shifts[t]), t


def gradient_holds(error: GraphError, alphas_cumprod: np.ndarray) -> tuple[bool, str]:
    """(quantise it?, why) for the classifier-gradient graph; `alphas_cumprod` of the sampler's
    (the base UNet's) full schedule, indexed by model timestep."""
    shift, at = x0_shift(error, alphas_cumprod)
    ok = (
        error.cosine_min >= GRAD_MIN_COSINE
        and error.rel_rms <= GRAD_MAX_REL_RMS
        and shift <= GRAD_MAX_X0_SHIFT
    )
    why = (
        f"int8 gradient vs fp32 on {error.calls} recorded calls: relative RMS error "
        f"{error.rel_rms:.3g} (limit {GRAD_MAX_REL_RMS}), smallest cosine similarity "
        f"{error.cosine_min:.4f} (limit {GRAD_MIN_COSINE}), largest guided-x0 shift "
        f"{shift:.3g} at t = {at} (limit {GRAD_MAX_X0_SHIFT}); holds for respacings whose "
        f"timesteps stay within the recorded ones (up to t = {max(map(int, error.by_timestep))})"
    )
    return ok, why


def format_error(name: str, e: GraphError) -> str:
    return (
        f"{name:<28} rel RMS {e.rel_rms:.3e}  worst call {e.worst_rel_rms:.3e}  "
        f"cosine min {e.cosine_min:.5f} mean {e.cosine_mean:.5f}  ({e.calls} calls)"
    )
