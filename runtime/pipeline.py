"""`Pipeline`: the guided sampling loop over a build's engines, base model then upsampler.

    with Pipeline.from_manifest("build/") as pipe:
        result = pipe.sample([1, 2, 3], scale=4.0, steps="ddim25", seed=0)
        result.images  # (3, H, W, 3) uint8

numpy and one backend; no global state: construct one per thread. Randomness is per sample: sample
j of a run with seed s draws its initial noise, its step noise and (when not given) its label from
its own generator seeded (s, j), so results do not depend on the batch size or on sharding.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import Backend, BackendError, open_backend
from runtime.images import resize_bilinear, to_uint8
from runtime.manifest import Artifact, Manifest, ManifestError
from runtime.sampling import NonFiniteError, sample_ddim, sample_ddpm
from runtime.schedule import make_schedule, truncate

SAMPLERS = ("ddim", "ddpm")
# Separate generator streams per sample, so adding a stage never shifts another's noise.
_STREAM_BASE, _STREAM_LABEL, _STREAM_UP = 0, 1, 2


class SamplingError(ValueError):
    """Bad sampling arguments; the message says what was wrong and how to fix it."""


@dataclass
class SampleResult:
    """`images` (N, H, W, C) uint8 final samples (upsampled in a cascade), `labels` (N,) int64 or
    None, `base_images` the base stage's uint8 samples in a cascade, `x` the final float32
    (N, C, H, W) samples in [-1, 1], `timings` seconds per stage and in engine calls."""

    images: np.ndarray
    labels: np.ndarray | None
    x: np.ndarray
    base_images: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    trajectory: dict[str, np.ndarray] | None = None


class _Timed:
    """Wraps a backend call and accumulates its wall time (for the loop-overhead figure)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, feeds):
        t0 = time.perf_counter()
        out = self.backend(feeds)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


@dataclass
class _Plan:
    """A sampling run's checked arguments (see `Pipeline.sample`)."""

    labels: np.ndarray | None
    up_labels: np.ndarray | None
    n: int
    batch: int
    scale: float
    sampler: str
    eta: float
    seed: int
    first: int
    schedule: Any
    shape: tuple[int, int, int]
    init_noise: np.ndarray | None
    step_noise: np.ndarray | None
    up_schedule: Any
    up_start_t: int | None
    grayscale: bool


