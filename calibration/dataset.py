"""The calibration set: every component's inputs along real guided trajectories, in shards.

    record_calibration_set("build/", samples=16, steps="ddim25")  # gdexport calibrate -o build/
    cal = CalibrationSet.load("build/")
    for feeds in cal.feeds("unet"): ...  # {"x": (B, 3, H, W) float32, "t": (B,) int64, "y": ...}

The build's fp32 ONNX Runtime pipeline samples exactly as users do (DDIM, eta 0, the respacing they
sample with, the manifest's guidance scale); each engine is wrapped in a recorder that copies the
feeds of every call. Every trajectory visits every respaced step once, so the set is balanced over
timesteps by construction: each step holds one call per shard and component.

Layout of BUILD/calibration/:

    index.json          the recording settings and, per shard, its sample range and sha256
    shard-00000.npz     samples [0, shard_size): "unet/x" (K, B, 3, H, W), "unet/t" (K, B),
                        "unet/y" (K, B), "classifier_grad/..." and "upsampler/..." likewise,
                        one row per engine call in call order (K steps of the stage)

A shard is written to a temporary file and renamed, then the index is rewritten, also atomically.
An interrupted run resumes: shards in the index whose sha256 matches are kept, a missing or
corrupt one is recorded again (sample j's noise depends only on (seed, j), so it is the same).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.manifest import Manifest, sha256_of, write_bytes_atomic, write_json_atomic
from runtime.progress import progress_bar
from runtime.roles import ENGINE_ROLES as ROLES
from runtime.schedule import make_schedule

CALIBRATION_DIR = "calibration"
INDEX_NAME = "index.json"
FORMAT = "gdexport-calibration"
VERSION = 1
# Engine roles whose feeds are recorded, in the order the pipeline calls them.


class CalibrationError(RuntimeError):
    """A calibration set that cannot be recorded or used; the message says what to do."""


@dataclass
class ShardInfo:
    """One shard: samples [first, first + samples), its sha256 and engine calls per role."""

    file: str
    first: int
    samples: int
    sha256: str
    calls: dict[str, int]


@dataclass
class CalibrationConfig:
    """What a calibration set was recorded with; a resumed run must ask for the same."""

    steps: str
    upsampler_steps: str | None
    seed: int
    scale: float
    shard_size: int
    sampler: str = "ddim"
    eta: float = 0.0
    labels: str = "j mod num_classes"
    # the manifest's SDEdit start of the upsampler stage (fewer upsampler steps when set)
    upsampler_start_t: int | None = None
    # sha256 of the fp32 graph per role: a re-exported build makes the set stale.
    graphs: dict[str, str] = field(default_factory=dict)


class _Recorder:
    """A backend that copies the feeds of every call before passing them on (Backend protocol)."""

    def __init__(self, backend, on_call: Callable[[], None] | None = None):
        self.backend = backend
        self.inputs = backend.inputs
        self.outputs = backend.outputs
        self.calls: list[dict[str, np.ndarray]] = []
        self._on_call = on_call

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The sampler owns x and reuses the feeds dict: copy, never keep references.
        self.calls.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        out = self.backend(feeds)
        if self._on_call is not None:
            self._on_call()
        return out

    def close(self) -> None:
        self.backend.close()


def calibration_dir(build: str | Path) -> Path:
    return Path(build) / CALIBRATION_DIR


def _write_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


@dataclass
class _Index:
    config: CalibrationConfig
    samples: int  # the number of samples asked for; shards may still be missing
    shards: list[ShardInfo]


def _read_index(folder: Path) -> _Index | None:
    import json

    path = folder / INDEX_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
        index = _Index(
            CalibrationConfig(**data["config"]),
            int(data["samples"]),
            [ShardInfo(**s) for s in data["shards"]],
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CalibrationError(
            f"{path} is not a readable {FORMAT} index ({e}); record the set again with "
            f"`gdexport calibrate -o {folder.parent} --restart`"
        ) from None
    return index


def _write_index(folder: Path, index: _Index) -> None:
    data = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(index.config),
        "samples": index.samples,
        "shards": [asdict(s) for s in sorted(index.shards, key=lambda s: s.first)],
    }
    write_json_atomic(folder / INDEX_NAME, data)


def _shard_ok(folder: Path, shard: ShardInfo) -> bool:
    path = folder / shard.file
    return path.is_file() and sha256_of(path) == shard.sha256


class CalibrationSet:
    """The verified shards of BUILD/calibration/, read one shard at a time."""

    def __init__(self, folder: Path, config: CalibrationConfig, shards: list[ShardInfo]):
        self.folder = folder
        self.config = config
        self.shards = sorted(shards, key=lambda s: s.first)

    @classmethod
    def load(cls, build: str | Path, *, verify: bool = True) -> CalibrationSet:
        """The set in BUILD/calibration/; with `verify`, every shard's sha256 is checked."""
        folder = calibration_dir(build)
        index = _read_index(folder)
        if index is None or not index.shards:
            raise CalibrationError(
                f"no calibration set in {folder}: record one with `gdexport calibrate -o {build}`"
            )
        shards = [s for s in index.shards if s.first < index.samples]
        recorded = sum(s.samples for s in shards)
        if recorded < index.samples:
            raise CalibrationError(
                f"the calibration set in {folder} is incomplete ({recorded} of {index.samples} "
                f"samples recorded; interrupted?): run `gdexport calibrate -o {build}` to finish it"
            )
        if verify:
            bad = [s.file for s in shards if not _shard_ok(folder, s)]
            if bad:
                raise CalibrationError(
                    f"calibration shard(s) {', '.join(bad)} in {folder} are missing or do not match "
                    f"their sha256 in {INDEX_NAME} (an interrupted or corrupted write): run "
                    f"`gdexport calibrate -o {build}` again to record them anew"
                )
        return cls(folder, index.config, shards)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def calls(self, role: str) -> int:
        """Engine calls recorded for `role` over all shards (0 if the role was never called)."""
        return sum(s.calls.get(role, 0) for s in self.shards)

    @property
    def roles(self) -> list[str]:
        return [r for r in ROLES if self.calls(r)]

    def shard_arrays(self, shard: ShardInfo, role: str) -> dict[str, np.ndarray]:
        """{input name: (calls, ...) array} of one role in one shard."""
        prefix = f"{role}/"
        with np.load(self.folder / shard.file, allow_pickle=False) as f:
            return {k[len(prefix) :]: f[k] for k in f.files if k.startswith(prefix)}

    def feeds(self, role: str) -> Iterator[dict[str, np.ndarray]]:
        """Every recorded call of `role`, in shard order then call order, as a feeds dict."""
        for shard in self.shards:
            if not shard.calls.get(role):
                continue
            arrays = self.shard_arrays(shard, role)
            for c in range(shard.calls[role]):
                yield {k: np.array(v[c]) for k, v in arrays.items()}


