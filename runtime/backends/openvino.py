"""OpenVINO backend: the build's ONNX graphs (or its OpenVINO IR files) on the CPU plugin.

Precision follows the graph: fp32 and int8 Q/DQ graphs run with fp32 arithmetic outside the
quantised ops (OpenVINO's CPU plugin would otherwise pick bf16 by itself on CPUs with bf16
units); bf16 runs only where asked (`precision="bf16"`). Construction reads, fixes and compiles
the model once; with `cache_dir` the compiled blob is kept there for the next start.

One fix is applied to every model read: OpenVINO 2025-2026 computes a ConvTranspose
(ConvolutionBackpropData) wrongly when its weight constant is shared with another op, which is
exactly what the classifier's input-gradient graph holds (the backward of each convolution
reuses its forward weight). Each such op gets its own copy of the constant.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from runtime.backends import BackendError, check_feeds
from runtime.manifest import TensorSpec

INSTALL = "pip install 'gdexport[openvino]'"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
_OV_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64", "i32": "int32"}
_DECONV = ("ConvolutionBackpropData", "GroupConvolutionBackpropData")


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendError(f"the OpenVINO backend needs openvino: {INSTALL}") from None
    return openvino


def cpu_has_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin has native bf16 here (AVX512-BF16 or AMX-BF16)."""
    ov = import_openvino()
    core = core or ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def unshare_deconv_weights(model) -> int:
    """Give every ConvTranspose whose weight constant has other consumers its own copy of it
    (the OpenVINO bug above). Returns how many were unshared."""
    import_openvino()
    from openvino import opset13 as ops

    fixed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in _DECONV:
            continue
        src = op.input(1).get_source_output()
        node = src.get_node()
        if node.get_type_name() != "Constant" or len(src.get_target_inputs()) < 2:
            continue
        copy = ops.constant(np.array(node.get_data(), copy=True), dtype=node.get_element_type())
        op.input(1).replace_source_output(copy.output(0))
        fixed += 1
    if fixed:
        model.validate_nodes_and_infer_types()
    return fixed


def read_model(path: str | Path, core=None):
    """An ov.Model of an ONNX graph or an IR `.xml`, with the ConvTranspose fix applied."""
    return _read(path, core)[0]


_KNOWN = "gdexport_graphs.json"


def _graph_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _known_graph(cache_dir: Path, path: Path) -> tuple[list[str], list[str]] | None:
    """(input names, output names) of a graph read before that needed no fix, else None."""
    import json

    try:
        entry = json.loads((cache_dir / _KNOWN).read_text()).get(_graph_key(path))
    except (OSError, ValueError):
        return None
    return (entry["inputs"], entry["outputs"]) if entry else None


def _remember_graph(cache_dir: Path, path: Path, inputs: list[str], outputs: list[str]) -> None:
    import json

    from runtime.manifest import write_json_atomic

    try:
        known = json.loads((cache_dir / _KNOWN).read_text())
    except (OSError, ValueError):
        known = {}
    known[_graph_key(path)] = {"inputs": inputs, "outputs": outputs}
    try:
        write_json_atomic(cache_dir / _KNOWN, known)
    except OSError:
        pass


def _read(path: str | Path, core=None):
    """(ov.Model with the ConvTranspose fix applied, how many ops it fixed)."""
    ov = import_openvino()
    core = core or ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as e:  # OpenVINO raises RuntimeError with a multi-line message
        raise BackendError(
            f"OpenVINO cannot read {path}: {str(e).strip().splitlines()[0]} "
            f"(a corrupt or truncated file: rebuild it)"
        ) from None
    return model, unshare_deconv_weights(model)


