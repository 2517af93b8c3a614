"""The `gdexport` command: presets, export, check, build."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from export.spec import PRESET_SETS, SpecError
from runtime.manifest import ManifestError

COMPONENTS = ("unet", "classifier", "upsampler")
_PREFIX = {"unet": "", "classifier": "classifier-", "upsampler": "upsampler-"}


def component_options(f):
    """--preset/--model-flags/--config/--checkpoint, and the same for the classifier and upsampler."""
    for comp in reversed(COMPONENTS):
        p = _PREFIX[comp]
        what = {"unet": "base model", "classifier": "noisy classifier", "upsampler": "upsampler"}[
            comp
        ]
        f = click.option(
            f"--{p}checkpoint",
            type=click.Path(dir_okay=False),
            help=f"{what} weights (.pt / .safetensors); random weights if omitted",
        )(f)
        f = click.option(
            f"--{p}config",
            type=click.Path(dir_okay=False),
            help=f"{what} as a JSON file (flags or constructor arguments)",
        )(f)
        f = click.option(
            f"--{p}{'model-' if comp == 'unet' else ''}flags", help=f"{what} as MODEL_FLAGS"
        )(f)
        f = click.option(f"--{p}preset", help=f"{what} preset (`gdexport presets`)")(f)
    f = click.option(
        "--set",
        "preset_set",
        type=click.Choice(sorted(PRESET_SETS)),
        help="a preset set: base + classifier (+ upsampler)",
    )(f)
    return f


def collect_sources(kw: dict, seed: int):
    from export.exporter import ComponentSource

    sources = {}
    chosen = dict(PRESET_SETS.get(kw.get("preset_set") or "", {}))
    for comp in COMPONENTS:
        p = _PREFIX[comp].replace("-", "_")
        flags_key = "model_flags" if comp == "unet" else f"{p}flags"
        given = [(k, kw.get(k)) for k in (f"{p}preset", flags_key, f"{p}config") if kw.get(k)]
        if len(given) > 1:
            raise click.UsageError(
                f"give one of --{p.replace('_', '-')}preset / flags / config for the {comp}, not {len(given)}"
            )
        spec = given[0][1] if given else chosen.get(comp)
        ckpt = kw.get(f"{p}checkpoint")
        if spec is None:
            if ckpt:
                raise click.UsageError(
                    f"--{p.replace('_', '-')}checkpoint given without a spec for the {comp}"
                )
            continue
        if isinstance(spec, str) and spec.endswith(".json") and not Path(spec).is_file():
            raise click.UsageError(f"config file {spec} does not exist")
        if ckpt is None and isinstance(spec, str):
            ckpt = shipped_checkpoint(spec)
        if ckpt is None:
            click.echo(
                f"note: no --{p.replace('_', '-')}checkpoint for the {comp}: random weights (seed {seed + COMPONENTS.index(comp)})",
                err=True,
            )
        sources[comp] = ComponentSource(spec, ckpt, seed=seed + COMPONENTS.index(comp))
    return sources


def shipped_checkpoint(preset: str) -> Path | None:
    """The weights shipped in the package for a preset (the digits family), if any."""
    from export import weights

    try:
        return weights.path(preset)
    except (KeyError, FileNotFoundError):
        return None


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """gdexport: deploy guided-diffusion (ADM) models to ONNX Runtime and TensorRT."""


@main.command()
def presets():
    """List the presets: name, kind, resolution, parameters, checkpoint file."""
    import torch

    from export.loading import build_model
    from export.presets import PRESETS

    click.echo(
        f"{'preset':<24} {'kind':<11} {'resolution':<10} {'params':>12}  {'scale':>5}  {'steps':>6}  checkpoint"
    )
    for name, p in PRESETS.items():
        with torch.device("meta"):
            m = build_model(name)
        n = sum(v.numel() for v in m.parameters())
        s = m.spec
        res = (
            f"{s.ctor['small_size']}->{s.image_size}" if s.kind == "superres" else str(s.image_size)
        )
        scale = "" if s.recommended_scale is None else f"{s.recommended_scale:g}"
        click.echo(
            f"{name:<24} {s.kind:<11} {res:<10} {n:>12,}  {scale:>5}  {s.recommended_respacing:>6}  {p.get('checkpoint', '')}"
        )
    click.echo(
        "\nsets (--set): "
        + "; ".join(f"{k}: {', '.join(v.values())}" for k, v in PRESET_SETS.items())
    )


def export_options(f):
    f = component_options(f)
    f = click.option(
        "-o", "--out", required=True, type=click.Path(file_okay=False), help="build folder"
    )(f)
    f = click.option("--batch-min", default=1, show_default=True)(f)
    f = click.option("--batch-opt", default=1, show_default=True)(f)
    f = click.option("--batch-max", default=16, show_default=True)(f)
    f = click.option(
        "--seed", default=0, show_default=True, help="seed of random weights (no checkpoint)"
    )(f)
    f = click.option(
        "--no-check", is_flag=True, help="skip the parity check against the reference"
    )(f)
    return f


def run_export(kw: dict) -> dict:
    from export.exporter import ExportError, export_build
    from export.loading import CheckpointError

    try:
        sources = collect_sources(kw, kw["seed"])
        return export_build(
            kw["out"], sources, batch_min=kw["batch_min"], batch_opt=kw["batch_opt"],
            batch_max=kw["batch_max"], check=not kw["no_check"],
        )  # fmt: skip
    except (SpecError, CheckpointError, ExportError) as e:
        _fail(str(e))


@main.command("export")
@export_options
def export_cmd(**kw):
    """Export each given component to ONNX in OUT, check parity, write the manifest last."""
    manifest = run_export(kw)
    files = ", ".join(a["file"] for a in manifest["artifacts"])
    click.echo(f"wrote {kw['out']}: {files}, manifest.json")


@main.command()
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--trajectory", is_flag=True, help="also compare whole guided sampling loops")
@click.option("--steps", default="25", show_default=True, help="respacing of the trajectory check")
@click.option("--precision", help="only artefacts of this precision")
def check(build_dir, trajectory, steps, precision):
    """Compare every artefact of a build with the PyTorch reference; exit 1 over tolerance."""
    from export.checking import run_check

    try:
        ok = run_check(
            Path(build_dir), trajectory=trajectory, steps=steps, precision=precision, log=click.echo
        )
    except (SpecError, ValueError, RuntimeError) as e:  # ManifestError, ExportError, BackendError
        _fail(str(e))
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
def info(build_dir):
    """Summarise a build: components, artefacts and the parity figures its manifest records."""
    from export.parity import ParityRow, format_table
    from export.trajectory import TrajectoryRow, format_rows
    from runtime.manifest import Manifest

    try:
        m = Manifest.load(build_dir)
    except ManifestError as e:
        _fail(str(e))
    for name, c in m.components.items():
        weights = (
            c["weights"].get("checkpoint") or f"random (seed {c['weights'].get('random_seed')})"
        )
        click.echo(
            f"{name:<11} {c['kind']:<10} {c.get('preset') or '-':<24} {c['image_size']}px  classes={c['num_classes']}  weights={weights}"
        )
    click.echo("")
    bad = []
    for a in m.artifacts:
        try:
            m.verify(a)
            state = "sha256 ok"
        except ManifestError as e:
            state = "MISSING" if "is missing" in str(e) else "sha256 MISMATCH"
            bad.append(str(e))
        click.echo(
            f"{a.file:<30} {a.role:<16} {a.precision:<5} {a.backend:<12} batch {a.batch['min']}..{a.batch['max']}  {a.sha256[:12]} {state}"
        )
    parity = m.data.get("parity", {})
    if parity.get("components"):
        click.echo("")
        click.echo(format_table([ParityRow(**r) for r in parity["components"]]))
    if parity.get("trajectories"):
        click.echo("")
        click.echo(format_rows([TrajectoryRow(**r) for r in parity["trajectories"]]))
    runtime = m.data.get("runtime") or {}
    if runtime.get("choices"):
        from runtime import cpu

        here = "this CPU" if runtime.get("cpu") == cpu.identity() else "another CPU: not used here"
        click.echo(f"\nCPU backend chosen by the build ({here}):")
        for prec, c in runtime["choices"].items():
            click.echo(f"  {prec:<5} {c['backend']}: {c['why']}")
    if bad:
        _fail(f"{len(bad)} artefact(s) of {build_dir} fail verification: " + " ".join(bad))
    click.echo(
        f"\nverified: every artefact's sha256 matches the manifest ({len(m.artifacts)} files)"
    )


@main.command("merge-samples")
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def merge_samples(out, shards):
    """Join shards' samples.npz (from `python -m runtime.sample --shard I/N`) into OUT.npz."""
    from runtime.merge import MergeError, merge_shards

    try:
        summary = merge_shards(shards, out)
    except MergeError as e:
        _fail(str(e))
    click.echo(
        f"wrote {summary['file']}: {summary['samples']} samples from {summary['shards']} shards"
    )


