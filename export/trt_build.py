"""ONNX graph -> TensorRT plan: `engine_from_onnx`, one optimisation profile from the batch range.

Precision lives in the ONNX graph (fp32, fp16 with fp32 islands, int8 Q/DQ): wherever TensorRT
has strongly typed networks (9.x, 10.x; every network in 11.x) the builder keeps the graph's types
and gets no precision flags. Only a TensorRT without them is told FP16 / INT8. The choices that
depend on the version are pure functions of the names the bindings have (`network_flags_for`,
`profile_shapes`), so they are tested without TensorRT.

TensorRT objects keep the names builder / network / parser / config / profile / cache: the test
checks every API name used on them against tests/data/trt_api_names.txt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from runtime.backends import BackendError
from runtime.backends.tensorrt import gpu_identity, import_tensorrt
from runtime.manifest import TensorSpec, write_bytes_atomic

PRECISIONS = ("fp32", "fp16", "int8")
# Builder flags a weakly typed network needs to run a graph of each precision in it.
_WEAK_FLAGS = {"fp32": [], "fp16": ["FP16"], "int8": ["FP16", "INT8"]}

Shape = tuple[int, ...]


class EngineBuildError(RuntimeError):
    """A plan that could not be built; nothing was written. The message says what to do."""


def trt_features(trt) -> frozenset[str]:
    """The flag names the installed TensorRT has: "NetworkDefinitionCreationFlag.X", "BuilderFlag.X"."""
    return frozenset(
        [
            f"NetworkDefinitionCreationFlag.{n}"
            for n in trt.NetworkDefinitionCreationFlag.__members__
        ]
        + [f"BuilderFlag.{n}" for n in trt.BuilderFlag.__members__]
    )


def network_flags_for(features: Collection[str], precision: str) -> tuple[list[str], list[str]]:
    """(NetworkDefinitionCreationFlag names, BuilderFlag names) to build a `precision` graph.

    `features`: what `trt_features` returns. Strongly typed where the flag exists (10.x; in 11.x
    it is a deprecated no-op, every network is strongly typed); no flag at all where it and the
    precision builder flags are both gone; builder flags only where there is no strong typing.
    """
    _check_precision(precision)
    if "NetworkDefinitionCreationFlag.STRONGLY_TYPED" in features:
        return ["STRONGLY_TYPED"], []
    if not any(f"BuilderFlag.{f}" in features for f in ("FP16", "INT8")):
        return [], []  # a TensorRT past 11 that dropped the flag: strongly typed is all there is
    creation = (
        ["EXPLICIT_BATCH"] if "NetworkDefinitionCreationFlag.EXPLICIT_BATCH" in features else []
    )
    missing = [f for f in _WEAK_FLAGS[precision] if f"BuilderFlag.{f}" not in features]
    if missing:
        raise EngineBuildError(
            f"this TensorRT has neither strongly typed networks nor BuilderFlag {missing}: "
            f"it cannot build a {precision} engine; install TensorRT 10.3 or later"
        )
    return creation, list(_WEAK_FLAGS[precision])


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise EngineBuildError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )


def _batch_range(batch: Mapping[str, int]) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (batch[k] for k in ("min", "opt", "max"))
    except KeyError as e:
        raise EngineBuildError(
            f"batch range {dict(batch)} lacks {e}: give min, opt and max"
        ) from None
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in (lo, opt, hi)):
        raise EngineBuildError(f"batch range must be integers, got {dict(batch)}")
    if not 1 <= lo <= opt <= hi:
        raise EngineBuildError(
            f"batch range must satisfy 1 <= min <= opt <= max, got min={lo} opt={opt} max={hi}; "
            f"fix --batch-min / --batch-opt / --batch-max"
        )
    return lo, opt, hi


def profile_shapes(
    inputs: Sequence[TensorSpec], batch: Mapping[str, int]
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input with a "batch" dimension; fixed-shape inputs (like the
    classifier gradient's scalar `scale`, shape ()) need none and are left out."""
    sizes = _batch_range(batch)
    shapes = {}
    for spec in inputs:
        symbols = [d for d in spec.shape if not isinstance(d, int)]
        if any(d != "batch" for d in symbols):
            raise EngineBuildError(
                f"input {spec.name!r} has shape {spec.shape}: only the symbolic dimension "
                f"'batch' can be given a range; re-export with fixed image sizes"
            )
        if symbols:
            shapes[spec.name] = tuple(
                tuple(b if d == "batch" else d for d in spec.shape) for b in sizes
            )
    return shapes


