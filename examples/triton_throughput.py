"""Throughput of a build served by Triton on this machine: requests per second and latency at
1, 4 and 16 concurrent clients, with how far the dynamic batcher merged the UNet's step calls.

    python examples/triton_throughput.py BUILD_DIR [--clients 1,4,16] [--requests 2] [--samples 4]
        [--steps 25] [--json out.json]

Makes the repository (`gdexport triton`), serves it with the CPU harness (examples/triton_cpu.py:
the bundled tritonserver, engines through ONNX Runtime) and drives it with examples/triton_client.py.
`--requests` is per client, so every level runs the same number of rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from triton_client import load_test  # noqa: E402
from triton_cpu import TritonServer  # noqa: E402

from export.triton import make_repository  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--samples", type=int, default=4, help="samples per request")
    ap.add_argument("--steps", type=int, help="DDIM steps (default: the build's)")
    ap.add_argument("--queue-delay-us", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if min(levels) < 1 or args.requests < 1 or args.samples < 1:
        sys.exit("error: --clients, --requests and --samples must be at least 1")
    labels = [i % 10 for i in range(args.samples)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        make_repository(
            args.build, repo, sampler_instances=max(levels), queue_delay_us=args.queue_delay_us,
            max_samples=max(args.samples, 1),
        )  # fmt: skip
        with TritonServer(repo) as server:
            load_test(server.url, 1, 1, labels, steps=2)  # warm-up: sessions, first allocations
            for clients in levels:
                inf0, ex0 = server.executions("gd_unet")
                r = load_test(
                    server.url, clients, clients * args.requests, labels, steps=args.steps
                )
                inf1, ex1 = server.executions("gd_unet")
                r["unet_calls_batched"] = inf1 - inf0  # sample-steps the UNet computed
                r["unet_executions"] = ex1 - ex0
                r["samples_per_s"] = r["requests_per_s"] * args.samples
                rows.append(r)
                print(
                    f"{clients:3d} clients: {r['requests_per_s']:.2f} requests/s "
                    f"({r['samples_per_s']:.1f} samples/s), latency median "
                    f"{r['latency_median_s']:.2f} s, p90 {r['latency_p90_s']:.2f} s; UNet "
                    f"{r['unet_calls_batched']} sample-steps in {r['unet_executions']} executions"
                    f"{'; ' + str(r['errors']) + ' errors: ' + r['first_error'] if r['errors'] else ''}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