@main.command("triton")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o", "--out", required=True, type=click.Path(file_okay=False), help="repository folder"
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    help="UNet engine precision (default: the lowest built)",
)
@click.option(
    "--backend",
    type=click.Choice(["tensorrt", "onnxruntime"]),
    help="engines of this backend (default: TensorRT plans if built)",
)
@click.option(
    "--kind",
    type=click.Choice(["auto", "gpu", "cpu"]),
    default="auto",
    show_default=True,
    help="where engine models run (auto: GPU for plans, CPU for ONNX graphs)",
)
@click.option(
    "--instances",
    default=1,
    show_default=True,
    help="instances of each engine model (per GPU with KIND_GPU)",
)
@click.option(
    "--sampler-instances",
    default=8,
    show_default=True,
    help="requests the server samples concurrently",
)
@click.option(
    "--queue-delay-us",
    default=2000,
    show_default=True,
    help="dynamic batcher: how long a step call waits for others to join it",
)
@click.option(
    "--max-samples", default=64, show_default=True, help="most samples one request may ask for"
)
@click.option("--force", is_flag=True, help="replace an existing OUT")
def triton_cmd(
    build_dir,
    out,
    precision,
    backend,
    kind,
    instances,
    sampler_instances,
    queue_delay_us,
    max_samples,
    force,
):
    """A Triton Inference Server model repository from BUILD_DIR: one model per engine and
    `gd_sampler`, the guided loop in the server (Python backend, BLS calls to the engines)."""
    from export.triton import TritonRepoError, make_repository

    try:
        arts = make_repository(
            build_dir, out, precision=precision, backend=backend, kind=kind,
            instances=instances, sampler_instances=sampler_instances,
            queue_delay_us=queue_delay_us, max_samples=max_samples, force=force,
        )  # fmt: skip
    except (TritonRepoError, ManifestError) as e:
        _fail(str(e))
    for role, art in arts.items():
        click.echo(f"gd_{role}: {art.file} ({art.precision}, {art.backend})")
    click.echo(f"wrote {out}; serve it with `tritonserver --model-repository {out}`")


