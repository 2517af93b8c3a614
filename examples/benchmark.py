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
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from export import reference
from export.exporter import load_component_from_manifest
from export.parity import fit_feeds, parity_inputs, reference_output
from runtime.backends import BackendError
from runtime.backends.onnxruntime import OrtBackend, physical_cores
from runtime.cpu import cpu_info
from runtime.manifest import Manifest
from runtime.pipeline import Pipeline
from runtime.sampling import sample_ddim
from runtime.schedule import make_schedule

COMPONENT_OF = {"unet": "unet", "classifier_grad": "classifier", "upsampler": "upsampler"}


def cpu_peaks(cores: int, clock_ghz: float | None = None) -> dict[str, tuple[float, str]]:
    """Peak GFLOP/s (int8: GOP/s) per arithmetic: cores x operations per cycle per core x clock,
    the per-cycle figure from the units this CPU has (`runtime.cpu`), with the assumption stated.

    fp32: FMA lanes x pipes x 2. bf16: AMX-BF16's tile unit (1024 FLOP/cycle: a 16x16x32 bf16 tile
    product every 16 cycles) or AVX512-BF16's VDPBF16PS (two bf16 products per fp32 lane). int8:
    AMX-INT8 (2048 OP/cycle) or VNNI's VPDPBUSD (four u8 x s8 products per 32-bit lane); without
    either no int8 peak is given (16-bit pair sums, no faster than fp32 in practice)."""
    from runtime import cpu

    info = cpu.cpu_info()
    mhz = []
    if Path("/proc/cpuinfo").exists():
        mhz = [
            float(ln.split(":")[1])
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("cpu MHz")
        ]
    clock = clock_ghz or ((max(mhz) / 1000) if mhz else 2.5)
    source = "given" if clock_ghz else "from /proc/cpuinfo (a VM reports the base clock)"
    zen4 = info["vendor"] == "AuthenticAMD" and info["family"] == "25" and cpu.has("avx512f")
    if zen4:  # AVX-512 on two 256-bit pipes
        width, unit = 8, "Zen 4: 2 FMA pipes x 256-bit"
    elif cpu.has("avx512f"):
        width, unit = 16, "AVX-512: 2 FMA units x 512-bit"
    elif cpu.has("fma"):
        width, unit = 8, "AVX2: 2 FMA units x 256-bit"
    else:
        width, unit = 4, "SSE, no FMA: 1 unit x 128-bit"
    pipes = 2 if cpu.has("fma") else 1
    per_cycle = {"fp32": (width * pipes * 2, f"{width} fp32 lanes x {pipes} pipes x 2 ({unit})")}
    if cpu.has("amx_bf16"):
        per_cycle["bf16"] = (1024, "AMX-BF16 tile unit, 1024 FLOP/cycle")
    elif cpu.has("avx512_bf16"):
        per_cycle["bf16"] = (
            width * pipes * 4,
            f"VDPBF16PS: {width} lanes x 2 products x {pipes} pipes x 2",
        )
    if cpu.has("amx_int8"):
        per_cycle["int8"] = (2048, "AMX-INT8 tile unit, 2048 OP/cycle")
    elif cpu.has("avx512_vnni") or cpu.has("avx_vnni"):
        lanes = width if cpu.has("avx512_vnni") else 8
        per_cycle["int8"] = (
            lanes * pipes * 8,
            f"VPDPBUSD: {lanes} lanes x 4 products x {pipes} pipes x 2",
        )
    return {
        k: (
            cores * n * clock,
            f"{cores} cores x {n}/cycle ({why}) x {clock:.2f} GHz (clock {source})",
        )
        for k, (n, why) in per_cycle.items()
    }


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


def autocast_bf16(fn):
    """`fn` under PyTorch's CPU bf16 autocast: what a PyTorch user would try on bf16 units."""

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()

    return run


def engine_impls(manifest: Manifest, role: str) -> dict[str, tuple]:
    """name -> (open the backend, artefact) for every engine of `role` this machine runs: each
    ONNX graph on ONNX Runtime and on OpenVINO (where installed), each OpenVINO IR on OpenVINO."""
    import importlib.util

    from runtime.backends.openvino import OvBackend

    has_ov = importlib.util.find_spec("openvino") is not None
    impls = {}
    for a in manifest.artifacts:
        if a.role != role:
            continue
        if a.backend == "onnxruntime":
            impls[f"ort-{a.precision}"] = (
                lambda a=a: OrtBackend(manifest.verify(a), batch=a.batch),
                a,
            )
            if has_ov:
                impls[f"ov-{a.precision}"] = (
                    lambda a=a: OvBackend(manifest.verify(a), batch=a.batch),
                    a,
                )
        elif a.backend == "openvino" and has_ov:
            prec = "bf16" if a.precision == "bf16" else "fp32"
            impls[f"ov-{a.precision}"] = (
                lambda a=a, p=prec: OvBackend(manifest.verify(a), precision=p, batch=a.batch),
                a,
            )
    return impls


