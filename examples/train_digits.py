"""Train the digits demo family on CPU: base UNet, noisy classifier, 16->32 upsampler, judge.

    python examples/train_digits.py --model all     # the shipped weights; see export/weights/train_*.json
    python examples/train_digits.py --model base --steps 500 --out /tmp/w

One thread per process. The shipped run took 37 (base), 17 (classifier) and 21 (upsampler)
minutes on a 2-core machine shared with other jobs; on an idle core the base takes about 0.5 s a
step (17 minutes).

Each model is the preset's network (`build_model("digits-16")`, ...), trained on scikit-learn's
digits (90% split; the other 10% is held out for evaluation), and saved as the EMA weights' plain
state dict, loadable with `load_model(preset, path)`. The judge is an independent
clean-image classifier (scikit-learn logistic regression) shipped as numpy weights; it is never
used for guidance. Seeded and single-threaded, so a rerun reproduces the weights bit for bit on
the same machine and torch build.
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
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_common import EMA, WEIGHTS, Digits, load_digits_split, q_sample, schedule  # noqa: E402

from export.loading import build_model  # noqa: E402
from export.presets import PRESETS  # noqa: E402

# name -> (preset, default steps, batch, learning rate)
MODELS = {
    "base": ("digits-16", 2000, 64, 3e-4),
    "classifier": ("digits-16-classifier", 2000, 64, 3e-4),
    "upsampler": ("digits-16-32-upsampler", 1500, 32, 3e-4),
}


def _batches(n: int, batch: int, gen: torch.Generator):
    """Endless index batches: a fresh seeded permutation each epoch, partial tail dropped."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for k in range(0, n - batch + 1, batch):
            yield perm[k : k + batch]