def _count(name: str, value, *, minimum: int = 1) -> int:
    """An integer argument >= minimum; floats, bools and strings are refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SamplingError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise SamplingError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _finite(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SamplingError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return v


def _int_labels(labels) -> np.ndarray:
    """(N,) int64 class ids; refuses empty, non-integer (e.g. 1.5 or 2.0) and non-1-D labels."""
    a = np.asarray(labels)
    if a.size == 0:
        raise SamplingError("labels is empty: give at least one class id, or num_samples instead")
    if a.dtype.kind not in "iu":
        raise SamplingError(
            f"labels must be integer class ids, got {a.dtype} values such as {a.reshape(-1)[0]!r}: "
            f"pass ints (a float label is refused rather than truncated)"
        )
    if a.ndim > 1:
        raise SamplingError(f"labels must be one class id per sample (1-D), got shape {a.shape}")
    return a.astype(np.int64).reshape(-1)


def _sample_rngs(seed: int, indices: Sequence[int], stream: int) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, j, stream]) for j in indices]


def _stacked_normal(rngs: list[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """One standard-normal draw per sample generator, stacked to (B, *shape) float32."""
    out = np.empty((len(rngs), *shape), np.float32)
    for b, r in enumerate(rngs):
        out[b] = r.standard_normal(shape, dtype=np.float32)
    return out


class Pipeline:
    """The engines of one build (UNet, optional classifier gradient, optional upsampler)."""

    def __init__(
        self,
        manifest: Manifest,
        unet: tuple[Artifact, Backend],
        classifier: tuple[Artifact, Backend] | None = None,
        upsampler: tuple[Artifact, Backend] | None = None,
    ):
        self.manifest = manifest
        self.unet_artifact, self._unet = unet[0], _Timed(unet[1])
        self.classifier_artifact, self._clf = (
            (classifier[0], _Timed(classifier[1])) if classifier else (None, None)
        )
        self.upsampler_artifact, self._up = (
            (upsampler[0], _Timed(upsampler[1])) if upsampler else (None, None)
        )
        comps = manifest.components
        self.base = comps["unet"]
        self.classifier_info = comps.get("classifier") if classifier else None
        self.upsampler_info = comps.get("upsampler") if upsampler else None
        # (backend running the build's ONNX graphs, why): set by `from_manifest`.
        self.backend_choice: tuple[str, str] = ("onnxruntime", "the default")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_manifest(
        cls,
        path: str | Path | Manifest,
        *,
        engine: str | Path | None = None,
        classifier: str | Path | bool | None = None,
        upsampler: str | Path | bool | None = None,
        precision: str | None = None,
        backend: str | None = None,
        backend_options: dict[str, Any] | None = None,
    ) -> Pipeline:
        """Open a build. `path`: the build folder, its manifest, or an engine file in it.

        `engine`/`classifier`/`upsampler`: a file of the build, False to leave that stage out, or
        None for the build's own artefact of the same precision and backend as the UNet engine.
        Every file is checked against the manifest's sha256 before it is loaded.
        """
        if isinstance(path, Manifest):
            manifest, path = path, path.folder
        else:
            manifest = Manifest.load(engine or path)
        if "unet" not in manifest.components:
            raise ManifestError(f"the build in {manifest.folder} has no UNet; export one first")
        if engine is None and not Path(path).is_dir() and Path(path).name != "manifest.json":
            engine = path
        prefer = _backend_kind(backend) or _preferred_backend()
        unet_art = (
            manifest.artifact_for_file(engine)
            if engine is not None
            else manifest.artifact("unet", precision, prefer)
            or manifest.artifact("unet", precision, _backend_kind(backend))
            or manifest.artifact("unet", precision, "onnxruntime")  # OpenVINO runs ONNX too
            or manifest.artifact("unet", precision)
            or manifest.artifact("unet")
        )
        if unet_art.role != "unet":
            raise ManifestError(f"{unet_art.file} is a {unet_art.role} engine, not the UNet")
        # The CPU backend for ONNX graphs: the one asked for, else the build's timed choice
        # when it was timed on this CPU, else ONNX Runtime.
        choice = (backend, "asked for") if backend else ("onnxruntime", "the default")
        if backend is None and unet_art.backend == "onnxruntime":
            choice = _recorded_choice(manifest, unet_art.precision) or choice
        runs_onnx = choice[0]

        def pick(role: str, given) -> Artifact | None:
            if given is False:
                return None
            if given not in (None, True):
                art = manifest.artifact_for_file(given)
                if art.role != role:
                    raise ManifestError(f"{art.file} is a {art.role} engine, not a {role}")
                return art
            return manifest.nearest(role, unet_art.precision, unet_art.backend)

        clf_art = pick("classifier_grad", classifier)
        up_art = pick("upsampler", upsampler)
        if classifier not in (None, False, True) and clf_art is None:
            raise ManifestError("no classifier engine in this build")
        opened: list[Backend] = []
        try:

            def open_(art: Artifact) -> tuple[Artifact, Backend]:
                path = manifest.verify(art)
                name = (
                    runs_onnx
                    if art.backend == "onnxruntime" and runs_onnx != "tensorrt"
                    else art.backend
                )
                options = dict(backend_options or {})
                if name == "openvino":
                    if "providers" in options:
                        raise BackendError(
                            "execution providers are ONNX Runtime's: drop --providers, or use "
                            "--backend onnxruntime"
                        )
                    options.setdefault("precision", "bf16" if art.precision == "bf16" else "fp32")
                    if manifest.staging is None:
                        options.setdefault("cache_dir", _ov_cache_dir(manifest.folder))
                if name == "onnxruntime" and art.precision == "int8":
                    _check_int8_weights(manifest, art)
                if art.extra.get("ort_optimized") and (name or art.backend) == "onnxruntime":
                    options.setdefault("ort_optimized", art.extra["ort_optimized"])
                b = open_backend(path, name, batch=art.batch, **options)
                opened.append(b)
                return art, b

            pipe = cls(
                manifest,
                open_(unet_art),
                open_(clf_art) if clf_art else None,
                open_(up_art) if up_art else None,
            )
            pipe.backend_choice = choice
            return pipe
        except BaseException:
            for b in opened:
                b.close()
            raise

    def close(self) -> None:
        for t in (self._unet, self._clf, self._up):
            if t is not None:
                t.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- properties -----------------------------------------------------------------------------

    @property
    def num_classes(self) -> int | None:
        """Classes the labels index: the UNet's if class-conditional, else the classifier's."""
        n = self.base.get("num_classes")
        if n is None and self.classifier_info is not None:
            n = self.classifier_info.get("num_classes")
        return n

    @property
    def batch_max(self) -> int:
        arts = [
            a for a in (self.unet_artifact, self.classifier_artifact, self.upsampler_artifact) if a
        ]
        return min(a.batch["max"] for a in arts)

    @property
    def has_classifier(self) -> bool:
        return self._clf is not None

    @property
    def has_upsampler(self) -> bool:
        return self._up is not None

    @property
    def default_scale(self) -> float:
        """The manifest's guidance scale where there is a classifier, else 0 (unguided)."""
        return float(self.manifest.sampling.get("scale") or 0.0) if self._clf is not None else 0.0

    def engine(self, role: str) -> Backend | None:
        """The backend running a role ("unet", "classifier_grad", "upsampler"), None if absent."""
        timed = {"unet": self._unet, "classifier_grad": self._clf, "upsampler": self._up}[role]
        return None if timed is None else timed.backend

    @contextmanager
    def wrapped_engines(self, wrap: Callable[[str, Backend], Backend]) -> Iterator[None]:
        """Within the block, every engine call goes through `wrap(role, backend)` (a Backend,
        e.g. one recording its feeds for calibration, or one perturbing outputs in a test);
        the engines are restored after."""
        timed = {"unet": self._unet, "classifier_grad": self._clf, "upsampler": self._up}
        saved = {role: t.backend for role, t in timed.items() if t is not None}
        try:
            for role, backend in saved.items():
                timed[role].backend = wrap(role, backend)
            yield
        finally:
            for role, backend in saved.items():
                timed[role].backend = backend

    # -- model callables ------------------------------------------------------------------------

    def unet_fn(self, y: np.ndarray | None) -> Callable:
        """eps_fn(x, t) over the UNet engine (labels `y` (B,) int64 where it is conditional)."""
        wants_y = "y" in self._unet.backend.inputs
        feeds: dict[str, np.ndarray] = {}
        if wants_y:
            feeds["y"] = y

        def call(x, t):
            feeds["x"], feeds["t"] = x, t
            return self._unet(feeds)["out"]

        return call

    def grad_fn(self, y: np.ndarray, scale: float) -> Callable:
        """grad_fn(x, t) = scale * d log p(y | x_t) / d x_t over the classifier gradient engine."""
        # Graphs exported since the Triton work take one scale per sample; older ones a scalar.
        per_sample = len(self._clf.backend.inputs["scale"].shape) == 1
        s = np.full(len(y), scale, np.float32) if per_sample else np.asarray(scale, np.float32)
        feeds = {"y": y, "scale": s}

        def call(x, t):
            feeds["x"], feeds["t"] = x, t
            return self._clf(feeds)["grad"]

        return call

    def upsampler_fn(self, low_res: np.ndarray, y: np.ndarray | None) -> Callable:
        """eps_fn(x, t) over the upsampler engine, conditioned on `low_res` (B, 3, h, w)."""
        feeds = {"low_res": low_res}
        if "y" in self._up.backend.inputs:
            feeds["y"] = y

        def call(x, t):
            feeds["x"], feeds["t"] = x, t
            return self._up(feeds)["out"]

        return call

    # -- sampling -------------------------------------------------------------------------------

    def resolve_labels(
        self,
        labels: Sequence[int] | np.ndarray | None,
        num_samples: int | None,
        seed: int,
        first: int,
    ) -> tuple[np.ndarray | None, int]:
        """(labels (N,) int64 or None, N): the given labels checked, or `num_samples` labels
        drawn per sample (seed, index) where the build has classes."""
        n_classes = self.num_classes
        if num_samples is not None:
            num_samples = _count("num_samples", num_samples)
        if labels is not None:
            labels = _int_labels(labels)
            if num_samples is not None and num_samples != len(labels):
                if len(labels) == 1:
                    labels = np.repeat(labels, num_samples)
                else:
                    raise SamplingError(f"{len(labels)} labels given for {num_samples} samples")
            if n_classes is None:
                raise SamplingError(
                    "labels given, but neither the model nor a classifier has classes"
                )
            bad = labels[(labels < 0) | (labels >= n_classes)]
            if bad.size:
                raise SamplingError(
                    f"class {int(bad[0])} is out of range: this build has classes 0..{n_classes - 1}"
                )
            return labels, len(labels)
        if num_samples is None:
            raise SamplingError("give labels or a positive number of samples")
        if n_classes is None:
            return None, num_samples
        return self._drawn_labels(n_classes, seed, first, num_samples), num_samples

    @staticmethod
    def _drawn_labels(n_classes: int, seed: int, first: int, n: int) -> np.ndarray:
        rngs = _sample_rngs(seed, range(first, first + n), _STREAM_LABEL)
        return np.array([r.integers(0, n_classes) for r in rngs], np.int64)

    def sample(
        self,
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        num_samples: int | None = None,
        batch: int | None = None,
        scale: float | None = None,
        steps: str | int | None = None,
        sampler: str = "ddim",
        eta: float = 0.0,
        seed: int = 0,
        first_index: int = 0,
        init_noise: np.ndarray | None = None,
        step_noise: np.ndarray | None = None,
        upsample: bool = True,
        upsampler_steps: str | int | None = None,
        upsampler_start_t: int | None = None,
        save_trajectory: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> SampleResult:
        """Sample; returns uint8 NHWC images (upsampled when the build has an upsampler).

        `labels` (N,) class ids, or `num_samples` with labels drawn per sample; `scale` guidance
        (default: the manifest's, 0 = unguided); `steps` a respacing spec ("ddim25", "25", "250");
        `init_noise` (N, C, H, W) and `step_noise` (K, N, C, H, W) reproduce a base trajectory.
        `upsampler_start_t` (default: the manifest's; 0 = the whole chain from noise) starts the
        upsampler at that timestep from its bilinear input noised to that level (SDEdit).
        A class-conditional upsampler over an unconditional base gets labels drawn per sample
        (returned in `labels`) when none are given.
        """
        plan = self._plan(
            labels, num_samples, batch, scale, steps, sampler, eta, seed, first_index,
            init_noise, step_noise, upsample, upsampler_steps, upsampler_start_t,
        )  # fmt: skip
        t_start = time.perf_counter()
        engine_s0 = self._engine_seconds()
        base_out, up_out, trajs = [], [], []
        for lo in range(0, plan.n, plan.batch):
            hi = min(lo + plan.batch, plan.n)
            base, up, traj = self._sample_batch(plan, lo, hi, save_trajectory)
            base_out.append(base)
            up_out.append(up)
            trajs.append(traj)
            if progress:
                progress(hi, plan.n)
        base_x = np.concatenate(base_out)
        final_x = np.concatenate(up_out) if plan.up_schedule is not None else base_x
        total = time.perf_counter() - t_start
        engine = self._engine_seconds() - engine_s0
        trajectory = None
        if save_trajectory:
            trajectory = {
                "x": np.concatenate([t[0] for t in trajs], axis=1),
                "pred_xstart": np.concatenate([t[1] for t in trajs], axis=1),
                "t": plan.schedule.timestep_map[::-1].copy(),
            }
        return SampleResult(
            images=to_uint8(final_x),
            labels=plan.labels,
            x=final_x,
            base_images=to_uint8(base_x) if plan.up_schedule is not None else None,
            timings={"total_s": total, "engine_s": engine, "overhead_s": total - engine},
            trajectory=trajectory,
        )

    def _engine_seconds(self) -> float:
        return sum(t.seconds for t in (self._unet, self._clf, self._up) if t)

    def _plan(
        self, labels, num_samples, batch, scale, steps, sampler, eta, seed, first_index,
        init_noise, step_noise, upsample, upsampler_steps, upsampler_start_t,
    ) -> _Plan:  # fmt: skip
        """Every argument checked, with the manifest's defaults filled in."""
        if sampler not in SAMPLERS:
            raise SamplingError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        seed = _count("seed", seed, minimum=0)
        first_index = _count("first_index", first_index, minimum=0)
        eta = _finite("eta", eta)
        if not 0.0 <= eta <= 1.0:
            raise SamplingError(
                f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like noise), got {eta}"
            )
        sampling = self.manifest.sampling
        scale = self.default_scale if scale is None else _finite("scale", scale)
        if scale < 0:
            raise SamplingError(
                f"guidance scale must be >= 0 (0 = unguided), got {scale}: a negative scale "
                f"steers samples away from their class"
            )
        if scale and self._clf is None:
            raise SamplingError(
                f"guidance scale {scale} needs a classifier: pass --classifier (the build's "
                f"classifier_grad engine) or use --scale 0"
            )
        labels, n = self.resolve_labels(labels, num_samples, seed, first_index)
        if scale and labels is None:
            raise SamplingError("classifier guidance needs labels")
        batch = min(n, self.batch_max) if batch is None else _count("batch", batch)
        if not 1 <= batch <= self.batch_max:
            raise SamplingError(f"batch {batch} is outside the engines' range 1..{self.batch_max}")
        steps = sampling.get("respacing") or "250" if steps is None else steps
        if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
            steps = str(_count("steps", steps, minimum=2))
        steps = str(steps)
        base_diff = self.base["diffusion"]
        try:
            schedule = make_schedule(
                base_diff["noise_schedule"], base_diff["diffusion_steps"], steps
            )
        except ValueError as e:
            raise SamplingError(f"--steps {steps!r}: {e}") from None
        shape = (3, self.base["image_size"], self.base["image_size"])
        if init_noise is not None and init_noise.shape != (n, *shape):
            raise SamplingError(f"init noise must have shape {(n, *shape)}, got {init_noise.shape}")
        k_steps = schedule.num_timesteps
        if step_noise is not None and step_noise.shape != (k_steps, n, *shape):
            raise SamplingError(
                f"step noise must have shape (steps, samples, C, H, W) = {(k_steps, n, *shape)}, "
                f"got {step_noise.shape}"
            )
        up_schedule = up_labels = None
        if upsample and self._up is not None:
            up_schedule, upsampler_start_t = self._upsampler_schedule(
                upsampler_steps or sampling.get("upsampler_respacing") or steps, upsampler_start_t
            )
            if "y" in self._up.backend.inputs:
                if labels is None:  # an unconditional base before a class-conditional upsampler
                    n_up = int(self.upsampler_info["num_classes"])
                    labels = self._drawn_labels(n_up, seed, first_index, n)
                elif self.upsampler_info.get("num_classes") is not None:
                    n_up = int(self.upsampler_info["num_classes"])
                    if labels.max() >= n_up:
                        raise SamplingError(
                            f"class {int(labels.max())} is out of the upsampler's range 0..{n_up - 1}"
                        )
                up_labels = labels
        return _Plan(
            labels=labels, up_labels=up_labels, n=n, batch=batch, scale=scale, sampler=sampler,
            eta=eta, seed=seed, first=first_index, schedule=schedule, shape=shape,
            init_noise=init_noise, step_noise=step_noise, up_schedule=up_schedule,
            up_start_t=upsampler_start_t, grayscale=bool(sampling.get("grayscale")),
        )  # fmt: skip

    def _sample_batch(self, plan: _Plan, lo: int, hi: int, save_trajectory: bool):
        """Samples [lo, hi) of the plan: (base x, upsampled x or None, (x_t, x0) or None)."""
        idx = range(plan.first + lo, plan.first + hi)
        y = None if plan.labels is None else np.ascontiguousarray(plan.labels[lo:hi])
        rngs = _sample_rngs(plan.seed, idx, _STREAM_BASE)
        if plan.init_noise is not None:
            x_T = plan.init_noise[lo:hi].astype(np.float32)
        else:
            x_T = _stacked_normal(rngs, plan.shape)
        if plan.step_noise is not None:
            noise: Any = np.ascontiguousarray(plan.step_noise[:, lo:hi], np.float32)
        else:
            noise = lambda k, shp, rngs=rngs: _stacked_normal(rngs, shp[1:])  # noqa: E731
        xs: list[np.ndarray] = []
        x0s: list[np.ndarray] = []

        def record(info):
            xs.append(info["x"].copy())
            x0s.append(info["pred_xstart"].copy())

        unet_y = y if "y" in self._unet.backend.inputs else None
        base = self._run_stage(
            "unet", plan.sampler, self.unet_fn(unet_y), x_T, plan.schedule, plan.eta, noise,
            record if save_trajectory else None,
            grad_fn=self.grad_fn(y, plan.scale) if plan.scale else None,
        )  # fmt: skip
        # A model trained on grey images replicated into RGB: its samples are projected back.
        if plan.grayscale:
            base = _to_grey(base)
        up = None
        if plan.up_schedule is not None:
            up_y = None if plan.up_labels is None else np.ascontiguousarray(plan.up_labels[lo:hi])
            up = self._upsample_batch(
                base, up_y, plan.up_schedule, plan.up_start_t, plan.sampler, plan.eta,
                plan.seed, idx,
            )  # fmt: skip
            if plan.grayscale:
                up = _to_grey(up)
        traj = (np.stack(xs), np.stack(x0s)) if save_trajectory else None
        return base, up, traj

    def _upsampler_schedule(self, steps, start_t):
        """The upsampler's respaced schedule, truncated at `start_t` (None: the manifest's)."""
        up_diff = self.upsampler_info["diffusion"]
        try:
            schedule = make_schedule(
                up_diff["noise_schedule"], up_diff["diffusion_steps"], str(steps)
            )
        except ValueError as e:
            raise SamplingError(f"upsampler steps {steps!r}: {e}") from None
        if start_t is None:
            start_t = self.manifest.sampling.get("upsampler_start_t")
        if start_t is not None:
            start_t = _count("upsampler_start_t", start_t, minimum=0)
            if start_t >= up_diff["diffusion_steps"]:
                raise SamplingError(
                    f"upsampler start timestep {start_t} is past the upsampler's "
                    f"{up_diff['diffusion_steps']} diffusion steps: use 0..{up_diff['diffusion_steps'] - 1} "
                    f"(0 = the whole chain from noise)"
                )
        if start_t:
            try:
                schedule = truncate(schedule, int(start_t))
            except ValueError as e:
                raise SamplingError(f"upsampler start: {e}") from None
        return schedule, start_t

    def _upsample_batch(self, low_res, y, schedule, start_t, sampler, eta, seed, idx):
        rngs = _sample_rngs(seed, idx, _STREAM_UP)
        size = self.upsampler_info["image_size"]
        x_T = _stacked_normal(rngs, (3, size, size))
        if start_t:
            # SDEdit: start at the last kept step from the bilinear input noised to that level.
            a = schedule.alphas_cumprod[-1]
            x_T = (
                np.sqrt(a) * resize_bilinear(low_res, (size, size)) + np.sqrt(1 - a) * x_T
            ).astype(np.float32)
        noise = lambda k, shp, rngs=rngs: _stacked_normal(rngs, shp[1:])  # noqa: E731
        return self._run_stage(
            "upsampler", sampler, self.upsampler_fn(low_res, y), x_T, schedule, eta, noise, None
        )

    def upsample(
        self,
        low_res: np.ndarray,
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        steps: str | int | None = None,
        start_t: int | None = None,
        sampler: str = "ddim",
        eta: float = 0.0,
        seed: int = 0,
        first_index: int = 0,
        batch: int | None = None,
    ) -> np.ndarray:
        """The upsampler stage alone: (N, 3, h, w) float32 low-res images in [-1, 1] ->
        (N, 3, H, W) float32 samples. `start_t` as in `sample`; labels for a class-conditional
        upsampler."""
        if self._up is None:
            raise SamplingError("this pipeline has no upsampler engine")
        low_res = np.ascontiguousarray(low_res, np.float32)
        small = self.upsampler_info.get("low_res_size")
        if (
            low_res.ndim != 4
            or low_res.shape[1] != 3
            or (small and low_res.shape[2:] != (small, small))
        ):
            raise SamplingError(f"low_res must be (N, 3, {small}, {small}), got {low_res.shape}")
        if sampler not in SAMPLERS:
            raise SamplingError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        wants_y = "y" in self._up.backend.inputs
        if wants_y and labels is None:
            raise SamplingError("this upsampler is class-conditional: pass labels")
        y_all = np.asarray(labels, np.int64) if wants_y else None
        schedule, start_t = self._upsampler_schedule(
            steps or self.manifest.sampling.get("upsampler_respacing") or "250", start_t
        )
        n = len(low_res)
        batch = batch or min(n, self.upsampler_artifact.batch["max"])
        out = []
        for lo in range(0, n, batch):
            hi = min(lo + batch, n)
            y = None if y_all is None else y_all[lo:hi]
            idx = range(first_index + lo, first_index + hi)
            out.append(
                self._upsample_batch(low_res[lo:hi], y, schedule, start_t, sampler, eta, seed, idx)
            )
        return np.concatenate(out)

    def _run_stage(
        self, component, sampler, model_fn, x_T, schedule, eta, noise, callback, grad_fn=None
    ):
        info = self.upsampler_info if component == "upsampler" else self.base
        learn_sigma = info["diffusion"]["learn_sigma"]
        try:
            if sampler == "ddim":
                needs_noise = eta > 0
                return sample_ddim(
                    model_fn, x_T, schedule, learn_sigma=learn_sigma, eta=eta, grad_fn=grad_fn,
                    noise=noise if needs_noise else None, callback=callback,
                )  # fmt: skip
            return sample_ddpm(
                model_fn, x_T, schedule, learn_sigma=learn_sigma, grad_fn=grad_fn,
                noise=noise, callback=callback,
            )  # fmt: skip
        except (NonFiniteError, BackendError) as e:
            e.args = (f"{component} stage: {e}",)
            raise


