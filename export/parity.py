"""Parity of exported graphs against the PyTorch reference, on seeded inputs across timesteps."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_export import classifier_gradient
from runtime.backends import open_backend

FP32_TOL = 1e-4
# Reduced precision is judged relative to the output's magnitude: |err| <= rel * max|ref|.
# bf16 keeps 8 mantissa bits to fp16's 11 (OpenVINO keeps normalisations and softmax in fp32 and
# accumulates in fp32, but stores activations in bf16 between ops): measured 0.6-0.7% of max|ref|
# on the digits family, 3.0% on the adm-64 UNet with random weights and 3-7% on the tests' small
# random UNet (PyTorch's bf16 autocast: 1.8-2.5% there), AMD EPYC Zen 4, OpenVINO 2026. The gate
# catches a broken conversion (errors of order max|ref|); the trajectory figures say what bf16
# does to samples.
RELATIVE_TOL = {"fp16": 2e-2, "bf16": 1e-1}


def tolerance_for(precision: str) -> float | tuple[str, float] | None:
    """fp32: 1e-4 absolute; fp16, bf16: relative to max|ref|; int8: report only (None)."""
    if precision == "fp32":
        return FP32_TOL
    if precision in RELATIVE_TOL:
        return ("rel", RELATIVE_TOL[precision])
    return None


@dataclass
class ParityRow:
    """One component's agreement with the reference over all checked batches and timesteps."""

    artifact: str
    role: str
    precision: str
    batches: list[int]
    max_abs: float
    max_rel: float
    mean_abs: float
    ref_max: float
    tol: float | None
    passed: bool | None
    what: str = "onnxruntime-cpu vs pytorch fp32"
    # False when the engine or the reference gave NaN or inf: never a pass.
    finite: bool = True

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("max_abs", "max_rel", "mean_abs", "ref_max"):
            if not np.isfinite(d[k]):
                d[k] = None  # JSON has no NaN / inf
        return d


def fit_feeds(feeds: dict[str, np.ndarray], specs) -> dict[str, np.ndarray]:
    """`feeds` for an engine with these input specs: inputs it lacks dropped, and the guidance
    scales given as the first one alone to graphs exported before per-sample scales, which take
    one scalar (compare such a graph against the reference on the returned feeds)."""
    out = {}
    for k, v in feeds.items():
        if k in specs:
            scalar = k == "scale" and len(specs[k].shape) == 0
            out[k] = np.asarray(v.reshape(-1)[0], v.dtype) if scalar else v
    return out


