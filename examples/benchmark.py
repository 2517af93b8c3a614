"""Benchmark a build: PyTorch eager reference vs its engines, side by side in one process and run.

    python examples/benchmark.py BUILD_DIR [--batch 1] [--steps ddim25] [--repeats 5] [--json out.json]

Per-call latency of each component (median and spread over repeated calls after warm-up, the
implementations alternating call by call so that machine load hits them alike), FLOPs per call
(counted with torch.utils.flop_counter on the reference) and achieved FLOP/s against the CPU's
peak, and the whole guided-sample time with the loop overhead (time outside engine calls).
Ratios are against the reference in the same run; no figure is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os

# torch's OpenMP threads spin while idle; on a shared 2-core machine that collapses its speed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from export import reference
from export.exporter import load_component_from_manifest
from export.parity import fit_feeds, parity_inputs, reference_output
from runtime.backends.onnxruntime import OrtBackend, physical_cores
from runtime.manifest import Manifest
from runtime.pipeline import Pipeline
from runtime.sampling import sample_ddim
from runtime.schedule import make_schedule

COMPONENT_OF = {"unet": "unet", "classifier_grad": "classifier", "upsampler": "upsampler"}


def cpu_peak_gflops(cores: int, clock_ghz: float | None = None) -> tuple[float, str]:
    """fp32 peak = cores x fp32 lanes per FMA x FMA pipes x 2 FLOP x clock, with the assumption stated."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(
        next((ln.split(":")[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    )
    vendor = next(
        (ln.split(":")[1].strip() for ln in info.splitlines() if ln.startswith("vendor_id")), ""
    )
    family = next(
        (ln.split(":")[1].strip() for ln in info.splitlines() if ln.startswith("cpu family")), ""
    )
    mhz = [float(ln.split(":")[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")]
    clock = clock_ghz or ((max(mhz) / 1000) if mhz else 2.5)
    source = "given" if clock_ghz else "from /proc/cpuinfo (a VM reports the base clock)"
    if vendor == "AuthenticAMD" and family == "25" and "avx512f" in flags:
        # Zen 4: AVX-512 runs on two 256-bit FMA pipes -> 16 fp32 FMAs per cycle per core.
        lanes, pipes, why = 8, 2, "Zen 4: 2 FMA pipes x 256-bit"
    elif "avx512f" in flags:
        lanes, pipes, why = 16, 2, "AVX-512: 2 FMA units x 512-bit (server Intel)"
    elif "fma" in flags:
        lanes, pipes, why = 8, 2, "AVX2: 2 FMA units x 256-bit"
    else:
        lanes, pipes, why = 4, 1, "SSE: no FMA"
    peak = cores * lanes * pipes * 2 * clock
    return (
        peak,
        f"{cores} cores x {lanes} fp32 lanes x {pipes} FMA pipes x 2 FLOP x {clock:.2f} GHz ({why}; clock {source})",
    )


def count_flops(role: str, model, feeds: dict[str, np.ndarray]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from export.onnx_export import selected_log_prob_sum
    from export.parity import reference_output

    with FlopCounterMode(display=False) as counter:
        if role == "classifier_grad":
            # autograd.grad trips the counter's hooks; backward() computes the same input gradient
            # (plus weight gradients the exported graph prunes, so this over-counts slightly).
            for p in model.parameters():
                p.requires_grad_(False)
            x = torch.from_numpy(feeds["x"]).requires_grad_(True)
            t, y = torch.from_numpy(feeds["t"]), torch.from_numpy(feeds["y"])
            selected_log_prob_sum(model(x, t), y).backward()
        else:
            reference_output(role, model, feeds)
    return float(counter.get_total_flops())


def per_call(
    manifest: Manifest, models: dict, batch: int, repeats: int, warmup: int = 2
) -> list[dict]:
    rows = []
    for role in ("unet", "classifier_grad", "upsampler"):
        arts = [a for a in manifest.artifacts if a.role == role and a.backend == "onnxruntime"]
        if not arts:
            continue
        model = models[COMPONENT_OF[role]]
        feeds = parity_inputs(role, model, batch, seed=0)
        impls = {"pytorch-eager": lambda f=feeds, m=model, r=role: reference_output(r, m, f)}
        backends = []
        for a in arts:
            b = OrtBackend(manifest.verify(a), batch=a.batch)
            backends.append(b)
            fb = fit_feeds(feeds, b.inputs)
            impls[f"ort-{a.precision}"] = lambda b=b, fb=fb: b(fb)
        for fn in impls.values():
            for _ in range(warmup):
                fn()
        times = {k: [] for k in impls}
        for _ in range(repeats):
            for name, fn in impls.items():  # alternate implementations call by call
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        flops = count_flops(role, model, feeds)
        ref = statistics.median(times["pytorch-eager"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({
                "component": role, "impl": name, "batch": batch, "median_s": med,
                "min_s": min(ts), "max_s": max(ts), "speedup_vs_ref": ref / med,
                "gflop": flops / 1e9, "gflops_per_s": flops / med / 1e9,
            })  # fmt: skip
        for b in backends:
            b.close()
    return rows


def ort_sweep(manifest: Manifest, models: dict, batch: int, repeats: int) -> list[dict]:
    """The fp32 UNet under ONNX Runtime session settings, against the runtime's own (OrtBackend):
    which settings matter on this machine. Alternating call by call, like `per_call`."""
    import onnxruntime as ort

    art = manifest.artifact("unet", "fp32", "onnxruntime")
    path = str(manifest.verify(art))
    feeds = parity_inputs("unet", models["unet"], batch, seed=0)
    level = ort.GraphOptimizationLevel
    variants = {
        "runtime default (all opts, N threads)": {},
        "graph opts: extended (no NCHWc layout)": {"level": level.ORT_ENABLE_EXTENDED},
        "graph opts: basic": {"level": level.ORT_ENABLE_BASIC},
        "1 intra-op thread": {"threads": 1},
        "no thread spinning": {"config": {"session.intra_op.allow_spinning": "0"}},
        "no CPU memory arena": {"arena": False},
        "I/O binding, preallocated output": {"io_binding": True},
    }
    runs = {}
    for name, v in variants.items():
        if not v:
            b = OrtBackend(path, batch=art.batch)
            fb = {k: x for k, x in feeds.items() if k in b.inputs}
            runs[name] = lambda b=b, fb=fb: b(fb)
            continue
        opts = ort.SessionOptions()
        opts.graph_optimization_level = v.get("level", level.ORT_ENABLE_ALL)
        opts.intra_op_num_threads = v.get("threads", physical_cores())
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = v.get("arena", True)
        for k, val in v.get("config", {}).items():
            opts.add_session_config_entry(k, val)
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        fb = {i.name: feeds[i.name] for i in sess.get_inputs()}
        if v.get("io_binding"):
            binding = sess.io_binding()
            for k, x in fb.items():
                binding.bind_cpu_input(k, x)
            out_shape = (batch, *[d for d in sess.get_outputs()[0].shape[1:]])
            out = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32, "cpu")
            binding.bind_ortvalue_output(sess.get_outputs()[0].name, out)
            runs[name] = lambda s=sess, bd=binding: s.run_with_iobinding(bd)
        else:
            runs[name] = lambda s=sess, fb=fb: s.run(None, fb)
    for fn in runs.values():
        fn()  # warm-up
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["runtime default (all opts, N threads)"])
    return [
        {"variant": k, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
         "vs_runtime_default": base / statistics.median(ts)}
        for k, ts in times.items()
    ]  # fmt: skip


def whole_sample(
    build: Path, manifest: Manifest, models: dict, batch: int, steps: str, repeats: int
) -> list[dict]:
    """Guided DDIM base stage: the same numpy sampler over the reference and over each precision."""
    base = manifest.components["unet"]
    n_classes = base.get("num_classes") or (manifest.components.get("classifier") or {}).get(
        "num_classes"
    )
    scale = float(manifest.sampling.get("scale") or 0.0) if "classifier" in models else 0.0
    labels = np.arange(batch, dtype=np.int64) % (n_classes or 1)
    schedule = make_schedule(
        base["diffusion"]["noise_schedule"], base["diffusion"]["diffusion_steps"], steps
    )
    size = base["image_size"]
    x_T = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    y = labels if base.get("num_classes") else None
    precisions = sorted(
        {a.precision for a in manifest.artifacts if a.role == "unet" and a.backend == "onnxruntime"}
    )
    pipes = {
        p: Pipeline.from_manifest(build, precision=p, backend="onnxruntime", upsampler=False)
        for p in precisions
    }

    def run_ref():
        grad = reference.grad_fn(models["classifier"], labels, scale) if scale else None
        t0 = time.perf_counter()
        sample_ddim(reference.model_fn(models["unet"], y=y), x_T, schedule,
                    learn_sigma=base["diffusion"]["learn_sigma"], grad_fn=grad)  # fmt: skip
        return time.perf_counter() - t0, None

    def run_pipe(p):
        r = pipes[p].sample(labels if n_classes else None, num_samples=batch, batch=batch, scale=scale,
                            steps=steps, init_noise=x_T, upsample=False)  # fmt: skip
        return r.timings["total_s"], r.timings["overhead_s"]

    impls = {
        "pytorch-eager": run_ref,
        **{f"ort-{p}": (lambda p=p: run_pipe(p)) for p in precisions},
    }
    for fn in impls.values():
        fn()  # warm-up
    times = {k: [] for k in impls}
    overhead = {k: [] for k in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            t, o = fn()
            times[name].append(t)
            if o is not None:
                overhead[name].append(o / t)
    for p in pipes.values():
        p.close()
    ref = statistics.median(times["pytorch-eager"])
    return [
        {
            "impl": name,
            "steps": steps,
            "batch": batch,
            "guidance_scale": scale,
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "speedup_vs_ref": ref / statistics.median(ts),
            "loop_overhead_share": statistics.median(overhead[name]) if overhead[name] else None,
        }  # fmt: skip
        for name, ts in times.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", default="ddim25")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per implementation")
    ap.add_argument(
        "--sample-repeats", type=int, default=2, help="timed whole samples per implementation"
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--ort-sweep", action="store_true",
        help="also time the fp32 UNet under other ONNX Runtime session settings",
    )  # fmt: skip
    ap.add_argument(
        "--clock-ghz", type=float, help="core clock for the peak (default: /proc/cpuinfo)"
    )
    args = ap.parse_args()
    torch.set_num_threads(physical_cores())
    manifest = Manifest.load(args.build)
    models = {name: load_component_from_manifest(manifest, name) for name in manifest.components}
    cores = physical_cores()
    peak, peak_why = cpu_peak_gflops(cores, args.clock_ghz)
    calls = per_call(manifest, models, args.batch, args.repeats)
    samples = whole_sample(
        args.build, manifest, models, args.batch, args.steps, args.sample_repeats
    )
    sweep = ort_sweep(manifest, models, args.batch, args.repeats) if args.ort_sweep else []
    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} cores; fp32 peak {peak:.0f} GFLOP/s = {peak_why}"
    )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); ONNX Runtime threads = {cores}\n"
    )
    print(
        f"{'component':<16} {'impl':<14} {'median':>9} {'min':>9} {'max':>9} {'vs ref':>7} {'GFLOP':>8} {'GFLOP/s':>8} {'% peak':>7}"
    )
    for r in calls:
        print(f"{r['component']:<16} {r['impl']:<14} {r['median_s'] * 1e3:>7.1f}ms {r['min_s'] * 1e3:>7.1f}ms "
              f"{r['max_s'] * 1e3:>7.1f}ms {r['speedup_vs_ref']:>6.2f}x {r['gflop']:>8.2f} "
              f"{r['gflops_per_s']:>8.1f} {100 * r['gflops_per_s'] / peak:>6.1f}%")  # fmt: skip
    if any(r["gflops_per_s"] > peak for r in calls):
        print(
            "note: a call beat the computed peak, so the cores run faster than the clock used "
            "(turbo/boost): pass --clock-ghz with the real one"
        )
    print(f"\nwhole guided sample (base stage, {args.steps}, batch {args.batch}):")
    for r in samples:
        ov = "-" if r["loop_overhead_share"] is None else f"{100 * r['loop_overhead_share']:.2f}%"
        print(
            f"  {r['impl']:<14} {r['median_s']:>8.3f} s  ({r['speedup_vs_ref']:.2f}x vs ref)  loop overhead {ov}"
        )
    if sweep:
        print("\nONNX Runtime settings, fp32 UNet call (ratio > 1: faster than the runtime's):")
        for r in sweep:
            print(
                f"  {r['variant']:<40} {r['median_s'] * 1e3:>8.1f} ms  {r['vs_runtime_default']:.3f}x"
            )
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cores": cores, "peak_gflops_fp32": peak, "peak_formula": peak_why,
                        "cpu": platform.processor(), "omp": os.environ.get("OMP_NUM_THREADS")},
            "per_call": calls, "whole_sample": samples, "ort_sweep": sweep,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
