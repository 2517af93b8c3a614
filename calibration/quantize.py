"""Q/DQ int8 graphs that ONNX Runtime and TensorRT both run, calibrated on the recorded trajectories.

ONNX Runtime's static quantiser in QDQ format, set up for TensorRT's explicit quantisation:
symmetric int8 activations and weights (every zero point 0), per-channel weight scales (axis 0,
the output channels), per-tensor activation scales, the bias left in float (no int32 bias), one
dedicated Q/DQ pair per consumer. Only Conv, Gemm and MatMul are quantised; everything between them
(GroupNorm, SiLU, Add, Resize, ...) computes in float, as TensorRT's own Q/DQ placement recipe does.

Some layers stay in float by default (`DEFAULT_KEEP`, each found by its place in the data flow, so
the rules hold for the dynamo exporter's names and for the gradient graph whose weights lost theirs):

    first-conv  the first convolution on the image: it reads x_t, whose range spans the whole schedule
    last-conv   the last convolution: it writes eps and the variance, so its error is output error
    embedding   everything computed from t and y alone: the timestep MLP, the class embedding and
                every ResBlock's scale/shift projection. A (B, 4C) vector, a negligible share of the
                FLOPs, but its error modulates every normalisation layer of the network
    attention   attention's activation-by-activation products (QK^T, softmax V) and the softmax:
                their ranges swing with t and int8 rounds the small attention weights to zero
    skip        the 1x1 skip-connection convolutions on the residual path (channel changes)

`--keep-fp32 PATTERN` adds layers by node name or weight name (fnmatch: "*middle_block*").
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.dataset import CalibrationSet

OP_TYPES = ("Conv", "Gemm", "MatMul")
CATEGORIES = {
    "first-conv": "the first convolution on the image (reads x_t, whose range spans the schedule)",
    "last-conv": "the last convolution (writes eps and the variance: its error is output error)",
    "embedding": "computed from t and y alone (timestep MLP, class embedding, ResBlock scale/shift "
    "projections): negligible FLOPs, and their error modulates every normalisation layer",
    "attention": "attention's activation x activation products and softmax (ranges swing with t)",
    "skip": "1x1 skip-connection convolutions on the residual path",
}
DEFAULT_KEEP = tuple(CATEGORIES)
CALIB_METHODS = ("percentile", "entropy", "minmax")
PERCENTILE = 99.999


class QuantizeError(RuntimeError):
    """A graph that could not be quantised; the message says what to do."""


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
        "minmax": CalibrationMethod.MinMax,
    }
    if name not in methods:
        raise QuantizeError(f"calibration method must be one of {', '.join(methods)}, got {name!r}")
    return methods[name]


# -- which layers stay in float ------------------------------------------------------------------


def _image_inputs(graph) -> set[str]:
    """Graph inputs that are float images (rank 4): x, and low_res for the upsampler."""
    return {
        i.name
        for i in graph.input
        if i.type.tensor_type.elem_type in (1, 10) and len(i.type.tensor_type.shape.dim) == 4
    }


def _from_images(graph) -> set[str]:
    """Every tensor that depends on an image input (nodes are topologically sorted in ONNX)."""
    reached = _image_inputs(graph)
    for node in graph.node:
        if any(i in reached for i in node.input):
            reached.update(node.output)
    return reached


def sensitive_nodes(
    model, keep: Iterable[str] = DEFAULT_KEEP, *, op_types: Sequence[str] = OP_TYPES
) -> dict[str, str]:
    """{node name: why it stays in float} for the categories and fnmatch patterns in `keep`.

    A pattern matches a node's name or the name of any initializer it reads ("*skip_connection*").
    Only nodes that would otherwise be quantised (`op_types`), and Einsum / Softmax / Gather for the
    record, are listed.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts = set(inits) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    image = _from_images(graph)
    listed = set(op_types) | {"Einsum", "Softmax", "Gather"}
    convs = [n for n in graph.node if n.op_type == "Conv" and n.input[0] in image]
    keep = list(keep)
    out: dict[str, str] = {}

    def add(node, why):
        if node.op_type in listed and node.name not in out:
            out[node.name] = why

    for item in keep:
        if item == "first-conv" and convs:
            add(convs[0], item)
        elif item == "last-conv" and convs:
            add(convs[-1], item)
        elif item == "embedding":
            for n in graph.node:
                if not any(i in image for i in n.input) and any(i not in consts for i in n.input):
                    add(n, item)
        elif item == "attention":
            for n in graph.node:
                if n.op_type == "Softmax" or (
                    n.op_type in ("MatMul", "Einsum")
                    and not any(i in consts for i in n.input)
                    and any(i in image for i in n.input)
                ):
                    add(n, item)
        elif item == "skip":
            for n in convs[1:-1]:
                w = inits.get(n.input[1])
                named = "skip_connection" in n.input[1]
                if named or (w is not None and len(w.dims) == 4 and tuple(w.dims[2:]) == (1, 1)):
                    add(n, item)
        elif item in CATEGORIES:
            pass
        else:
            for n in graph.node:
                names = [n.name] + [i for i in n.input if i in inits]
                if any(fnmatch.fnmatchcase(s, item) for s in names):
                    add(n, f"pattern {item}")
    return out


