"""TensorRT backend: a `.plan` engine run through cuda-python, numpy in and numpy out.

Construction does the expensive work once: it checks that the plan was built by this TensorRT
release for this GPU (the manifest entry records both), deserialises it, creates one execution
context and one stream, and allocates a device buffer per I/O tensor for the profile's largest
shapes. A call copies the inputs in, enqueues the engine (or replays a CUDA graph of it) and copies
the outputs into fresh arrays that the caller owns.

TensorRT objects keep the names runtime / engine / context, and cuda-python is always `cudart`:
tests/runtime/test_tensorrt_backend.py checks every API name used on them against the names read
from the TensorRT 10.3 and 11.x bindings (tests/data/trt_api_names.txt).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import BackendError, check_feeds
from runtime.manifest import MANIFEST_NAME, Artifact, Manifest, ManifestError, TensorSpec

INSTALL = "pip install 'gdexport[trt]' (on Jetson, TensorRT comes with JetPack)"


def import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the package is there, libnvinfer is not
        raise BackendError(
            f"the TensorRT backend needs TensorRT: {INSTALL} (import tensorrt failed: {e})"
        ) from None
    return tensorrt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python 12.6 and later
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendError(f"the TensorRT backend needs cuda-python: {INSTALL}") from None
    return cudart


def cuda_check(cudart, fn, *args) -> Any:
    """Call a cuda-python function, which returns (error, *values); raise BackendError on an error."""
    what = getattr(fn, "__name__", "CUDA call")
    try:
        err, *values = fn(*args)
    except RuntimeError as e:  # older cuda-python raises when it cannot load libcuda
        raise BackendError(f"{what} failed: {e}; is the NVIDIA driver installed?") from None
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise BackendError(f"{what} failed: {getattr(err, 'name', err)} ({text})")
    return values[0] if len(values) == 1 else tuple(values) or None


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of a CUDA device."""
    cudart = import_cudart()
    prop = cuda_check(cudart, cudart.cudaGetDeviceProperties, device)
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.split("\x00", 1)[0].strip(), f"{prop.major}.{prop.minor}"


def _release(version: str) -> tuple[str, ...]:
    # A plan is tied to a TensorRT major.minor.patch; the build number (10.3.0.30 from JetPack's
    # apt packages, 10.3.0 from pip) is not part of it.
    return tuple(str(version).split(".")[:3])


def check_plan_compatibility(
    artifact_extra: Mapping[str, Any],
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    *,
    precision: str = "fp16",
    folder: str | Path = "DIR",
) -> None:
    """Raise BackendError unless a plan built as `artifact_extra` records (its manifest entry's
    "tensorrt_version", "gpu_name", "compute_capability") runs with this TensorRT on this GPU.

    Fields the entry lacks are not checked; deserialisation is then the only check.
    """
    problems = []
    built = artifact_extra.get("tensorrt_version")
    if built is not None and _release(built) != _release(trt_version):
        problems.append(f"it was built with TensorRT {built}, this is TensorRT {trt_version}")
    built_cc = artifact_extra.get("compute_capability")
    built_gpu = artifact_extra.get("gpu_name")
    if built_cc is not None and str(built_cc) != str(compute_capability):
        problems.append(
            f"it was built for compute capability {built_cc} ({built_gpu or 'GPU not recorded'}), "
            f"this GPU is a {gpu_name} (compute capability {compute_capability})"
        )
    elif built_gpu is not None and built_gpu != gpu_name:
        # Same architecture, another model: TensorRT's tactics were timed (and may only be valid)
        # on the GPU it built on, so a plan is only trusted on that model.
        problems.append(f"it was built on a {built_gpu}, this GPU is a {gpu_name}")
    if problems:
        raise BackendError(
            "this TensorRT plan cannot run here: "
            + "; ".join(problems)
            + f". Plans only run with the TensorRT release and GPU model they were built for: "
            f"rebuild on this machine with `gdexport build --{precision} -o {folder} ...`"
        )


def _manifest_entry(path: Path) -> Artifact | None:
    """The plan's entry in the manifest beside it, if any: it records where the plan was built."""
    if not (path.parent / MANIFEST_NAME).is_file():
        return None
    try:
        return Manifest.load(path.parent).artifact_for_file(path)
    except ManifestError:
        return None


