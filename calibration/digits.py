"""int8 against fp32 on the shipped digits family, judged: `python -m calibration.digits BUILD`.

Samples the build's base stage with its fp32 and its int8 ONNX Runtime pipelines from the same
seeds and target labels (label j mod 10 for sample j), then scores both with the independent judge
(export/weights/judge.py: a clean-image classifier never used for guidance):

    accuracy    the judge's agreement with the target labels
    diversity   mean over judged classes of the mean pairwise L2 distance within the class
                (grey 16x16 in [-1, 1]; the definition of examples/guidance_sweep.py)
    agreement   how often the judge gives an int8 sample the class of its fp32 twin, and the
                per-image RMSE between the twins (grey, [-1, 1] scale)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from export.weights.judge import diversity, grey
from runtime.pipeline import Pipeline


def judge_int8(
    build: str | Path,
    *,
    samples: int = 100,
    seed: int = 1000,
    scale: float | None = None,
    steps: str = "ddim25",
    batch: int = 16,
) -> dict:
    """Judge accuracy and diversity of fp32 and int8 samples from the same seeds and labels."""
    from export.weights.judge import Judge

    judge = Judge()
    labels = np.arange(samples) % 10
    out: dict = {"samples": samples, "seed": seed, "steps": steps}
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m calibration.digits", description=__doc__.split("\n")[0]
    )
    p.add_argument("build", help="a digits build with fp32 and int8 graphs")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=1000, help="not the calibration set's seed (0)")
    p.add_argument("--scale", type=float, help="guidance scale (default: the manifest's)")
    p.add_argument("--steps", default="ddim25")
    args = p.parse_args(argv)
    try:
        got = judge_int8(
            args.build, samples=args.samples, seed=args.seed, scale=args.scale, steps=args.steps
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(got, indent=1))


if __name__ == "__main__":
    main()
