"""int8 against fp32 per engine call on ONNX Runtime: `python -m calibration.speed BUILD`.

Both sessions are opened first, warmed up, then called alternately on the same inputs (so drift in
the machine's load hits both alike); the figure is the median of each one's calls.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import click
import numpy as np

from runtime.backends import Backend
from runtime.backends.onnxruntime import OrtBackend
from runtime.manifest import Manifest


def time_backends(
    backends: Mapping[str, Backend],
    feeds: Mapping[str, np.ndarray],
    *,
    calls: int = 20,
    warmup: int = 3,
) -> dict[str, float]:
    """{name: median seconds per call} of each open backend on `feeds` (each given the inputs
    it takes), after `warmup` calls each, the timed calls alternating between them."""
    fitted = {n: {k: v for k, v in feeds.items() if k in b.inputs} for n, b in backends.items()}
    for name, b in backends.items():
        for _ in range(warmup):
            b(fitted[name])
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(calls):
        for name, b in backends.items():
            t0 = time.perf_counter()
            b(fitted[name])
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def time_graphs(
    graphs: Mapping[str, str | Path],
    feeds: Mapping[str, np.ndarray],
    *,
    calls: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> dict[str, float]:
    """{name: median seconds per call} of each graph on ONNX Runtime (`time_backends`)."""
    backends = {name: OrtBackend(path, threads=threads) for name, path in graphs.items()}
    try:
        return time_backends(backends, feeds, calls=calls, warmup=warmup)
    finally:
        for b in backends.values():
            b.close()


def unet_feeds(manifest: Manifest, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded UNet inputs: x ~ N(0, 1), a mid-schedule timestep, labels if class-conditional."""
    rng = np.random.default_rng(seed)
    c = manifest.components["unet"]
    size = c["image_size"]
    feeds = {
        "x": rng.standard_normal((batch, 3, size, size), dtype=np.float32),
        "t": np.full(batch, c["diffusion"]["diffusion_steps"] // 2, np.int64),
    }
    if c.get("num_classes"):
        feeds["y"] = rng.integers(0, c["num_classes"], batch).astype(np.int64)
    return feeds


def compare_unet(
    build: str | Path,
    *,
    batch: int = 1,
    calls: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    precisions: tuple[str, ...] = ("fp32", "int8"),
) -> dict[str, float]:
    """Median seconds per UNet call of each precision's ONNX Runtime graph in the build."""
    manifest = Manifest.load(build)
    graphs = {}
    for p in precisions:
        art = manifest.artifact("unet", p, "onnxruntime")
        if art is None or art.precision != p:
            raise ValueError(
                f"{manifest.folder} has no {p} UNet graph for ONNX Runtime: build one with "
                f"`gdexport build --{p} -o {manifest.folder} --backend onnxruntime`"
            )
        graphs[p] = manifest.verify(art)
    return time_graphs(
        graphs, unet_feeds(manifest, batch), calls=calls, warmup=warmup, threads=threads
    )


@click.command(name="python -m calibration.speed", help=__doc__.split("\n")[0])
@click.argument("build", type=click.Path(exists=True, file_okay=False))
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--calls", type=click.IntRange(min=1), default=20, show_default=True,
              help="timed calls per precision")  # fmt: skip
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="intra-op threads (default: cores)")
def main(build, batch, calls, warmup, threads) -> None:
    try:
        got = compare_unet(build, batch=batch, calls=calls, warmup=warmup, threads=threads)
    except (ValueError, RuntimeError) as e:  # ManifestError, BackendError
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    for name, s in got.items():
        click.echo(f"unet {name:<5} batch {batch}: {s * 1e3:9.2f} ms per call (median of {calls})")
    click.echo(f"int8 speed-up over fp32: {got['fp32'] / got['int8']:.2f}x")


if __name__ == "__main__":
    main()
