"""`python -m runtime.sample --engine BUILD/unet.onnx --out samples/`: guided sampling from a build.

Writes a PNG grid, one PNG per sample and `samples.npz` (`arr_0` uint8 NHWC, `arr_1` labels: the
layout the guided-diffusion evaluator reads). Nothing is written when an argument is wrong; files
appear under their final names only once complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from runtime.backends import BackendError
from runtime.images import grid, png_bytes
from runtime.manifest import ManifestError, write_bytes_atomic
from runtime.pipeline import Pipeline, SamplingError
from runtime.sampling import NonFiniteError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m runtime.sample",
        description="Guided DDIM / DDPM sampling over a gdexport build (ONNX Runtime or TensorRT).",
    )
    p.add_argument(
        "--engine", required=True, help="the UNet engine (.onnx or .plan) or the build folder"
    )
    p.add_argument("--classifier", help="classifier_grad engine (default: the build's, if any)")
    p.add_argument("--no-classifier", action="store_true", help="sample unguided")
    p.add_argument("--upsampler", help="upsampler engine for the cascade (default: the build's)")
    p.add_argument("--no-upsampler", action="store_true", help="stop after the base stage")
    p.add_argument(
        "--scale", type=float, help="classifier guidance scale (default: the manifest's)"
    )
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--steps", help="respacing: 25, ddim25, 250, '10,5,3' (default: the manifest's)")
    p.add_argument("--upsampler-steps", help="respacing of the upsampler stage")
    p.add_argument("--upsampler-start-t", type=int,
                   help="start the upsampler from its noised bilinear input at this timestep "
                   "(default: the manifest's; 0 = the whole chain from noise)")  # fmt: skip
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--class", dest="class_", type=int, help="one class for every sample")
    g.add_argument("--classes", help="comma-separated class ids, one per sample")
    p.add_argument(
        "--num-samples", type=int, help="number of samples (default: 16, or one per --classes)"
    )
    p.add_argument("--batch", type=int, help="samples per engine call (default: as many as fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", help="I/N: this process takes the I-th of N equal seed ranges")
    p.add_argument("--init-noise", type=Path, help=".npy (N,C,H,W) initial noise")
    p.add_argument("--step-noise", type=Path, help=".npy (K,N,C,H,W) per-step noise")
    p.add_argument("--save-trajectory", type=Path, help=".npz of x_t and x0 prediction per step")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt"), help="default: from the file")
    p.add_argument("--providers", help="ONNX Runtime execution providers, comma-separated")
    p.add_argument(
        "--threads", type=int, help="ONNX Runtime intra-op threads (default: physical cores)"
    )
    p.add_argument("--out", type=Path, default=Path("samples"), help="output folder")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    return p.parse_args(argv)


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SamplingError(f"cannot read {what} {path}: {e}") from None


def _shard(text: str, num_samples: int) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SamplingError(f"--shard takes I/N like 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise SamplingError(f"--shard {text}: need 0 <= I < N")
    per = -(-num_samples // n)
    first = i * per
    return first, max(0, min(per, num_samples - first))


def _writable_out(out: Path) -> None:
    """Fail early on an output folder that cannot be made or written, creating nothing."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SamplingError(f"cannot write to output folder {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SamplingError(f"cannot write to output folder {out}: {probe} is not writable")


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def run(args: argparse.Namespace) -> dict:
    labels = None
    if args.classes:
        try:
            labels = [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise SamplingError(
                f"--classes takes comma-separated integers, got {args.classes!r}"
            ) from None
    num = args.num_samples or (len(labels) if labels else 16)
    if args.class_ is not None:
        labels = [args.class_] * num
    first = 0
    if args.shard:
        first, count = _shard(args.shard, num)
        num = count
        if labels is not None and len(labels) > 1:
            labels = labels[first : first + count]
    if num < 1:
        raise SamplingError(
            "nothing to sample: --num-samples must be positive (or the shard is empty)"
        )
    init = _load_npy(args.init_noise, "--init-noise") if args.init_noise else None
    step = _load_npy(args.step_noise, "--step-noise") if args.step_noise else None
    if args.scale and args.no_classifier:
        raise SamplingError("--scale with --no-classifier: guidance needs the classifier")
    _writable_out(args.out)
    if args.save_trajectory is not None:
        _writable_out(args.save_trajectory.parent)
    options = {}
    if args.providers:
        options["providers"] = args.providers.split(",")
    if args.threads:
        options["threads"] = args.threads
    t0 = time.perf_counter()
    with Pipeline.from_manifest(
        args.engine,
        classifier=False if args.no_classifier else args.classifier,
        upsampler=False if args.no_upsampler else args.upsampler,
        backend=args.backend,
        backend_options=options,
    ) as pipe:
        t_open = time.perf_counter() - t0
        progress = _progress_bar(num) if sys.stderr.isatty() and not args.json else None
        result = pipe.sample(
            labels,
            num_samples=num,
            batch=args.batch,
            scale=args.scale,
            steps=args.steps,
            sampler=args.sampler,
            eta=args.eta,
            seed=args.seed,
            first_index=first,
            init_noise=init,
            step_noise=step,
            upsampler_steps=args.upsampler_steps,
            upsampler_start_t=args.upsampler_start_t,
            save_trajectory=args.save_trajectory is not None,
            progress=progress,
        )
        engines = {"unet": pipe.unet_artifact.file}
        if pipe.classifier_artifact:
            engines["classifier"] = pipe.classifier_artifact.file
        if pipe.upsampler_artifact:
            engines["upsampler"] = pipe.upsampler_artifact.file
    shard = None
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        shard = {"shard": np.array([i, n], np.int64), "seed": np.array(args.seed, np.int64)}
    files = write_outputs(args.out, result, first, shard)
    if args.save_trajectory is not None:
        tr = result.trajectory
        args.save_trajectory.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(
            args.save_trajectory, _npz_bytes(x=tr["x"], pred_xstart=tr["pred_xstart"], t=tr["t"])
        )
        files.append(str(args.save_trajectory))
    return {
        "files": files,
        "num_samples": int(len(result.images)),
        "labels": None if result.labels is None else result.labels.tolist(),
        "engines": engines,
        "timings": {"open_s": t_open, **result.timings},
    }


def write_outputs(out: Path, result, first: int = 0, shard: dict | None = None) -> list[str]:
    """samples.npz, grid.png, one PNG per sample (and base_grid.png in a cascade).

    A shard's samples.npz also holds `shard` ([I, N]), `seed` and `indices` (the global sample
    indices), which `gdexport merge-samples` checks; the evaluator reads only arr_0 / arr_1."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    arrays = {"arr_0": result.images}
    if result.labels is not None:
        arrays["arr_1"] = result.labels
    if shard is not None:
        arrays.update(shard, indices=np.arange(first, first + len(result.images), dtype=np.int64))
    write_bytes_atomic(out / "samples.npz", _npz_bytes(**arrays))
    files.append(str(out / "samples.npz"))
    scale = max(1, 128 // result.images.shape[1])
    write_bytes_atomic(out / "grid.png", png_bytes(grid(result.images, scale=scale)))
    files.append(str(out / "grid.png"))
    if result.base_images is not None:
        bscale = max(1, 128 // result.base_images.shape[1])
        write_bytes_atomic(out / "base_grid.png", png_bytes(grid(result.base_images, scale=bscale)))
        files.append(str(out / "base_grid.png"))
    for j, img in enumerate(result.images):
        label = "" if result.labels is None else f"_class{int(result.labels[j])}"
        name = out / f"sample_{first + j:06d}{label}.png"
        write_bytes_atomic(name, png_bytes(img))
    files.append(str(out / "sample_*.png"))
    return files


def _progress_bar(total: int):
    start = time.perf_counter()

    def show(done: int, n: int) -> None:
        width = 30
        fill = int(width * done / n)
        rate = done / max(time.perf_counter() - start, 1e-9)
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{n} samples, {rate:.2f}/s")
        if done == n:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (SamplingError, ManifestError, BackendError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        t = summary["timings"]
        print(
            f"wrote {summary['num_samples']} samples to {args.out} ({', '.join(Path(f).name for f in summary['files'])})"
        )
        print(
            f"engines: {summary['engines']}; {t['total_s']:.2f} s sampling ({t['engine_s']:.2f} s in engines)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
