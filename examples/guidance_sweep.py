"""Classifier guidance on the shipped digits family: judge accuracy and diversity vs scale.

    python examples/guidance_sweep.py                     # about 5 minutes on one CPU thread
    python examples/guidance_sweep.py --scales 0 2 4 --samples 100

Guided DDIM (Dhariwal & Nichol 2021, Algorithm 2; `runtime.sampling.sample_ddim` over the
PyTorch reference callables), 25 steps, eta 0, fixed seeds: every scale starts from the same x_T
and target labels, so the rows differ only by the scale. Accuracy is the independent judge's
agreement with the target labels; diversity is the mean pairwise L2 distance between samples the
judge puts in the same class (grey 16x16 in [-1, 1], averaged over classes). Also evaluates the
16->32 upsampler against bilinear upsampling on the held-out digits and draws a cascade grid.
Writes JSON, Markdown and PNGs to examples/assets/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_common import ASSETS, grey, load_digits_split, save_grid  # noqa: E402
from digits_judge import CONFIDENT, StrongJudge  # noqa: E402
from digits_judge_logreg import diversity  # noqa: E402

from export import weights  # noqa: E402
from export.loading import load_model  # noqa: E402
from export.reference import grad_fn, model_fn  # noqa: E402
from runtime.sampling import sample_ddim  # noqa: E402
from runtime.schedule import Schedule, make_schedule  # noqa: E402

BASE, CLASSIFIER, UPSAMPLER = "digits-16", "digits-16-classifier", "digits-16-32-upsampler"
PARTS = ("guidance", "upsampler", "cascade")
UPSAMPLER_START_T = 500  # where the shipped upsampler's chain starts (see `upsample`)


WEIGHTS_DIR: Path | None = None  # --weights: a folder of digits checkpoints instead of the shipped


def load(preset: str) -> torch.nn.Module:
    """A digits model (shipped, or from --weights), loaded through its preset."""
    if WEIGHTS_DIR is not None:
        return load_model(preset, WEIGHTS_DIR / weights.path(preset).name)
    return load_model(preset, weights.path(preset))


def sample_base(
    base, classifier, labels: np.ndarray, scale: float, *, seed: int, respacing: str = "ddim25"
) -> np.ndarray:
    """(N,) target labels -> (N, 3, 16, 16) float32 samples; scale 0 is unguided."""
    spec = base.spec
    sched = make_schedule(
        spec.diffusion["noise_schedule"], spec.diffusion["diffusion_steps"], respacing
    )
    x_T = np.random.default_rng(seed).standard_normal((len(labels), 3, 16, 16), dtype=np.float32)
    g = grad_fn(classifier, labels, scale) if scale > 0 else None
    return sample_ddim(
        model_fn(base), x_T, sched, learn_sigma=spec.diffusion["learn_sigma"], eta=0.0, grad_fn=g
    )


def upsample(
    upsampler,
    low_res: np.ndarray,
    *,
    seed: int,
    respacing: str = "ddim25",
    start_t: int | None = None,
) -> np.ndarray:
    """(N, 3, 16, 16) in [-1, 1] -> (N, 3, 32, 32) float32, DDIM eta 0 from seeded noise.

    start_t None runs the whole chain from pure noise. start_t = s runs only the respaced steps
    with t <= s, from x_s = sqrt(alpha_bar_s) bilinear(low_res) + sqrt(1 - alpha_bar_s) noise (a
    truncated reverse process, as SDEdit, Meng et al. 2022): the shipped upsampler is accurate
    below t ~ 500 and not above (see examples/assets/digits_results.md), and its conditioning
    already fixes the image's layout, so the high-noise steps add nothing but their errors.
    """
    spec = upsampler.spec
    sched = make_schedule(
        spec.diffusion["noise_schedule"], spec.diffusion["diffusion_steps"], respacing
    )
    noise = np.random.default_rng(seed).standard_normal((len(low_res), 3, 32, 32), dtype=np.float32)
    x = noise
    if start_t is not None:
        keep = int((sched.timestep_map <= start_t).sum())
        if keep < 2:
            raise ValueError(f"start_t={start_t} keeps {keep} steps of {respacing}: raise it")
        # The first `keep` betas give the same alpha_bar at the kept steps.
        sched = Schedule.from_betas(sched.betas[:keep], sched.timestep_map[:keep])
        a = sched.alphas_cumprod[-1]
        x = (np.sqrt(a) * bilinear(low_res) + np.sqrt(1 - a) * noise).astype(np.float32)
    fn = model_fn(upsampler, low_res=np.asarray(low_res, np.float32))
    return sample_ddim(fn, x, sched, learn_sigma=spec.diffusion["learn_sigma"], eta=0.0)


def bilinear(low_res: np.ndarray, size: int = 32) -> np.ndarray:
    """The upsampler's own conditioning path: bilinear, align_corners=False."""
    x = torch.from_numpy(np.asarray(low_res, np.float32))
    return F.interpolate(x, size=(size, size), mode="bilinear").numpy()


def rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) per-image RMSE between grey images (channel means) in [-1, 1]."""
    return np.sqrt(((grey(a) - grey(b)) ** 2).mean(axis=(1, 2)))


def by_label_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 10) -> np.ndarray:
    """Up to `per_class` images of each label 0..9, one row per label (blank where fewer)."""
    rows = []
    for c in range(10):
        sel = images[labels == c][:per_class]
        pad = np.full((per_class - len(sel), *images.shape[1:]), -1, np.float32)
        rows.append(np.concatenate([sel, pad]))
    return np.concatenate(rows)


def guidance_sweep(base, classifier, judge, scales, n: int, seed: int) -> list[dict]:
    labels = np.random.default_rng(seed + 1).integers(0, 10, n)
    rows = []
    for scale in scales:
        start = time.time()
        x = sample_base(base, classifier, labels, scale, seed=seed)
        judged = judge.predict(x)
        rows.append(dict(
            scale=scale,
            accuracy=float((judged == labels).mean()),
            recognisable=float(judge.recognisable(x).mean()),
            diversity=diversity(x, judged),
            classes_judged=int(len(np.unique(judged))),
            seconds=round(time.time() - start, 1),
        ))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        save_grid(by_label_grid(x, labels), ASSETS / f"digits_guided_scale{scale:g}.png", cols=10)
    return rows


def upsampler_table(upsampler, held_out, settings, seed: int) -> list[dict]:
    """RMSE to the held-out 32x32 digits: bilinear, then each (respacing, start_t) setting."""
    low, target = held_out.x16.numpy(), held_out.x32.numpy()
    bil = rmse(bilinear(low), target)
    rows = [dict(method="bilinear", rmse=float(bil.mean()), max_rmse=float(bil.max()), beats_bilinear=None)]  # fmt: skip
    for respacing, start_t in settings:
        start = time.time()
        out = upsample(upsampler, low, seed=seed, respacing=respacing, start_t=start_t)
        err = rmse(out, target)
        chain = "from noise" if start_t is None else f"from noised bilinear at t<={start_t}"
        rows.append(dict(
            method=f"upsampler DDIM {respacing} {chain}",
            rmse=float(err.mean()),
            max_rmse=float(err.max()),
            beats_bilinear=float((err < bil).mean()),
            seconds=round(time.time() - start, 1),
        ))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], path: Path, real_diversity: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): skipping the plot")
        return
    s = [r["scale"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(s, [r["accuracy"] for r in rows], "o-", color="tab:blue", label="judge accuracy")
    ax.set_xlabel("classifier scale")
    ax.set_ylabel("accuracy on target label", color="tab:blue")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(s, [r["diversity"] for r in rows], "s--", color="tab:red", label="diversity")
    ax2.axhline(real_diversity, color="tab:red", lw=0.8, ls=":")
    ax2.set_ylabel("within-class mean pairwise L2", color="tab:red")
    ax.set_title("digits-16: guided DDIM 25 steps")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(sweep: list[dict], ups: list[dict], meta: dict) -> str:
    lines = [
        f"Guided DDIM ({meta['respacing']}, eta 0), {meta['samples']} samples per scale, seed "
        f"{meta['seed']}; judge {meta['judge']}, held-out accuracy {meta['judge_accuracy']:.3f}; "
        f"recognisable = judge probability >= {meta['confident']}; diversity of real "
        f"held-out digits (by true class) {meta['real_diversity']:.2f}.",
        "",
        "| scale | judge accuracy | recognisable | diversity | classes judged |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {r['scale']:g} | {r['accuracy']:.3f} | {r['recognisable']:.3f} | {r['diversity']:.2f} | {r['classes_judged']} |" for r in sweep),
        "",
        f"Upsampler 16->32 on the {meta['held_out']} held-out digits (RMSE of grey images in [-1, 1]):",
        "",
        "| method | mean RMSE | max RMSE | share of images better than bilinear |",
        "|---|---:|---:|---:|",
        *(f"| {r['method']} | {r['rmse']:.4f} | {r['max_rmse']:.4f} | "
          + ("" if r["beats_bilinear"] is None else f"{r['beats_bilinear']:.3f}") + " |" for r in ups),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    global WEIGHTS_DIR, ASSETS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument(
        "--cascade-scale",
        type=float,
        default=None,
        help="guidance scale of the cascade grid (default: the preset's recommended)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="a folder of digits checkpoints to judge instead of export/weights",
    )
    p.add_argument("--assets", type=Path, default=ASSETS, help="where results and grids go")
    args = p.parse_args(argv)  # fmt: skip
    WEIGHTS_DIR, ASSETS = args.weights, args.assets
    torch.set_num_threads(args.threads)
    ASSETS.mkdir(parents=True, exist_ok=True)
    results_path = ASSETS / "digits_results.json"
    # Parts run separately update one results file.
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    judge = StrongJudge()
    _, held_out = load_digits_split()
    results["meta"] = dict(
        respacing="ddim25", samples=args.samples, seed=args.seed, held_out=len(held_out.y),
        judge=judge.kind, judge_accuracy=judge.held_out_accuracy, confident=CONFIDENT,
        real_diversity=diversity(held_out.x16.numpy(), held_out.y.numpy()),
    )  # fmt: skip
    if "guidance" in args.parts:
        base, classifier = load(BASE), load(CLASSIFIER)
        sweep = guidance_sweep(base, classifier, judge, args.scales, args.samples, args.seed)
        results["guidance"] = sweep
        plot(sweep, ASSETS / "digits_guidance_sweep.png", results["meta"]["real_diversity"])
    if "upsampler" in args.parts:
        settings = [("ddim25", None), ("ddim25", UPSAMPLER_START_T), ("ddim25", 300)]
        ups = upsampler_table(load(UPSAMPLER), held_out, settings, args.seed)
        results["upsampler"] = ups
    if "cascade" in args.parts:
        base, classifier, upsampler = load(BASE), load(CLASSIFIER), load(UPSAMPLER)
        scale = args.cascade_scale
        if scale is None:
            scale = base.spec.recommended_scale or 2.0
        results["meta"]["cascade_scale"] = scale
        labels = np.repeat(np.arange(10), 2)
        low = sample_base(base, classifier, labels, scale, seed=args.seed + 2)
        high = upsample(upsampler, low, seed=args.seed + 3, start_t=UPSAMPLER_START_T)
        nearest = np.repeat(np.repeat(low, 2, axis=2), 2, axis=3)
        # Per sample: the 16x16 base sample (pixels doubled), bilinear, the upsampler's 32x32.
        triples = np.stack([nearest, bilinear(low), high], axis=1).reshape(-1, 3, 32, 32)
        save_grid(triples, ASSETS / "digits_cascade.png", cols=6, zoom=3)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results.get("guidance", []), results.get("upsampler", []), results["meta"])
    (ASSETS / "digits_results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
