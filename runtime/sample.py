"""`python -m runtime.sample --engine BUILD/unet.onnx --out samples/`: guided sampling from a build.

Writes a PNG grid, one PNG per sample, `samples.npz` (`arr_0` uint8 NHWC, `arr_1` labels: the
layout the guided-diffusion evaluator reads) and `sample_run.json` (what was run). A run owns its
output folder: everything is written to a staging folder beside it and swapped in whole at the
end, so a folder never mixes two runs and a failed run (a bad argument, a full disk) leaves the
previous one untouched. A non-empty folder that is not an earlier run's output is refused
unless `--overwrite`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from runtime.backends import BackendError
from runtime.images import grid, png_bytes
from runtime.manifest import MANIFEST_NAME, ManifestError, write_bytes_atomic
from runtime.pipeline import Pipeline, SamplingError
from runtime.progress import progress_bar
from runtime.sampling import NonFiniteError

RUN_RECORD = "sample_run.json"


@click.command(
    name="python -m runtime.sample",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Guided DDIM / DDPM sampling over a gdexport build (ONNX Runtime or TensorRT).",
)
@click.option(
    "--engine", required=True, help="the UNet engine (.onnx or .plan) or the build folder"
)
@click.option("--classifier", help="classifier_grad engine (default: the build's, if any)")
@click.option("--no-classifier", is_flag=True, help="sample unguided")
@click.option("--upsampler", help="upsampler engine for the cascade (default: the build's)")
@click.option("--no-upsampler", is_flag=True, help="stop after the base stage")
@click.option(
    "--scale", type=float, help="classifier guidance scale >= 0 (default: the manifest's)"
)
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)
@click.option("--steps", help="respacing: 25, ddim25, 250, '10,5,3' (default: the manifest's)")
@click.option("--upsampler-steps", help="respacing of the upsampler stage")
@click.option(
    "--upsampler-start-t", type=int,
    help="start the upsampler from its noised bilinear input at this timestep (default: the "
    "manifest's; 0 = the whole chain from noise)",
)  # fmt: skip
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta in [0, 1]")
@click.option("--class", "class_", type=int, help="one class for every sample")
@click.option("--classes", help="comma-separated class ids, one per sample")
@click.option(
    "--num-samples", type=int, help="number of samples (default: 16, or one per --classes)"
)
@click.option("--batch", type=int, help="samples per engine call (default: as many as fit)")
@click.option("--seed", type=int, default=0, show_default=True, help="a non-negative integer")
@click.option("--shard", help="I/N: this process takes the I-th of N equal seed ranges")
@click.option("--init-noise", type=click.Path(path_type=Path), help=".npy (N,C,H,W) initial noise")
@click.option("--step-noise", type=click.Path(path_type=Path), help=".npy (K,N,C,H,W) step noise")
@click.option(
    "--save-trajectory", type=click.Path(path_type=Path),
    help=".npz file of x_t and the x0 prediction per step",
)  # fmt: skip
@click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "openvino", "tensorrt"]),
    help="default: from the file (openvino runs the build's ONNX graphs too)",
)
@click.option("--providers", help="ONNX Runtime execution providers, comma-separated")
@click.option("--threads", type=int, help="engine threads (default: physical cores)")
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("samples"), show_default=True,
    help="output folder (replaced whole by this run)",
)  # fmt: skip
@click.option(
    "--overwrite", is_flag=True, help="replace --out even if it holds files of something else"
)
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable summary")
def cli(**kw) -> None:
    summary = run(kw)
    if kw["as_json"]:
        click.echo(json.dumps(summary, indent=1))
        return
    t = summary["timings"]
    names = ", ".join(Path(f).name for f in summary["files"])
    click.echo(f"wrote {summary['num_samples']} samples to {kw['out']} ({names})")
    click.echo(
        f"engines: {summary['engines']}; {t['total_s']:.2f} s sampling "
        f"({t['engine_s']:.2f} s in engines)"
    )
    click.echo(
        f"ONNX graphs ran on {summary['backend']['onnx_graphs']} ({summary['backend']['why']})"
    )


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 for bad input, with the reason on stderr)."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except (SamplingError, ManifestError, BackendError, NonFiniteError) as e:
        click.echo(f"error: {e}", err=True)
        return 2
    return 0


# -- arguments ---------------------------------------------------------------------------------


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


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise SamplingError(f"{name} must be a positive integer, got {value}")


def _engine_path(text: str) -> Path:
    path = Path(text)
    if not path.exists() and not (path.parent / MANIFEST_NAME).is_file():
        raise SamplingError(
            f"--engine {text} does not exist: pass a build folder made by `gdexport build` "
            f"(or an engine file inside one)"
        )
    return path


def _check_writable(folder: Path, what: str) -> Path:
    """The nearest existing folder at or above `folder`, checked writable; nothing is created."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SamplingError(f"cannot write to {what}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SamplingError(f"cannot write to {what}: {probe} is not writable")
    return probe