def _name_nodes(model) -> None:
    """Give unnamed nodes unique names: the quantiser excludes nodes by name."""
    seen = {n.name for n in model.graph.node if n.name}
    for k, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{k}"
            while name in seen:
                name += "_"
            n.name = name
            seen.add(name)


def _unshare_weights(model, op_types: Sequence[str] = OP_TYPES) -> int:
    """Give every consumer of a shared weight its own copy; returns the copies made.

    The gradient graph's backward ConvTranspose reads the same initializer as the forward Conv:
    quantising it would hand the backward pass a weight-only DQ (which TensorRT does not take
    for convolutions) and share one DQ between two nodes.
    """
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            if name in inits:
                users.setdefault(name, []).append((n, k))
    copies = 0
    for name, uses in users.items():
        if len(uses) < 2 or not any(n.op_type in op_types for n, _ in uses):
            continue
        for j, (n, k) in enumerate(uses[1:], start=1):
            copy = type(inits[name])()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}.copy{j}"
            model.graph.initializer.append(copy)
            n.input[k] = copy.name
            copies += 1
    return copies


# -- the data reader ------------------------------------------------------------------------------


class ShardReader:
    """`onnxruntime.quantization.CalibrationDataReader` over one role's recorded calls.

    Supports `set_range`, so the quantiser can collect statistics a chunk at a time (its histogram
    calibrators otherwise keep every intermediate tensor of every call in memory).
    """

    def __init__(self, calib: CalibrationSet, role: str, inputs: Iterable[str] | None = None):
        self.calib = calib
        self.role = role
        self.inputs = None if inputs is None else set(inputs)
        # (shard position, call index) of every recorded call, in order
        self.index = [
            (k, c) for k, s in enumerate(calib.shards) for c in range(s.calls.get(role, 0))
        ]
        if not self.index:
            raise QuantizeError(
                f"the calibration set in {calib.folder} has no {role} calls; record it with a "
                f"build that has that component (and a guidance scale > 0 for the classifier)"
            )
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None
        self.set_range(0, len(self.index))

    def __len__(self) -> int:
        return len(self.index)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pos, self._end = start_index, min(end_index, len(self.index))

    def _arrays(self, k: int) -> dict[str, np.ndarray]:
        if self._cache is None or self._cache[0] != k:
            self._cache = (k, self.calib.shard_arrays(self.calib.shards[k], self.role))
        return self._cache[1]

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._end:
            return None
        k, c = self.index[self._pos]
        self._pos += 1
        arrays = self._arrays(k)
        return {
            name: np.array(a[c])
            for name, a in arrays.items()
            if self.inputs is None or name in self.inputs
        }

    def rewind(self) -> None:
        self.set_range(0, len(self.index))

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _chunk(total: int, limit: int) -> int:
    """The largest divisor of `total` not above `limit` (the quantiser wants equal chunks)."""
    return max(d for d in range(1, min(total, limit) + 1) if total % d == 0)


# -- quantisation ---------------------------------------------------------------------------------


@dataclass
class QuantizeResult:
    path: Path
    method: str
    excluded: dict[str, str]
    quantized_nodes: list[str]
    calibration_calls: int
    extra_options: dict[str, Any] = field(default_factory=dict)

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "calibration": {
                "method": self.method,
                "percentile": PERCENTILE if self.method == "percentile" else None,
                "calls": self.calibration_calls,
            },
            "quantized_nodes": len(self.quantized_nodes),
            "excluded_nodes": self.excluded,
            "quantization": {
                "format": "QDQ",
                "weights": "int8 symmetric per-channel (axis 0)"
                + (", 7-bit range [-63, 63]" if self.extra_options.get("ReduceRange") else ""),
                "reduce_range": bool(self.extra_options.get("ReduceRange")),
                "activations": "int8 symmetric per-tensor",
                "bias": "float (not quantised)",
                "op_types": list(OP_TYPES),
            },
        }