class OvBackend:
    """A compiled OpenVINO model behind the Backend protocol.

    `precision`: "fp32" (default) or "bf16" arithmetic; `threads`: inference threads (default:
    physical cores); `cache_dir`: a folder for OpenVINO's compiled-model cache (default: none);
    `device`: an OpenVINO device name
    ("CPU", "GPU", "NPU"); `batch`: the manifest's batch range, checked on every call.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        device: str = "CPU",
        batch: Mapping[str, int] | None = None,
    ):
        ov = import_openvino()
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"engine {path} does not exist")
        core = ov.Core()
        if device not in core.available_devices:
            raise BackendError(
                f"OpenVINO device {device!r} is not available here (available: "
                f"{', '.join(core.available_devices)})"
            )
        if precision not in PRECISION_HINTS:
            raise BackendError(
                f"the OpenVINO backend runs fp32 or bf16 arithmetic, not {precision!r} (int8 "
                f"comes from the graph's Q/DQ nodes: run an int8 graph at fp32)"
            )
        if precision == "bf16" and device == "CPU" and not cpu_has_bf16(core):
            raise BackendError(
                "this CPU has no bf16 units (AVX512-BF16 or AMX), so OpenVINO would emulate bf16 "
                "slowly; run the fp32 artefacts (--precision fp32) on this machine"
            )
        config = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if device == "CPU":
            from runtime.backends.onnxruntime import physical_cores

            config["INFERENCE_NUM_THREADS"] = int(threads or physical_cores())
        # With a cache, a graph known to need no fix is compiled from its path: OpenVINO then
        # loads the compiled blob without reading the graph at all (adm-64 UNet: 0.8 s vs 8.5 s).
        known = None
        if cache_dir is not None:
            cache_dir = Path(cache_dir)
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache_dir)
                known = _known_graph(cache_dir, path)
            except OSError:
                cache_dir = None  # a read-only build folder: no cache, same results
        if known is not None:
            model, (names_in, names_out) = str(path), known
        else:
            model, fixed = _read(path, core)
            # A compiled port may carry several tensor names (a Cast folded into an input adds
            # its output's name): keep the graph's own input and output names.
            names_in = [p.get_node().get_friendly_name() for p in model.inputs]
            names_out = [_result_name(p) for p in model.outputs]
            if cache_dir is not None and fixed == 0:
                _remember_graph(cache_dir, path, names_in, names_out)
        try:
            self.compiled = core.compile_model(model, device, config)
        except Exception as e:
            raise BackendError(
                f"OpenVINO cannot compile {path.name} for {device}: "
                f"{str(e).strip().splitlines()[0]}"
            ) from None
        self.request = self.compiled.create_infer_request()
        self.path = path
        self.precision = precision
        self.batch = dict(batch) if batch else None
        self.inputs = {n: _spec(p, n) for n, p in zip(names_in, self.compiled.inputs)}
        self.outputs = {n: _spec(p, n) for n, p in zip(names_out, self.compiled.outputs)}
        self._ports = list(self.compiled.outputs)
        self._index = {n: i for i, n in enumerate(self.inputs)}

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.inputs, feeds, self.batch)
        self.request.infer({self._index[k]: np.ascontiguousarray(v) for k, v in feeds.items()})
        # The request reuses its output tensors: the caller gets copies it owns.
        return {
            name: np.array(self.request.get_tensor(port).data, copy=True)
            for name, port in zip(self.outputs, self._ports)
        }

    def close(self) -> None:
        self.request = None
        self.compiled = None

    def __enter__(self) -> OvBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _result_name(port) -> str:
    """The graph output's name: OpenVINO calls the Result of output `out` "out/sink_port_0"."""
    names = port.get_names()
    own = port.get_node().get_friendly_name().rsplit("/sink_port_", 1)[0]
    return own if own in names or not names else sorted(names)[0]


def _spec(port, name: str) -> TensorSpec:
    ty = port.get_element_type().get_type_name()
    shape = tuple(d.get_length() if d.is_static else "batch" for d in port.get_partial_shape())
    return TensorSpec(name, _OV_TYPES.get(ty, ty), shape)