def _check_out(out: Path, overwrite: bool) -> None:
    """Fail early on an output folder this run may not replace, creating nothing."""
    probe = _check_writable(out, f"output folder {out}")
    if probe == out and not os.access(out.parent if out.parent.exists() else out, os.W_OK):
        raise SamplingError(f"cannot replace output folder {out}: its parent is not writable")
    if probe == out and any(out.iterdir()) and not (out / RUN_RECORD).is_file() and not overwrite:
        raise SamplingError(
            f"output folder {out} is not empty and is not the output of an earlier "
            f"`runtime.sample` run: a run replaces its folder whole, so choose a new or empty "
            f"--out, or pass --overwrite to replace {out} and everything in it"
        )


def _check_trajectory_path(path: Path) -> None:
    if path.is_dir():
        raise SamplingError(
            f"--save-trajectory {path} is a folder: give a file name such as {path / 'traj.npz'}"
        )
    _check_writable(path.parent, f"--save-trajectory {path}")


def _labels(kw) -> list[int] | None:
    if kw["classes"] is None:
        return None
    try:
        labels = [int(c) for c in kw["classes"].split(",")]
    except ValueError:
        raise SamplingError(
            f"--classes takes comma-separated integers, got {kw['classes']!r}"
        ) from None
    return labels


# -- the run -----------------------------------------------------------------------------------


def run(kw: dict) -> dict:
    """Check every argument, sample, then write the outputs (all or nothing)."""
    if kw["class_"] is not None and kw["classes"] is not None:
        raise SamplingError("--class and --classes exclude each other: give one")
    for name in ("num_samples", "batch", "threads"):
        _positive(f"--{name.replace('_', '-')}", kw[name])
    labels = _labels(kw)
    num = kw["num_samples"] if kw["num_samples"] is not None else len(labels) if labels else 16
    if kw["class_"] is not None:
        labels = [kw["class_"]] * num
    first = 0
    if kw["shard"]:
        first, count = _shard(kw["shard"], num)
        num = count
        if labels is not None and len(labels) > 1:
            labels = labels[first : first + count]
    if num < 1:
        raise SamplingError("nothing to sample: this shard of the samples is empty")
    init = _load_npy(kw["init_noise"], "--init-noise") if kw["init_noise"] else None
    step = _load_npy(kw["step_noise"], "--step-noise") if kw["step_noise"] else None
    if kw["scale"] and kw["no_classifier"]:
        raise SamplingError("--scale with --no-classifier: guidance needs the classifier")
    engine = _engine_path(kw["engine"])
    out: Path = kw["out"]
    _check_out(out, kw["overwrite"])
    if kw["save_trajectory"] is not None:
        _check_trajectory_path(kw["save_trajectory"])
    options = {}
    if kw["providers"]:
        options["providers"] = kw["providers"].split(",")
    if kw["threads"]:
        options["threads"] = kw["threads"]
    t0 = time.perf_counter()
    with Pipeline.from_manifest(
        engine,
        classifier=False if kw["no_classifier"] else kw["classifier"],
        upsampler=False if kw["no_upsampler"] else kw["upsampler"],
        backend=kw["backend"],
        backend_options=options,
    ) as pipe:
        t_open = time.perf_counter() - t0
        show = sys.stderr.isatty() and not kw["as_json"]
        with progress_bar(num, "samples", enabled=show) as bar:
            result = pipe.sample(
                labels, num_samples=num, batch=kw["batch"], scale=kw["scale"],
                steps=kw["steps"], sampler=kw["sampler"], eta=kw["eta"], seed=kw["seed"],
                first_index=first, init_noise=init, step_noise=step,
                upsampler_steps=kw["upsampler_steps"], upsampler_start_t=kw["upsampler_start_t"],
                save_trajectory=kw["save_trajectory"] is not None,
                progress=lambda done, n: bar.set(done),
            )  # fmt: skip
        backend_choice = pipe.backend_choice
        engines = {"unet": pipe.unet_artifact.file}
        if pipe.classifier_artifact:
            engines["classifier"] = pipe.classifier_artifact.file
        if pipe.upsampler_artifact:
            engines["upsampler"] = pipe.upsampler_artifact.file
    shard = None
    if kw["shard"]:
        i, n = (int(v) for v in kw["shard"].split("/"))
        shard = {"shard": np.array([i, n], np.int64), "seed": np.array(kw["seed"], np.int64)}
    summary = {
        "num_samples": int(len(result.images)),
        "labels": None if result.labels is None else result.labels.tolist(),
        "engines": engines,
        "backend": {"onnx_graphs": backend_choice[0], "why": backend_choice[1]},
        "seed": kw["seed"],
        "timings": {"open_s": t_open, **result.timings},
    }
    files = write_outputs(out, result, first, shard, record=summary)
    if kw["save_trajectory"] is not None:
        tr = result.trajectory
        path = kw["save_trajectory"]
        _guard_space(path, lambda: _write_new(path, _npz_bytes(**tr)))
        files.append(str(path))
    return {"files": files, **summary}


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)