def _diffusion_loss(model, x0, gen, sched, low_res=None) -> torch.Tensor:
    """The simple eps-MSE loss (Ho et al. 2020, eq. 14) at uniformly drawn t."""
    t = torch.randint(0, sched.num_timesteps, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = q_sample(x0, t, noise, sched)
    out = model(x_t, t) if low_res is None else model(x_t, t, low_res)
    return F.mse_loss(out, noise)


def _shift(x0: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels in x and y, filling with background (-1).
    The digits are centred crops of 8x8 scans, so a noisy classifier trained on them alone
    keys on absolute pixel positions; the base model's samples are not always centred."""
    if max_shift <= 0:
        return x0
    size = x0.shape[-1]
    padded = F.pad(x0, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (x0.shape[0], 2), generator=gen).tolist()
    return torch.stack(
        [padded[k, :, i : i + size, j : j + size] for k, (i, j) in enumerate(offsets)]
    )


def _classifier_loss(model, x0, y, gen, sched) -> torch.Tensor:
    t = torch.randint(0, sched.num_timesteps, (x0.shape[0],), generator=gen)
    x_t = q_sample(x0, t, torch.randn(x0.shape, generator=gen), sched)
    return F.cross_entropy(model(x_t, t), y)


def _degrade(low_res: torch.Tensor, gen: torch.Generator, noise_max: float) -> torch.Tensor:
    """Conditioning augmentation (Ho et al. 2022, cascaded diffusion): Gaussian noise of a random
    level in [0, noise_max] per image, so the upsampler also accepts imperfect base samples."""
    if noise_max <= 0:
        return low_res
    level = torch.rand(low_res.shape[0], 1, 1, 1, generator=gen) * noise_max
    return low_res + level * torch.randn(low_res.shape, generator=gen)


def _crop_pair(
    x32: torch.Tensor, low_res: torch.Tensor, crop: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random window of the 32x32 target (crop x crop) and of the 16x16 conditioning
    (crop/2 square), one offset per batch. The upsampler is a convolutional UNet, so training on
    windows costs (crop/32)^2 of a full image per sample; the last `--full-steps` steps train on
    whole images so that the borders and the middle block's attention see the real layout."""
    if crop >= x32.shape[-1]:
        return x32, low_res
    half = crop // 2
    i, j = (int(v) for v in torch.randint(0, low_res.shape[-1] - half + 1, (2,), generator=gen))
    return (
        x32[..., 2 * i : 2 * i + crop, 2 * j : 2 * j + crop],
        low_res[..., i : i + half, j : j + half],
    )


def _save(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # no half-written checkpoint if interrupted


def train(name: str, data: Digits, *, steps: int, seed: int, out: Path, args) -> dict:
    preset, _, batch, lr = MODELS[name]
    batch = args.batch or batch
    lr = args.lr or lr
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(preset).train()
    ema = EMA(model, args.ema)
    is_clf = name == "classifier"
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05) if is_clf
           else torch.optim.Adam(model.parameters(), lr=lr))  # fmt: skip
    warmup = min(args.warmup, steps // 10)

    # Linear warm-up, then cosine decay to zero (per step; step 0 already trains at lr / warmup).
    def lr_at(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (k - warmup) / max(1, steps - warmup)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    sched = schedule()
    path = out / PRESETS[preset]["checkpoint"]
    x0_all = data.x32 if name == "upsampler" else data.x16
    n_params = sum(p.numel() for p in model.parameters())
    start = time.time()
    running = None
    bar = tqdm(zip(range(steps), _batches(len(data.y), batch, gen)), total=steps, desc=name)
    for step, idx in bar:
        x0 = x0_all[idx]
        if is_clf:
            x0 = _shift(x0, gen, args.shift)
            loss = _classifier_loss(model, x0, data.y[idx], gen, sched)
        elif name == "upsampler":
            low_res = _degrade(data.x16[idx], gen, args.lowres_noise)
            if step < steps - args.full_steps:
                x0, low_res = _crop_pair(x0, low_res, args.crop, gen)
            loss = _diffusion_loss(model, x0, gen, sched, low_res=low_res)
        else:
            loss = _diffusion_loss(model, x0, gen, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.update(model)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < steps:
            _save(ema.model, path)  # a partial run leaves usable weights
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    wall = time.time() - start
    _save(ema.model, path)
    info = dict(
        model=name, preset=preset, params=n_params, steps=steps, batch=batch, lr=lr,
        lr_schedule=f"linear warm-up {warmup} steps, cosine decay to 0", ema=args.ema, seed=seed, wall_s=round(wall, 1), final_loss=round(running, 5),
        lowres_noise=args.lowres_noise if name == "upsampler" else None,
        crop=(args.crop, args.full_steps) if name == "upsampler" else None,
        shift=args.shift if is_clf else None,
        torch=torch.__version__, threads=torch.get_num_threads(), checkpoint=path.name,
        command="python examples/train_digits.py " + " ".join(sys.argv[1:]),
    )  # fmt: skip
    (out / f"train_{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return info


def train_judge(train_set: Digits, held_out: Digits, out: Path, seed: int) -> dict:
    """Logistic regression on clean 16x16 grey digits; saved as weights for `judge.predict`."""
    from sklearn.linear_model import LogisticRegression

    def feats(d: Digits) -> np.ndarray:
        return d.x16[:, 0].reshape(len(d.y), -1).numpy().astype(np.float64)

    clf = LogisticRegression(C=0.05, max_iter=5000, random_state=seed)
    clf.fit(feats(train_set), train_set.y.numpy())
    acc = float((clf.predict(feats(held_out)) == held_out.y.numpy()).mean())
    np.savez(
        out / "digits16_judge.npz",
        weight=clf.coef_.astype(np.float32),  # (10, 256)
        bias=clf.intercept_.astype(np.float32),  # (10,)
        held_out_accuracy=np.float32(acc),
    )
    info = dict(model="judge", kind="LogisticRegression(C=0.05)", held_out_accuracy=acc)
    (out / "train_judge.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=[*MODELS, "judge", "all"], default="all")
    p.add_argument("--steps", type=int, default=None, help="training steps (default per model)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--lowres-noise", type=float, default=0.0,
                   help="upsampler: max std of the noise added to the low-res conditioning")  # fmt: skip
    p.add_argument(
        "--crop",
        type=int,
        default=16,
        help="upsampler: train on crop x crop windows of the 32x32 target",
    )
    p.add_argument("--full-steps", type=int, default=150,
                   help="upsampler: the last N steps train on whole 32x32 images")  # fmt: skip
    p.add_argument("--shift", type=int, default=0,
                   help="classifier: random translation of up to N pixels (16x16 grid)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="save the EMA weights every N steps (0: only at the end)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=WEIGHTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_set, held_out = load_digits_split()
    names = [*MODELS, "judge"] if args.model == "all" else [args.model]
    for name in names:
        if name == "judge":
            train_judge(train_set, held_out, args.out, args.seed)
        else:
            steps = args.steps or MODELS[name][1]
            train(name, train_set, steps=steps, seed=args.seed, out=args.out, args=args)


if __name__ == "__main__":
    main()