@main.command("build")
@click.option("--fp32", "precision", flag_value="fp32", help="fp32 graphs / engines")
@click.option(
    "--fp16", "precision", flag_value="fp16", default=True, help="fp16 with fp32 islands (default)"
)
@click.option(
    "--bf16",
    "precision",
    flag_value="bf16",
    help="bf16 OpenVINO artefacts, for CPUs with bf16 units (AVX512-BF16, AMX)",
)
@click.option(
    "--int8",
    "precision",
    flag_value="int8",
    help="int8 Q/DQ graphs calibrated on OUT/calibration/ (recorded first if absent)",
)
@click.option(
    "--calib-method",
    type=click.Choice(["percentile", "entropy", "minmax"]),
    default="percentile",
    show_default=True,
    help="int8: how activation ranges are set from the calibration set",
)
@click.option(
    "--keep-fp32",
    multiple=True,
    metavar="PATTERN",
    help="int8: also keep these layers in float: a node or weight name pattern ('*middle_block*') "
    "or a category (first-conv, last-conv, embedding, attention, skip); repeatable",
)
@click.option(
    "--no-default-keep",
    is_flag=True,
    help="int8: quantise the sensitive layers kept in float by default too",
)
@click.option(
    "--calib-samples", type=int, help="int8: samples of a new calibration set (default 16)"
)
@click.option("--calib-steps", help="int8: respacing of a new calibration set (default ddim25)")
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnxruntime", "tensorrt"]),
    default="auto",
    show_default=True,
)
@click.option("--workspace-gb", default=4.0, show_default=True, help="TensorRT workspace limit")
@click.option(
    "--opt-level", default=3, show_default=True, help="TensorRT builder optimisation level 0-5"
)
@click.option(
    "--trajectory-steps",
    default="25",
    show_default=True,
    help="respacing of the recorded trajectory check ('' to skip)",
)
@export_options
def build_cmd(
    precision, backend, workspace_gb, opt_level, trajectory_steps, calib_method, keep_fp32,
    no_default_keep, calib_samples, calib_steps, **kw,
):  # fmt: skip
    """Export OUT if needed, then build every engine: TensorRT plans, or ONNX Runtime graphs of
    the same precision where there is no TensorRT or GPU."""
    from calibration.quantize import DEFAULT_KEEP
    from export.build import build
    from export.exporter import ExportError
    from export.loading import CheckpointError
    from export.trt_build import EngineBuildError

    int8_options = {
        "method": calib_method,
        "keep": (() if no_default_keep else DEFAULT_KEEP) + tuple(keep_fp32),
        "samples": calib_samples,
        "steps": calib_steps,
    }

    try:
        sources = collect_sources(kw, kw["seed"])
        manifest = build(
            kw["out"], precision=precision, sources=sources or None, backend=backend,
            batch={"min": kw["batch_min"], "opt": kw["batch_opt"], "max": kw["batch_max"]},
            workspace_gb=workspace_gb, opt_level=opt_level, trajectory_steps=trajectory_steps or None,
            check=not kw["no_check"], log=click.echo,
            int8_options=int8_options if precision == "int8" else None,
        )  # fmt: skip
    except (SpecError, CheckpointError, ExportError, ManifestError, EngineBuildError) as e:
        _fail(str(e))
    engines = [
        a["file"]
        for a in manifest["artifacts"]
        if a["precision"] == precision and a["role"] != "classifier"
    ]
    click.echo(f"built {kw['out']} ({precision}): {', '.join(engines)}")