def _guard_space(what: Path, write) -> None:
    """Run `write`; a full disk or quota becomes a SamplingError naming the file."""
    try:
        write()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SamplingError(
                f"no space left on device writing {what}: nothing was written (an earlier "
                f"output there is untouched); free some space or choose another --out"
            ) from None
        raise SamplingError(f"cannot write {what}: {e.strerror or e}") from None


def write_outputs(
    out: Path, result, first: int = 0, shard: dict | None = None, record: dict | None = None
) -> list[str]:
    """samples.npz, grid.png, one PNG per sample (and base_grid.png in a cascade), and the
    run record, into a staging folder that then replaces `out` whole.

    A shard's samples.npz also holds `shard` ([I, N]), `seed` and `indices` (the global sample
    indices), which `gdexport merge-samples` checks; the evaluator reads only arr_0 / arr_1."""
    out = Path(out)
    parent = out.parent
    _guard_space(parent, lambda: parent.mkdir(parents=True, exist_ok=True))
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=parent))
    try:
        arrays = {"arr_0": result.images}
        if result.labels is not None:
            arrays["arr_1"] = result.labels
        if shard is not None:
            indices = np.arange(first, first + len(result.images), dtype=np.int64)
            arrays.update(shard, indices=indices)
        files = {"samples.npz": lambda: _npz_bytes(**arrays)}
        scale = max(1, 128 // result.images.shape[1])
        files["grid.png"] = lambda: png_bytes(grid(result.images, scale=scale))
        if result.base_images is not None:
            bscale = max(1, 128 // result.base_images.shape[1])
            files["base_grid.png"] = lambda: png_bytes(grid(result.base_images, scale=bscale))
        for j, img in enumerate(result.images):
            label = "" if result.labels is None else f"_class{int(result.labels[j])}"
            files[f"sample_{first + j:06d}{label}.png"] = lambda img=img: png_bytes(img)
        files[RUN_RECORD] = lambda: (json.dumps(record or {}, indent=1) + "\n").encode()
        for name, make in files.items():
            _guard_space(
                out / name, lambda name=name, make=make: (stage / name).write_bytes(make())
            )
        _guard_space(out, lambda: _swap_in(stage, out))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    listed = [str(out / n) for n in files if not n.startswith("sample_")]
    return listed + [str(out / "sample_*.png")]


def _swap_in(stage: Path, out: Path) -> None:
    """Replace `out` by `stage`: the old folder is moved aside, the new one renamed in, the old
    one removed. Both renames are within one folder, so each is atomic."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's are 0700; the folder is the user's output
    old = None
    if out.exists():
        if not out.is_dir():
            raise SamplingError(f"--out {out} is a file, not a folder")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
