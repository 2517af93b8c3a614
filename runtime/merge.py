"""Join the `samples.npz` of `python -m runtime.sample --shard I/N` runs into one evaluator file.

Checks that the shards belong together (same N, same seed), that each of 0..N-1 is there exactly
once, and that their sample indices tile 0..total-1 without gaps or overlaps; the result equals one
unsharded run with the same seed (sample j's noise and label depend only on (seed, j)).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.manifest import write_bytes_atomic


class MergeError(ValueError):
    """Shards that do not make one complete run; the message names the problem."""


def merge_shards(paths: Sequence[str | Path], out: str | Path) -> dict:
    """Write `out` (.npz with arr_0 uint8 NHWC, arr_1 labels when present); return a summary."""
    if not paths:
        raise MergeError("no shard files given")
    shards = []
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as f:
                d = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise MergeError(f"cannot read shard {p}: {e}") from None
        if "shard" not in d or "indices" not in d:
            raise MergeError(f"{p} is not a shard's samples.npz (run with --shard I/N)")
        shards.append((Path(p), d))
    n = {int(d["shard"][1]) for _, d in shards}
    seeds = {int(d["seed"]) for _, d in shards}
    if len(n) != 1 or len(seeds) != 1:
        raise MergeError(
            f"shards come from different runs: N in {sorted(n)}, seeds {sorted(seeds)}"
        )
    total = n.pop()
    seen: dict[int, Path] = {}
    for p, d in shards:
        i = int(d["shard"][0])
        if i in seen:
            raise MergeError(f"shard {i}/{total} given twice: {seen[i]} and {p}")
        seen[i] = p
    missing = sorted(set(range(total)) - set(seen))
    if missing:
        raise MergeError(f"missing shard(s) {', '.join(f'{i}/{total}' for i in missing)}")
    shards.sort(key=lambda s: int(s[1]["shard"][0]))
    indices = np.concatenate([d["indices"] for _, d in shards])
    if not np.array_equal(indices, np.arange(len(indices))):
        raise MergeError("the shards' sample indices do not tile 0..N-1 (different --num-samples?)")
    has_labels = {"arr_1" in d for _, d in shards}
    if len(has_labels) != 1:
        raise MergeError("some shards have labels and some do not")
    arrays = {"arr_0": np.concatenate([d["arr_0"] for _, d in shards])}
    if has_labels.pop():
        arrays["arr_1"] = np.concatenate([d["arr_1"] for _, d in shards])
    out = Path(out)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(out, buf.getvalue())
    return {"file": str(out), "samples": int(len(arrays["arr_0"])), "shards": total}