def engine_from_onnx(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    batch: Mapping[str, int],
    inputs: Sequence[TensorSpec],
    precision: str,
    timing_cache: str | Path | None = None,
    workspace_gb: float = 4.0,
    opt_level: int = 3,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build `plan_path` from an ONNX graph (external data beside it is found) for batches
    batch["min"]..batch["max"], tuned for batch["opt"]; `inputs` are the graph's inputs as the
    manifest lists them. The timing cache, when given, is read first and written back.

    Returns the fields the manifest records with the plan: tensorrt_version, gpu_name,
    compute_capability, precision, strongly_typed, builder_optimization_level, build_seconds.
    The plan is written atomically: a failed build leaves `plan_path` as it was.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    shapes = profile_shapes(inputs, batch)
    _check_precision(precision)
    if not onnx_path.is_file():
        raise EngineBuildError(
            f"ONNX graph {onnx_path} does not exist; run `gdexport export` first"
        )
    if not plan_path.parent.is_dir():
        raise EngineBuildError(
            f"cannot write {plan_path}: folder {plan_path.parent} does not exist"
        )
    try:
        trt = import_tensorrt()
        gpu_name, cc = gpu_identity(0)
    except BackendError as e:
        raise EngineBuildError(str(e)) from None
    creation, builder_flags = network_flags_for(trt_features(trt), precision)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    bits = sum(1 << int(getattr(trt.NetworkDefinitionCreationFlag, f)) for f in creation)
    network = builder.create_network(bits)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path} ({len(errors)} error(s)): "
            + "; ".join(errors[:8])
            + ("; ..." if len(errors) > 8 else "")
        )
    _check_network_inputs(network, inputs, shapes, onnx_path)

    config = builder.create_builder_config()
    for f in builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    # TF32 is on by default and would run the graph's fp32 convolutions and matmuls at ~10 bits.
    config.clear_flag(trt.BuilderFlag.TF32)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = opt_level
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    timing_cache = Path(timing_cache) if timing_cache is not None else None
    if timing_cache is not None:
        _load_timing_cache(config, timing_cache, log)

    log(f"building {plan_path.name} from {onnx_path.name} ({precision}, batch "
        f"{batch['min']}..{batch['max']}, TensorRT {trt.__version__}, {gpu_name})")  # fmt: skip
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not build {onnx_path.name} ({precision}, batch "
            f"{batch['min']}..{batch['max']}) on {gpu_name}: see its errors above; a larger "
            f"workspace (now {workspace_gb:g} GB) or a smaller --batch-max may help"
        )
    write_bytes_atomic(plan_path, plan)
    if timing_cache is not None:
        cache = config.get_timing_cache()
        write_bytes_atomic(timing_cache, cache.serialize())
    log(f"built {plan_path.name} in {seconds:.0f} s")
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu_name,
        "compute_capability": cc,
        "precision": precision,
        "strongly_typed": not builder_flags,
        "builder_optimization_level": opt_level,
        "build_seconds": round(seconds, 1),
    }


def _load_timing_cache(config, path: Path, log: Callable[[str], None]) -> None:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        # A cache from another TensorRT or GPU: start afresh (it is overwritten after the build).
        log(f"timing cache {path} is from another TensorRT version or GPU; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)


def _check_network_inputs(
    network, inputs: Sequence[TensorSpec], shapes: Mapping[str, Any], onnx_path: Path
) -> None:
    found = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        found[tensor.name] = tuple(tensor.shape)
    expected = [s.name for s in inputs]
    if sorted(found) != sorted(expected):
        raise EngineBuildError(
            f"{onnx_path.name} has inputs {sorted(found)}, the manifest lists {sorted(expected)}: "
            f"the graph and the manifest are from different exports; export again"
        )
    unranged = [n for n, shape in found.items() if -1 in shape and n not in shapes]
    if unranged:
        raise EngineBuildError(
            f"inputs {unranged} of {onnx_path.name} are dynamic ({ {n: found[n] for n in unranged} })"
            f" but the manifest gives them no 'batch' dimension; export again"
        )