def parity_inputs(role: str, model: nn.Module, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: x ~ N(0, 1), timesteps spread over 0..T-1, labels over the classes."""
    rng = np.random.default_rng(seed)
    size = model.image_size
    steps = model.spec.diffusion["diffusion_steps"]
    feeds = {
        "x": rng.standard_normal((batch, 3, size, size), dtype=np.float32),
        "t": np.linspace(0, steps - 1, batch).round().astype(np.int64)
        if batch > 1
        else np.array([rng.integers(0, steps)], np.int64),
    }
    if role == "upsampler":
        small = model.spec.low_res_size
        feeds["low_res"] = rng.uniform(-1, 1, (batch, 3, small, small)).astype(np.float32)
    classes = model.out_channels if role in ("classifier", "classifier_grad") else model.num_classes
    if classes is not None and role != "classifier":
        feeds["y"] = rng.integers(0, classes, batch).astype(np.int64)
    if role == "classifier_grad":
        feeds["scale"] = rng.uniform(0.5, 4.0, batch).astype(np.float32)
    return feeds


@torch.no_grad()
def reference_output(role: str, model: nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    if role == "unet":
        return model(t["x"], t["t"], t.get("y")).float().numpy()
    if role == "upsampler":
        return model(t["x"], t["t"], t["low_res"], t.get("y")).float().numpy()
    if role == "classifier":
        return model(t["x"], t["t"]).float().numpy()
    if role == "classifier_grad":
        return classifier_gradient(model)(t["x"], t["t"], t["y"], t["scale"]).float().numpy()
    raise ValueError(role)


def check_artifact(
    path: str | Path,
    role: str,
    model: nn.Module,
    *,
    precision: str = "fp32",
    batches: tuple[int, ...] = (1, 3),
    tol: float | tuple[str, float] | None = FP32_TOL,
    seed: int = 0,
    backend: str = "onnxruntime",
    batch: dict[str, int] | None = None,
) -> ParityRow:
    """Run the engine (through the runtime's `backend`) and the reference on the same inputs,
    for each batch.

    `tol`: an absolute tolerance, ("rel", r) for r * max|ref|, or None to report only. A
    non-finite output on either side fails the row (`finite` False), whatever `tol` says.
    """
    worst_abs = worst_rel = ref_max = 0.0
    sum_abs, count = 0.0, 0
    finite = True
    options = {"batch": batch} if batch is not None and backend == "tensorrt" else {}
    if backend == "openvino":  # the arithmetic the runtime compiles the artefact with
        options["precision"] = "bf16" if precision == "bf16" else "fp32"
    with open_backend(path, backend, **options) as engine:
        for i, b in enumerate(batches):
            feeds = parity_inputs(role, model, b, seed + i)
            feeds = fit_feeds(feeds, engine.inputs)
            got = next(iter(engine(feeds).values())).astype(np.float64)
            want = reference_output(role, model, feeds).astype(np.float64)
            if not (np.isfinite(got).all() and np.isfinite(want).all()):
                finite = False
            with np.errstate(invalid="ignore", over="ignore"):  # non-finite: recorded below
                err = np.abs(got - want)
                rel = err / (np.abs(want) + 1e-6)
            worst_abs = max(worst_abs, float(err.max()))
            worst_rel = max(worst_rel, float(rel.max()))
            ref_max = max(ref_max, float(np.abs(want).max()))
            sum_abs += float(err.sum())
            count += err.size
    if not finite:
        worst_abs = worst_rel = float("nan")
    abs_tol = tol[1] * ref_max if isinstance(tol, tuple) else tol
    passed = None if abs_tol is None else bool(worst_abs <= abs_tol)
    return ParityRow(
        artifact=Path(path).name,
        role=role,
        precision=precision,
        batches=list(batches),
        max_abs=worst_abs,
        max_rel=worst_rel,
        mean_abs=sum_abs / max(count, 1),
        ref_max=ref_max,
        tol=abs_tol,
        passed=False if not finite else passed,
        what=f"{_WHAT.get(backend, backend)} vs pytorch fp32",
        finite=finite,
    )


_WHAT = {"onnxruntime": "onnxruntime-cpu", "openvino": "openvino-cpu"}


def format_table(rows: list[ParityRow]) -> str:
    head = f"{'artifact':<28} {'role':<16} {'prec':<5} {'max abs':>10} {'max rel':>10} {'mean abs':>10} {'|ref| max':>10} {'tol':>8}  pass"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.artifact:<28} {r.role:<16} {r.precision:<5} {_num(r.max_abs, '.2e'):>10} "
            f"{_num(r.max_rel, '.2e'):>10} {_num(r.mean_abs, '.2e'):>10} {_num(r.ref_max, '.3g'):>10} "
            f"{_fmt_tol(r.tol):>8}  {_fmt_pass(r.passed)}"
        )
    return "\n".join(lines)


def _num(v: float | None, fmt: str) -> str:
    return "non-finite" if v is None or not np.isfinite(v) else format(v, fmt)


def _fmt_tol(tol: float | None) -> str:
    return "-" if tol is None else f"{tol:.0e}"


def _fmt_pass(passed: bool | None) -> str:
    return "-" if passed is None else ("yes" if passed else "NO")