def _stack_calls(role: str, calls: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not calls:
        return {}
    return {f"{role}/{name}": np.stack([c[name] for c in calls]) for name in calls[0]}


def _record_shard(pipe, first: int, n: int, config: CalibrationConfig, tick) -> tuple[dict, dict]:
    """Sample [first, first + n) through recorders; returns (npz arrays, calls per role)."""
    recorders: dict[str, _Recorder] = {}

    def record(role, backend):
        recorders[role] = _Recorder(backend, tick if role != "classifier_grad" else None)
        return recorders[role]

    n_classes = pipe.num_classes
    labels = None if n_classes is None else np.arange(first, first + n) % n_classes
    with pipe.wrapped_engines(record):
        pipe.sample(
            labels, num_samples=n, batch=n, scale=config.scale, steps=config.steps,
            sampler=config.sampler, eta=config.eta, seed=config.seed, first_index=first,
            upsampler_steps=config.upsampler_steps,
        )  # fmt: skip
    arrays: dict[str, np.ndarray] = {}
    for role, rec in recorders.items():
        arrays.update(_stack_calls(role, rec.calls))
    return arrays, {role: len(rec.calls) for role, rec in recorders.items() if rec.calls}


DEFAULTS = {"samples": 16, "steps": "ddim25", "seed": 0, "shard_size": 4}


def record_calibration_set(
    build: str | Path,
    *,
    samples: int | None = None,
    steps: str | None = None,
    upsampler_steps: str | None = None,
    seed: int | None = None,
    scale: float | None = None,
    shard_size: int | None = None,
    restart: bool = False,
    progress: bool | None = None,
    backend_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> CalibrationSet:
    """Record, complete or reuse the calibration set in BUILD/calibration/; returns it verified.

    `samples` N records samples [0, N), sample j with label j mod classes and the pipeline's
    noise for (seed, j); `steps`/`upsampler_steps`: the respacing users sample with (the
    upsampler's defaults to `steps`); `scale`: guidance scale (default: the manifest's);
    `shard_size`: samples per shard and per engine call (at most the engines' batch maximum).
    A setting left None is the existing set's, else `DEFAULTS` (the scale: always the
    manifest's, so a set recorded at another scale than users sample with is found stale).
    Complete shards recorded with the same settings are kept, missing and corrupt ones
    recorded; `restart` discards the set (settings not given: the defaults).
    """
    from runtime.pipeline import Pipeline

    build = Path(build)
    manifest = Manifest.load(build)
    folder = calibration_dir(build)
    index = None if restart else _read_index(folder)
    old = index.config if index is not None else None
    samples = samples or (index.samples if index is not None else DEFAULTS["samples"])
    steps = steps or (old.steps if old else DEFAULTS["steps"])
    upsampler_steps = upsampler_steps or (old.upsampler_steps if old else None)
    seed = seed if seed is not None else (old.seed if old else DEFAULTS["seed"])
    shard_size = shard_size or (old.shard_size if old else DEFAULTS["shard_size"])
    if samples < 1 or shard_size < 1:
        raise CalibrationError(
            f"--samples and the shard size must be >= 1 (got {samples}, {shard_size})"
        )
    wanted = [(lo, min(shard_size, samples - lo)) for lo in range(0, samples, shard_size)]
    with Pipeline.from_manifest(
        build, precision="fp32", backend="onnxruntime", backend_options=backend_options
    ) as pipe:
        config = _config_for(pipe, manifest, steps, upsampler_steps, seed, scale, shard_size)
        if index is not None and old != config:
            raise CalibrationError(_mismatch(build, old, config))
        # Settings are valid: only now touch the folder.
        if restart and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(exist_ok=True)
        for leftover in folder.glob(".*.tmp"):  # an interrupted shard write
            leftover.unlink()
        kept: dict[int, ShardInfo] = {}
        if index is not None:
            for s in index.shards:
                if _shard_ok(folder, s):
                    kept[s.first] = s
                else:
                    log(
                        f"calibration shard {s.file} is missing or corrupt (sha256): recording it again"
                    )
        index = _Index(config, samples, list(kept.values()))
        todo = [(lo, n) for lo, n in wanted if lo not in kept or kept[lo].samples != n]
        if len(todo) < len(wanted):
            log(f"calibration: keeping {len(wanted) - len(todo)} complete shard(s) in {folder}")
        _write_index(folder, index)
        if todo:
            per_shard = _steps_per_shard(pipe, config)
            with progress_bar(per_shard * len(todo), "calibration steps", enabled=progress) as bar:
                for done, (lo, n) in enumerate(todo, start=1):
                    arrays, calls = _record_shard(pipe, lo, n, config, bar.update)
                    # the upsampler may start late (SDEdit): the true count
                    per_shard = calls.get("unet", 0) + calls.get("upsampler", 0)
                    bar.total = bar.done + per_shard * (len(todo) - done)
                    name = f"shard-{lo // shard_size:05d}.npz"
                    _write_npz_atomic(folder / name, arrays)
                    kept[lo] = ShardInfo(name, lo, n, sha256_of(folder / name), calls)
                    index.shards = list(kept.values())
                    _write_index(folder, index)
    return CalibrationSet(folder, config, [kept[lo] for lo, _ in wanted])


def _config_for(pipe, manifest, steps, upsampler_steps, seed, scale, shard_size):
    if pipe.unet_artifact.precision != "fp32":
        raise CalibrationError(
            f"calibration runs the build's fp32 graphs, but {manifest.folder} has no fp32 UNet "
            f"graph for ONNX Runtime; export the build again (`gdexport export`)"
        )
    if shard_size > pipe.batch_max:
        raise CalibrationError(
            f"shard size {shard_size} exceeds the engines' batch maximum {pipe.batch_max}; "
            f"use a shard size of at most {pipe.batch_max}"
        )
    if scale is None:
        scale = pipe.default_scale
    graphs = {
        role: art.sha256
        for role, art in (
            ("unet", pipe.unet_artifact),
            ("classifier_grad", pipe.classifier_artifact),
            ("upsampler", pipe.upsampler_artifact),
        )
        if art is not None
    }
    up = start = None
    if pipe.has_upsampler:
        up = str(upsampler_steps or steps)
        start = manifest.sampling.get("upsampler_start_t") or None
    return CalibrationConfig(
        steps=str(steps), upsampler_steps=up, seed=int(seed), scale=float(scale),
        shard_size=int(shard_size), graphs=graphs, upsampler_start_t=start,
    )  # fmt: skip


def _steps_per_shard(pipe, config: CalibrationConfig) -> int:
    d = pipe.base["diffusion"]
    k = make_schedule(d["noise_schedule"], d["diffusion_steps"], config.steps).num_timesteps
    if pipe.has_upsampler:
        u = pipe.upsampler_info["diffusion"]
        k += make_schedule(
            u["noise_schedule"], u["diffusion_steps"], config.upsampler_steps
        ).num_timesteps
    return k


def _mismatch(build: Path, old: CalibrationConfig, new: CalibrationConfig) -> str:
    a, b = asdict(old), asdict(new)
    diffs = [f"{k} {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]
    if "graphs" in [k for k in a if a[k] != b[k]]:
        diffs = [d for d in diffs if not d.startswith("graphs")] + [
            "graphs: the build's fp32 graphs changed since (re-exported)"
        ]
    return (
        f"the calibration set in {calibration_dir(build)} was recorded with other settings "
        f"({'; '.join(diffs)}); record it anew with `gdexport calibrate -o {build} --restart` "
        f"(plus the settings you want)"
    )