@main.command()
@click.option(
    "-o", "--out", required=True, type=click.Path(exists=True, file_okay=False),
    help="build folder (exported): the set goes to OUT/calibration/",
)  # fmt: skip
@click.option("--samples", type=int, help="trajectories to record (default 16, or the set's)")
@click.option("--steps", help="respacing users sample with (default ddim25, or the set's)")
@click.option("--upsampler-steps", help="respacing of the upsampler stage (default: --steps)")
@click.option("--seed", type=int, help="seed of the samples' noise (default 0)")
@click.option("--scale", type=float, help="guidance scale (default: the manifest's)")
@click.option("--shard-size", type=int, help="samples per shard and engine call (default 4)")
@click.option(
    "--restart", is_flag=True, help="discard the existing set and record anew (default settings)"
)
def calibrate(out, samples, steps, upsampler_steps, seed, scale, shard_size, restart):
    """Record the int8 calibration set: every engine's inputs along real guided trajectories of
    the build's fp32 pipeline, in resumable shards under OUT/calibration/."""
    from calibration.dataset import CalibrationError, record_calibration_set

    try:
        cal = record_calibration_set(
            out, samples=samples, steps=steps, upsampler_steps=upsampler_steps, seed=seed,
            scale=scale, shard_size=shard_size, restart=restart, log=click.echo,
        )  # fmt: skip
    except (CalibrationError, ManifestError, ValueError, RuntimeError) as e:
        _fail(str(e))
    calls = ", ".join(f"{r} {cal.calls(r)}" for r in cal.roles)
    click.echo(
        f"calibration set {cal.folder}: {cal.samples} samples, steps {cal.config.steps}, "
        f"{len(cal.shards)} shard(s); engine calls: {calls}"
    )


if __name__ == "__main__":
    main()