def quantize_graph(
    fp32_path: str | Path,
    out_path: str | Path,
    calib: CalibrationSet,
    role: str,
    *,
    method: str = "percentile",
    keep: Iterable[str] = DEFAULT_KEEP,
    chunk_calls: int = 8,
    reduce_range: bool = False,
    log: Callable[[str], None] = print,
) -> QuantizeResult:
    """Write the Q/DQ int8 graph of `fp32_path` to `out_path`, calibrated on `role`'s calls.

    `reduce_range`: 7-bit weights ([-63, 63]). ONNX Runtime's x86 int8 kernels on CPUs without
    AVX-512 VNNI multiply u8 x s8 pairs into saturating int16 sums (vpmaddubsw), which full-range
    weights overflow: measured on an AVX2 machine, the tests' UNet went from 6% relative RMS error
    (the Q/DQ graph computed in float) to 34%; 7-bit weights cannot overflow there. TensorRT
    needs no such margin.

    Raises QuantizeError when the quantiser fails or quantises nothing.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    calibrate_method = _calibration_method(method)
    model = onnx.load(str(fp32_path))
    _name_nodes(model)
    _unshare_weights(model)
    keep = list(keep)
    excluded = sensitive_nodes(model, keep)
    used = set(excluded.values())
    for item in keep:
        if item not in CATEGORIES and f"pattern {item}" not in used:
            log(f"note: --keep-fp32 {item!r} matches no Conv/Gemm/MatMul node of {fp32_path.name}")
    candidates = [n.name for n in model.graph.node if n.op_type in OP_TYPES]
    inputs = {i.name for i in model.graph.input}
    reader = ShardReader(calib, role, inputs)
    large = fp32_path.stat().st_size > 3 << 29  # 1.5 GiB: protobuf stops at 2 GiB
    extra_options = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "DedicatedQDQPair": True,
        "CalibTensorRangeSymmetric": True,
        "CalibStridedMinMax": _chunk(len(reader), chunk_calls),
    }
    if method == "percentile":
        extra_options["CalibPercentile"] = PERCENTILE
    log(
        f"quantising {fp32_path.name} -> {out_path.name} ({method} calibration on {len(reader)} "
        f"{role} calls; {len(excluded)} sensitive node(s) kept in float)"
    )
    with tempfile.TemporaryDirectory(prefix="gdexport-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        _preprocess(model, pre, large)
        del model
        try:
            with _quiet():
                quantize_static(
                    str(pre), str(out_path), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(OP_TYPES), per_channel=True, reduce_range=reduce_range,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(excluded), calibrate_method=calibrate_method,
                    use_external_data_format=large, extra_options=extra_options,
                )  # fmt: skip
        except Exception as e:
            raise QuantizeError(
                f"ONNX Runtime could not quantise {fp32_path.name}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            ) from e
    # The build loop runs the TensorRT op check on this graph like on every other.
    q = onnx.load(str(out_path), load_external_data=False)
    quantized = _quantized_nodes(q, candidates)
    if not quantized:
        raise QuantizeError(
            f"nothing in {fp32_path.name} was quantised ({len(candidates)} Conv/Gemm/MatMul nodes, "
            f"{len(excluded)} kept in float): loosen --keep-fp32"
        )
    recorded = {k: v for k, v in extra_options.items() if k != "CalibStridedMinMax"}
    recorded["ReduceRange"] = reduce_range
    return QuantizeResult(out_path, method, excluded, quantized, len(reader), recorded)


@contextlib.contextmanager
def _quiet():
    """The quantiser prints progress to stdout and warns on the root logger: keep the CLI clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _preprocess(model, path: Path, large: bool) -> None:
    """ONNX shape inference for the quantiser (ORT's `quant_pre_process`), without its graph
    optimisations, which would fuse ops into com.microsoft kernels TensorRT cannot parse, and
    without symbolic shape inference, which gives up on the exported graphs' Reshape chains."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(
            model, str(path), skip_optimization=True, skip_symbolic_shape=True,
            save_as_external_data=large,
        )  # fmt: skip
    except Exception:
        onnx.save(model, str(path), save_as_external_data=large)


def _quantized_nodes(model, candidates: Sequence[str]) -> list[str]:
    """Names of Conv/Gemm/MatMul nodes whose first input comes out of a DequantizeLinear."""
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    names = set(candidates)
    return [
        n.name
        for n in model.graph.node
        if n.name in names and n.op_type in OP_TYPES and n.input[0] in dq_out
    ]


def describe_exclusions(excluded: Mapping[str, str]) -> str:
    """ "first-conv 1, embedding 19, ..." for the log."""
    counts: dict[str, int] = {}
    for why in excluded.values():
        counts[why] = counts.get(why, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