class TrtBackend:
    """A TensorRT plan behind the Backend protocol, on CUDA device `device`.

    `manifest_artifact`: the plan's manifest entry (default: looked up in the manifest beside the
    plan), checked before deserialising. `cuda_graph`: capture the engine's launch as a CUDA graph
    on the first call with given input shapes and replay it while they stay the same (a sampler's
    fixed batch); a new shape captures again. `batch`: the range calls are checked against
    (default: the engine's optimisation profile).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        manifest_artifact: Artifact | None = None,
        cuda_graph: bool = False,
        device: int = 0,
        batch: Mapping[str, int] | None = None,
    ):
        trt = import_tensorrt()
        cudart = self._cudart = import_cudart()
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"engine {path} does not exist")
        self.path = path
        self.cuda_graph = cuda_graph
        self.runtime = self.engine = self.context = None
        self._stream = None
        self._buffers: dict[str, int] = {}
        self._graph = self._graph_exec = self._graph_shapes = None

        cuda_check(cudart, cudart.cudaSetDevice, device)
        artifact = manifest_artifact or _manifest_entry(path)
        if artifact is not None:
            gpu_name, cc = gpu_identity(device)
            check_plan_compatibility(
                artifact.extra, trt.__version__, gpu_name, cc,
                precision=artifact.precision, folder=path.parent,
            )  # fmt: skip
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            precision = artifact.precision if artifact is not None else "fp16"
            raise BackendError(
                f"TensorRT {trt.__version__} cannot deserialise {path} (its messages are above): "
                f"the file is corrupt or built by another version or for another GPU; rebuild it "
                f"on this machine with `gdexport build --{precision} -o {path.parent} ...`"
            )
        self.engine = engine
        try:
            self._setup(trt, batch)
        except BaseException:
            self.close()
            raise

    def _setup(self, trt, batch: Mapping[str, int] | None) -> None:
        cudart, engine = self._cudart, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._dtypes: dict[str, np.dtype] = {}
        specs: dict[str, TensorSpec] = {}
        inputs = []
        for name in names:
            trt_dtype = engine.get_tensor_dtype(name)
            try:
                self._dtypes[name] = np.dtype(trt.nptype(trt_dtype))
            except TypeError:
                raise BackendError(
                    f"{self.path}: tensor {name!r} is {trt_dtype}, which numpy cannot hold; "
                    f"export the graph with float32/float16 inputs and outputs"
                ) from None
            specs[name] = TensorSpec(name, self._dtypes[name].name, _spec_shape(name, engine))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(name)
        self.inputs = {n: specs[n] for n in inputs}
        self.outputs = {n: s for n, s in specs.items() if n not in self.inputs}

        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {self.path}")
        engine_batch = None
        for name in inputs:  # set every input to its largest shape, then read the outputs'
            shape = tuple(engine.get_tensor_shape(name))
            if -1 in shape:
                lo, opt, hi = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
                engine_batch = {"min": lo[0], "opt": opt[0], "max": hi[0]}
                shape = hi
            self.context.set_input_shape(name, shape)
        self.batch = _batch_within(batch, engine_batch, self.path)
        self._stream = cuda_check(cudart, cudart.cudaStreamCreate)
        self._stream_handle = int(self._stream)
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            nbytes = int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize
            self._buffers[name] = cuda_check(cudart, cudart.cudaMalloc, max(nbytes, 1))
            # The buffers never move, so their addresses are set once.
            if not self.context.set_tensor_address(name, int(self._buffers[name])):
                raise BackendError(f"TensorRT refused the device buffer of {name!r}")

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs as named in `self.inputs` (numpy, host) -> fresh output arrays."""
        if self.context is None:
            raise BackendError(f"the TensorRT backend for {self.path} is closed")
        check_feeds(self.inputs, feeds, self.batch)
        cudart, context = self._cudart, self.context
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        hosts = []  # alive until the stream is synchronised: the copies read them asynchronously
        for name in self.inputs:
            a = feeds[name]
            a = a if a.flags.c_contiguous else a.copy(order="C")  # keeps 0-d arrays 0-d
            hosts.append(a)
            if not context.set_input_shape(name, a.shape):
                raise BackendError(f"TensorRT refused shape {a.shape} for input {name!r}")
            cuda_check(
                cudart, cudart.cudaMemcpyAsync,
                self._buffers[name], a.ctypes.data, a.nbytes, h2d, self._stream,
            )  # fmt: skip
        if self.cuda_graph:
            self._launch_graph(tuple(a.shape for a in hosts))
        elif not context.execute_async_v3(self._stream_handle):
            raise BackendError(self._run_failed(tuple(a.shape for a in hosts)))
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        outputs = {}
        for name in self.outputs:
            out = np.empty(tuple(context.get_tensor_shape(name)), self._dtypes[name])
            cuda_check(
                cudart, cudart.cudaMemcpyAsync,
                out.ctypes.data, self._buffers[name], out.nbytes, d2h, self._stream,
            )  # fmt: skip
            outputs[name] = out
        cuda_check(cudart, cudart.cudaStreamSynchronize, self._stream)
        return outputs

    def _run_failed(self, shapes: tuple[tuple[int, ...], ...]) -> str:
        named = dict(zip(self.inputs, shapes))
        return f"TensorRT could not run {self.path.name} on inputs {named} (its messages are above)"

    def _launch_graph(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        cudart = self._cudart
        if shapes != self._graph_shapes:
            # One graph at a time: an engine's launch may read shape state from the context, which
            # a graph captured for other shapes would not match.
            self._drop_graph()
            # The first launch after a shape change does TensorRT's deferred setup, which must not
            # be captured; its results are discarded when the graph runs the same work again.
            if not self.context.execute_async_v3(self._stream_handle):
                raise BackendError(self._run_failed(shapes))
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            cuda_check(cudart, cudart.cudaStreamBeginCapture, self._stream, mode)
            try:
                ok = self.context.execute_async_v3(self._stream_handle)
            finally:
                err, graph = cudart.cudaStreamEndCapture(self._stream)
            if not ok or err != cudart.cudaError_t.cudaSuccess:
                if graph:
                    cudart.cudaGraphDestroy(graph)
                raise BackendError(
                    f"capturing {self.path.name} as a CUDA graph failed ({getattr(err, 'name', err)}"
                    f"); the engine has work a graph cannot hold: open it with cuda_graph=False"
                )
            self._graph = graph
            self._graph_exec = cuda_check(cudart, cudart.cudaGraphInstantiate, graph, 0)
            self._graph_shapes = shapes
        cuda_check(cudart, cudart.cudaGraphLaunch, self._graph_exec, self._stream)

    def _drop_graph(self) -> None:
        cudart = self._cudart
        if self._graph_exec is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
        if self._graph is not None:
            cudart.cudaGraphDestroy(self._graph)
        self._graph = self._graph_exec = self._graph_shapes = None

    def close(self) -> None:
        """Free the device buffers, graph and stream. Best effort: frees what it can, raises nothing."""
        cudart = self._cudart
        if self._stream is not None:
            cudart.cudaStreamSynchronize(self._stream)
        self._drop_graph()
        self.context = self.engine = self.runtime = None  # the context goes before its buffers
        for ptr in self._buffers.values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spec_shape(name: str, engine) -> tuple[int | str, ...]:
    shape = tuple(engine.get_tensor_shape(name))
    if any(d < 0 for d in shape[1:]):
        raise BackendError(
            f"tensor {name!r} has shape {shape}: only the batch (first) dimension may be dynamic; "
            f"export with fixed image sizes"
        )
    return tuple("batch" if i == 0 and d < 0 else d for i, d in enumerate(shape))


def _batch_within(
    batch: Mapping[str, int] | None, engine_batch: dict[str, int] | None, path: Path
) -> dict[str, int] | None:
    if batch is None or engine_batch is None:
        return engine_batch
    if not engine_batch["min"] <= batch["min"] <= batch["max"] <= engine_batch["max"]:
        raise BackendError(
            f"batch range {batch['min']}..{batch['max']} is outside {path.name}'s optimisation "
            f"profile {engine_batch['min']}..{engine_batch['max']}: the manifest and the plan "
            f"disagree; rebuild the plan"
        )
    return dict(batch)