def arithmetic(impl: str) -> str:
    """Which peak an implementation is judged against."""
    return "int8" if impl.endswith("int8") else "bf16" if impl.endswith("bf16") else "fp32"


def per_call(
    manifest: Manifest, models: dict, batch: int, repeats: int, warmup: int = 2
) -> list[dict]:
    rows = []
    for role in ("unet", "classifier_grad", "upsampler"):
        engines = engine_impls(manifest, role)
        if not engines:
            continue
        model = models[COMPONENT_OF[role]]
        feeds = parity_inputs(role, model, batch, seed=0)
        eager = lambda f=feeds, m=model, r=role: reference_output(r, m, f)  # noqa: E731
        impls = {"pytorch-eager": eager, "pytorch-bf16": autocast_bf16(eager)}
        backends = []
        for name, (open_, _) in engines.items():
            b = open_()
            backends.append(b)
            fb = fit_feeds(feeds, b.inputs)
            impls[name] = lambda b=b, fb=fb: next(iter(b(fb).values()))
        want = eager().astype(np.float64)
        errors = {
            k: float(np.abs(np.asarray(fn(), np.float64) - want).max() / np.abs(want).max())
            for k, fn in impls.items()
        }
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
                "rel_error_vs_fp32_ref": errors[name], "arithmetic": arithmetic(name),
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
    pipes = {}
    for a in manifest.artifacts:
        if a.role != "unet":
            continue
        kinds = (
            [("ort", "onnxruntime"), ("ov", "openvino")]
            if a.backend == "onnxruntime"
            else [("ov", a.backend)]
        )
        for short, backend in kinds:
            try:
                pipes[f"{short}-{a.precision}"] = Pipeline.from_manifest(
                    build, engine=manifest.path_of(a), backend=backend, upsampler=False
                )
            except BackendError as e:
                print(f"note: no {short}-{a.precision} row ({e})")

    def run_ref():
        grad = reference.grad_fn(models["classifier"], labels, scale) if scale else None
        t0 = time.perf_counter()
        sample_ddim(reference.model_fn(models["unet"], y=y), x_T, schedule,
                    learn_sigma=base["diffusion"]["learn_sigma"], grad_fn=grad)  # fmt: skip
        return time.perf_counter() - t0, None

    def run_ref_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run_ref()

    def run_pipe(p):
        r = pipes[p].sample(labels if n_classes else None, num_samples=batch, batch=batch, scale=scale,
                            steps=steps, init_noise=x_T, upsample=False)  # fmt: skip
        return r.timings["total_s"], r.timings["overhead_s"]

    impls = {
        "pytorch-eager": run_ref,
        "pytorch-bf16": run_ref_bf16,
        **{name: (lambda p=name: run_pipe(p)) for name in pipes},
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
    peaks = cpu_peaks(cores, args.clock_ghz)
    calls = per_call(manifest, models, args.batch, args.repeats)
    samples = whole_sample(
        args.build, manifest, models, args.batch, args.steps, args.sample_repeats
    )
    sweep = ort_sweep(manifest, models, args.batch, args.repeats) if args.ort_sweep else []
    info = cpu_info()
    print(f"machine: {info['model']}, {cores} cores; units: {', '.join(info['features'])}")
    for k, (peak, why) in peaks.items():
        print(f"  {k} peak {peak:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s = {why}")
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); engine threads = {cores}\n"
    )
    print(
        f"{'component':<16} {'impl':<14} {'median':>9} {'min':>9} {'max':>9} {'vs ref':>7} "
        f"{'rel err':>8} {'GFLOP':>8} {'GFLOP/s':>8} {'% peak':>7}"
    )
    beat = False
    for r in calls:
        peak = peaks.get(r["arithmetic"], (None, ""))[0]
        share = "-" if peak is None else f"{100 * r['gflops_per_s'] / peak:.1f}%"
        beat |= peak is not None and r["gflops_per_s"] > peak
        print(f"{r['component']:<16} {r['impl']:<14} {r['median_s'] * 1e3:>7.1f}ms {r['min_s'] * 1e3:>7.1f}ms "
              f"{r['max_s'] * 1e3:>7.1f}ms {r['speedup_vs_ref']:>6.2f}x {r['rel_error_vs_fp32_ref']:>8.1e} "
              f"{r['gflop']:>8.2f} {r['gflops_per_s']:>8.1f} {share:>7}")  # fmt: skip
    print(
        "rel err: max |out - fp32 reference| / max |fp32 reference|; % peak against the peak of "
        "the row's arithmetic (int8 rows: int8 peak, bf16 rows: bf16 peak, else fp32)"
    )
    if beat:
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
            "machine": {"cores": cores, "cpu": info, "omp": os.environ.get("OMP_NUM_THREADS"),
                        "peaks_g_per_s": {k: {"peak": v, "formula": w} for k, (v, w) in peaks.items()}},
            "per_call": calls, "whole_sample": samples, "ort_sweep": sweep,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