def _to_grey(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> the same shape with every channel set to the channel mean."""
    return np.repeat(x.mean(axis=1, keepdims=True), x.shape[1], axis=1).astype(np.float32)


def _preferred_backend() -> str:
    """TensorRT when its Python package is importable here, else ONNX Runtime."""
    import importlib.util

    return "tensorrt" if importlib.util.find_spec("tensorrt") is not None else "onnxruntime"


def _recorded_choice(manifest: Manifest, precision: str) -> tuple[str, str] | None:
    """The build's timed CPU backend for `precision` (manifest section "runtime"), when it was
    timed on this CPU and its package is installed here."""
    import importlib.util

    from runtime import cpu

    section = manifest.data.get("runtime") or {}
    pick = (section.get("choices") or {}).get(precision)
    if not pick or section.get("cpu") != cpu.identity():
        return None
    if importlib.util.find_spec(pick["backend"]) is None:
        return None
    return pick["backend"], f"the build's choice on this CPU: {pick['why']}"


def _ov_cache_dir(folder: Path) -> Path | None:
    """OpenVINO's compiled-model cache inside the build folder, where the folder is writable."""
    cache = Path(folder) / "openvino_cache"
    return cache if os.access(cache if cache.is_dir() else folder, os.W_OK) else None


def _check_int8_weights(manifest: Manifest, art: Artifact) -> None:
    """Refuse an 8-bit-weight int8 graph on ONNX Runtime on a CPU without an int8 dot-product
    unit: its 16-bit accumulators overflow and the images come out wrong, silently."""
    from runtime import cpu

    if (manifest.data.get("int8") or {}).get("weight_range") != "8-bit":
        return
    if cpu.int8_dot_product() is None:
        raise BackendError(
            f"{art.file} has 8-bit weights, which ONNX Runtime's int8 kernels overflow on this "
            f"CPU ({cpu.cpu_info()['model']}: no VNNI or AMX-INT8). Use --backend openvino, or "
            f"rebuild with `gdexport build --int8` on this machine (7-bit weights)"
        )


def _backend_kind(backend: str | None) -> str | None:
    return backend if backend in ("onnxruntime", "openvino", "tensorrt") else None
