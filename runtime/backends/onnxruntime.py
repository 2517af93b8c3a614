"""ONNX Runtime backend: CPU by default, the CUDA / TensorRT execution providers on request."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from runtime.backends import BackendError
from runtime.manifest import TensorSpec

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(double)": "float64",
}


def physical_cores() -> int:
    """Physical cores (ONNX Runtime's intra-op threads scale with cores, not hyperthreads)."""
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        n = len(cores)
    except OSError:
        n = 0
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(n or avail or 1, avail or 1))


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError(
            "the ONNX Runtime backend needs onnxruntime: pip install 'gdexport[ort]' "
            "(or onnxruntime-gpu for the CUDA provider)"
        ) from None
    return onnxruntime


class OrtBackend:
    """An `onnxruntime.InferenceSession` behind the Backend protocol.

    `providers`: names like "CPUExecutionProvider", "CUDAExecutionProvider",
    "TensorrtExecutionProvider" (default CPU only); `threads`: intra-op threads (default: physical
    cores); `spin`: let idle worker threads spin between calls (ORT's default; turn off where
    several processes share the cores); `optimized_path`: where ORT saves the optimised graph
    (kept for the next start);
    `ort_optimized`: a manifest's record of the graph ORT optimised at build time, used when this
    onnxruntime is the version that saved it and its sha256 matches.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        optimized_path: str | Path | None = None,
        batch: Mapping[str, int] | None = None,
        ort_optimized: Mapping[str, str] | None = None,
        spin: bool = True,
    ):
        ort = _import_ort()
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"engine {path} does not exist")
        if ort_optimized and ort_optimized.get("onnxruntime") == ort.__version__:
            # The build saved ORT's optimised graph: start from it (checked like the graph itself).
            from runtime.manifest import sha256_of

            opt = path.with_name(ort_optimized["file"])
            if opt.is_file() and sha256_of(opt) == ort_optimized["sha256"]:
                path = opt
            else:
                _warn_once(
                    f"warning: {opt} is {'corrupt (sha256 mismatch)' if opt.is_file() else 'missing'}"
                    f"; starting from {path.name} instead (slower to open, same results). "
                    f"Rebuild the folder to restore it"
                )
        providers = list(providers or ["CPUExecutionProvider"])
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendError(
                f"ONNX Runtime providers {missing} are not available here (available: "
                f"{available}); install onnxruntime-gpu for CUDA / TensorRT providers"
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        if not spin:
            # Idle worker threads sleep instead of spinning: for processes sharing cores with
            # others (a server's model instances), at a small cost per call.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if optimized_path is not None:
            opts.optimized_model_filepath = str(optimized_path)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types
            raise BackendError(
                f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]} "
                f"(a corrupt or truncated file: rebuild it)"
            ) from None
        self.path = path
        self.batch = dict(batch) if batch else None
        self.inputs = {
            i.name: TensorSpec(i.name, _ORT_TYPES.get(i.type, i.type), _shape(i.shape))
            for i in self.session.get_inputs()
        }
        self.outputs = {
            o.name: TensorSpec(o.name, _ORT_TYPES.get(o.type, o.type), _shape(o.shape))
            for o in self.session.get_outputs()
        }
        self._output_names = list(self.outputs)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from runtime.backends import check_feeds

        check_feeds(self.inputs, feeds, self.batch)
        results = self.session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, results))

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shape(shape) -> tuple[int | str, ...]:
    return tuple(d if isinstance(d, int) else "batch" for d in shape)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning on stderr, once per process and message (a pipeline opens engines per run)."""
    import sys

    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr)
