"""int8 against fp32 on the shipped digits family, judged: `python examples/digits_int8.py BUILD`.

Samples the build's base stage with its fp32 and its int8 ONNX Runtime pipelines from the same
seeds and target labels (label j mod 10 for sample j), then scores both with the independent strong
judge (examples/digits_judge.py: an RBF-kernel SVM fitted on clean digits, never used for guidance):

    accuracy    the judge's agreement with the target labels
    recognisable  the share the judge calls a digit with confidence (digits_judge.CONFIDENT, and
                a real training digit nearby)
    diversity   mean over judged classes of the mean pairwise L2 distance within the class
                (grey 16x16 in [-1, 1]; the definition of examples/guidance_sweep.py)
    agreement   how often the judge gives an int8 sample the class of its fp32 twin, and the
                per-image RMSE between the twins (grey, [-1, 1] scale)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from digits_judge import StrongJudge  # noqa: E402
from digits_judge_logreg import diversity, grey  # noqa: E402

from runtime.pipeline import Pipeline  # noqa: E402


def judge_int8(
    build: str | Path,
    *,
    samples: int = 100,
    seed: int = 1000,
    scale: float | None = None,
    steps: str = "ddim25",
    batch: int = 16,
) -> dict:
    """Judge accuracy, recognisable share and diversity of fp32 and int8 samples from the same
    seeds and labels."""
    judge = StrongJudge()
    labels = np.arange(samples) % 10
    out: dict = {"samples": samples, "seed": seed, "steps": steps, "judge": judge.kind}
    xs, judged = {}, {}
    for precision in ("fp32", "int8"):
        with Pipeline.from_manifest(build, precision=precision, backend="onnxruntime") as pipe:
            if pipe.unet_artifact.precision != precision:
                raise ValueError(f"{build} has no {precision} UNet graph for ONNX Runtime")
            xs[precision] = pipe.sample(
                labels, scale=scale, steps=steps, seed=seed, batch=batch, upsample=False
            ).x
            out["scale"] = scale if scale is not None else pipe.manifest.sampling.get("scale")
            clf = pipe.classifier_artifact
        judged[precision] = judge.predict(xs[precision])
        out[precision] = {
            "accuracy": float((judged[precision] == labels).mean()),
            "recognisable": float(judge.recognisable(xs[precision]).mean()),
            "diversity": diversity(xs[precision], judged[precision]),
            "classifier": None if clf is None else f"{clf.file} ({clf.precision})",
        }
    rmse = np.sqrt(((grey(xs["int8"]) - grey(xs["fp32"])) ** 2).mean(axis=(1, 2)))
    out["agreement"] = {
        "same_judged_class": float((judged["int8"] == judged["fp32"]).mean()),
        "rmse_mean": float(rmse.mean()),
        "rmse_max": float(rmse.max()),
    }
    return out


@click.command(name="python examples/digits_int8.py", help=__doc__.split("\n")[0])
@click.argument("build", type=click.Path(exists=True, file_okay=False))
@click.option("--samples", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=1000, show_default=True,
              help="not the calibration set's seed (0)")  # fmt: skip
@click.option("--scale", type=click.FloatRange(min=0), help="guidance (default: the manifest's)")
@click.option("--steps", default="ddim25", show_default=True)
def main(build, samples, seed, scale, steps) -> None:
    try:
        got = judge_int8(build, samples=samples, seed=seed, scale=scale, steps=steps)
    except (ValueError, RuntimeError) as e:  # SamplingError, ManifestError, BackendError
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(got, indent=1))


if __name__ == "__main__":
    main()
