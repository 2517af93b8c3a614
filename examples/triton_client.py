"""Request guided samples from a Triton server serving a `gdexport triton` repository.

    python examples/triton_client.py --url 127.0.0.1:8000 --classes 3,1,4 --scale 4 --steps 25 \
        --seed 0 --out grid.png
    python examples/triton_client.py --url 127.0.0.1:8000 --clients 16 --requests 64   # throughput

Standard library and numpy only: KServe v2 HTTP/REST, inputs as JSON, outputs in Triton's binary
tensor extension. The same request from C++ or from `tritonclient` names the same tensors: see the
inputs documented in runtime/triton.py.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL = "gd_sampler"
_NP = {"UINT8": np.uint8, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}


class ClientError(RuntimeError):
    """The request failed; the message carries the server's reason or what went wrong on the way."""


@dataclass
class Samples:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, -1 for an unconditional build
    seconds: float


def request_samples(
    url: str,
    labels: Sequence[int] | None = None,
    *,
    num_samples: int | None = None,
    scale: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    first_index: int = 0,
    sampler: str | None = None,
    timeout: float = 600.0,
) -> Samples:
    """One `gd_sampler` request: labels (or num_samples) -> uint8 images, as the in-process
    `Pipeline.sample(labels, scale=, steps=f"ddim{steps}", seed=, first_index=)` gives them."""
    inputs = []

    def add(name, datatype, values):
        inputs.append({"name": name, "shape": [len(values)], "datatype": datatype, "data": values})

    if labels is not None:
        add("labels", "INT64", [int(v) for v in labels])
    if num_samples is not None:
        add("num_samples", "INT32", [int(num_samples)])
    if scale is not None:
        add("scale", "FP32", [float(scale)])
    if steps is not None:
        add("steps", "INT32", [int(steps)])
    if sampler is not None:
        add("sampler", "BYTES", [sampler])
    add("seed", "INT64", [int(seed)])
    add("first_index", "INT64", [int(first_index)])
    body = json.dumps(
        {
            "inputs": inputs,
            "outputs": [
                {"name": n, "parameters": {"binary_data": True}} for n in ("images", "labels")
            ],
        }
    ).encode()
    req = urllib.request.Request(
        f"http://{url}/v2/models/{MODEL}/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            header_len = int(r.headers.get("Inference-Header-Content-Length", 0))
            payload = r.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]
        except (ValueError, KeyError):
            pass
        raise ClientError(f"the server refused the request (HTTP {e.code}): {detail}") from None
    except (http.client.RemoteDisconnected, ConnectionError) as e:
        raise ClientError(
            f"the server at {url} closed the connection before answering ({type(e).__name__}): "
            f"it stopped or crashed mid-request; restart it and send the request again"
        ) from None
    except urllib.error.URLError as e:
        raise ClientError(
            f"cannot reach a Triton server at {url} ({e.reason}); is it running?"
        ) from None
    except TimeoutError:
        raise ClientError(f"no answer from {url} within {timeout:.0f} s") from None
    seconds = time.perf_counter() - t0
    return Samples(**_decode(payload, header_len), seconds=seconds)


def _decode(payload: bytes, header_len: int) -> dict[str, np.ndarray]:
    header = json.loads(payload[: header_len or len(payload)])
    out, offset = {}, header_len
    for o in header["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        dtype = _NP[o["datatype"]]
        if size is None:
            a = np.asarray(o["data"], dtype)
        else:
            a = np.frombuffer(payload[offset : offset + size], dtype)
            offset += size
        out[o["name"]] = a.reshape(o["shape"])
    return {"images": out["images"], "labels": out["labels"]}


def load_test(url: str, clients: int, requests: int, labels_per_request: list[int], **kw) -> dict:
    """`clients` threads sending `requests` requests in all, one at a time each; requests/s and
    latency percentiles."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                s = request_samples(url, labels_per_request, seed=i, **kw)
                with lock:
                    latencies.append(s.seconds)
            except ClientError as e:
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "samples_per_request": len(labels_per_request),
        "wall_s": wall,
        "requests_per_s": len(lat) / wall,
        "latency_median_s": statistics.median(lat) if lat else None,
        # nearest rank: the smallest latency at least 90% of requests did not exceed
        "latency_p90_s": lat[max(0, math.ceil(0.9 * len(lat)) - 1)] if lat else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8000", help="host:port of Triton's HTTP endpoint")
    ap.add_argument("--classes", default="0,1,2,3", help="comma-separated class ids")
    ap.add_argument("--scale", type=float, help="guidance scale (default: the build's)")
    ap.add_argument("--steps", type=int, help="DDIM steps (default: the build's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the images as one PNG grid")
    ap.add_argument("--clients", type=int, help="load test: concurrent clients")
    ap.add_argument("--requests", type=int, default=32, help="load test: requests in all")
    ap.add_argument("--json", type=Path, help="load test: write the figures as JSON")
    args = ap.parse_args()
    try:
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        sys.exit(f"error: --classes must be comma-separated integers, got {args.classes!r}")
    try:
        if args.clients:
            if args.clients < 1 or args.requests < 1:
                sys.exit("error: --clients and --requests must be at least 1")
            r = load_test(
                args.url, args.clients, args.requests, classes, scale=args.scale, steps=args.steps
            )
            print(
                f"{r['clients']} clients, {r['requests']} requests of {len(classes)} samples "
                f"({r['errors']} failed): {r['requests_per_s']:.2f} requests/s, latency median "
                f"{r['latency_median_s']:.2f} s, p90 {r['latency_p90_s']:.2f} s"
            )
            if args.json:
                args.json.write_text(json.dumps(r, indent=1) + "\n")
            return
        s = request_samples(args.url, classes, scale=args.scale, steps=args.steps, seed=args.seed)
    except ClientError as e:
        sys.exit(f"error: {e}")
    print(f"{len(s.images)} images {s.images.shape[1:]} in {s.seconds:.2f} s; labels {s.labels}")
    if args.out:
        from runtime.images import grid, png_bytes
        from runtime.manifest import write_bytes_atomic

        write_bytes_atomic(args.out, png_bytes(grid(s.images)))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
