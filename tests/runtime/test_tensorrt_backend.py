"""TrtBackend on CPU: the import errors, the plan compatibility check, the API names it uses
(checked against names read from the real TensorRT 10.3 / 11.x and cuda-python bindings), and its
buffer, shape, CUDA-graph and cleanup logic against a fake TensorRT + cuda-python whose "device"
memory is host memory. The fakes only have attributes the real bindings have."""

from __future__ import annotations

import ast
import ctypes
import enum
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BackendError, open_backend
from runtime.manifest import FORMAT, VERSION, Artifact, write_json_atomic

ROOT = Path(__file__).resolve().parents[2]
API_NAMES = ROOT / "tests" / "data" / "trt_api_names.txt"
TRT_VERSIONS = ("10.3.0", "11.4.0.106")

# The TensorRT objects by the names the modules give them, and cuda-python's structs.
TRT_OBJECTS = {"runtime", "engine", "context", "builder", "network", "parser", "config", "profile"}
TRT_OBJECTS |= {"cache", "tensor"}
CUDA_OBJECTS = {"prop": "cudaDeviceProp"}


# ---------------------------------------------------------------- API names


def load_api_names() -> dict[str, set[str]]:
    """Section ("tensorrt 10.3.0", "cuda-python") -> the names listed in it."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in API_NAMES.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), set())
        elif line:
            current.add(line)
    return sections


def api_names_used(source: str) -> tuple[set[str], set[str]]:
    """(TensorRT names, cuda-python names) a module uses: `trt.X`, `trt.Enum.MEMBER`, `cudart.X`,
    and attributes of the objects in TRT_OBJECTS / CUDA_OBJECTS (also as `self.<object>`)."""
    trt, cuda = set(), set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if not isinstance(cur, ast.Name):
            continue
        chain.reverse()
        base = cur.id
        if base == "self" and chain[0] in TRT_OBJECTS:
            base, chain = chain[0], chain[1:]
        if not chain:
            continue
        if base == "trt":
            qualified = len(chain) > 1 and not chain[1].startswith("__")
            trt.add(".".join(chain[:2]) if qualified else chain[0])
        elif base == "cudart":
            cuda.add(".".join(chain[:2]))
        elif base in TRT_OBJECTS:
            trt.add(chain[0])
        elif base in CUDA_OBJECTS:
            cuda.add(f"{CUDA_OBJECTS[base]}.{chain[0]}")
    return trt, cuda


def check_names(module_path: Path) -> None:
    names = load_api_names()
    trt, cuda = api_names_used(module_path.read_text())
    assert trt, f"found no TensorRT names in {module_path}: the parser is broken"
    for version in TRT_VERSIONS:
        missing = sorted(trt - names[f"tensorrt {version}"])
        assert not missing, (
            f"{module_path.name} uses {missing}, which TensorRT {version} lacks (or that were "
            f"never checked: see {API_NAMES.name})"
        )
    missing = sorted(cuda - names["cuda-python"])
    assert not missing, (
        f"{module_path.name} uses cuda-python names {missing} not in {API_NAMES.name}"
    )


def test_api_names_file_covers_both_versions():
    names = load_api_names()
    assert {f"tensorrt {v}" for v in TRT_VERSIONS} | {"cuda-python"} <= set(names)
    # The facts the build's choices rest on (read from the bindings, see the file's header).
    assert "BuilderFlag.FP16" in names["tensorrt 10.3.0"]
    assert "BuilderFlag.FP16" not in names["tensorrt 11.4.0.106"]
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" in names["tensorrt 10.3.0"]


def test_api_name_parser_sees_every_kind_of_use():
    source = (
        "x = trt.Logger(trt.Logger.WARNING)\n"
        "self.context.set_input_shape('x', s)\n"
        "engine.get_tensor_name(0)\n"
        "n = trt.BuilderFlag.__members__\n"
        "cudart.cudaMemcpyKind.cudaMemcpyHostToDevice\n"
        "prop.major\n"
        "spec.name\n"
    )
    trt, cuda = api_names_used(source)
    assert trt == {"Logger", "Logger.WARNING", "set_input_shape", "get_tensor_name", "BuilderFlag"}
    assert cuda == {
        "cudaMemcpyKind",
        "cudaMemcpyKind.cudaMemcpyHostToDevice",
        "cudaDeviceProp.major",
    }


def test_backend_uses_only_names_every_version_has():
    check_names(ROOT / "runtime" / "backends" / "tensorrt.py")


def test_a_misspelt_name_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("context.execute_async_v2(stream)\n")
    with pytest.raises(AssertionError, match="execute_async_v2"):
        check_names(bad)


# ---------------------------------------------------------------- import errors and compatibility


def test_without_tensorrt_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    from runtime.backends.tensorrt import TrtBackend

    with pytest.raises(BackendError, match=r"pip install 'gdexport\[trt\]'"):
        TrtBackend(tmp_path / "unet.plan")
    with pytest.raises(BackendError, match=r"gdexport\[trt\]"):
        open_backend(tmp_path / "unet.plan")


def test_without_cuda_python_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt("10.3.0"))
    monkeypatch.setitem(sys.modules, "cuda", None)
    from runtime.backends.tensorrt import TrtBackend

    with pytest.raises(BackendError, match=r"cuda-python: pip install 'gdexport\[trt\]'"):
        TrtBackend(tmp_path / "unet.plan")


BUILT = {
    "tensorrt_version": "10.3.0",
    "gpu_name": "NVIDIA Jetson AGX Orin",
    "compute_capability": "8.7",
}


def test_compatible_plans_pass():
    from runtime.backends.tensorrt import check_plan_compatibility

    check_plan_compatibility(BUILT, "10.3.0", "NVIDIA Jetson AGX Orin", "8.7")
    # JetPack's apt TensorRT reports a build number; the release is what matters.
    check_plan_compatibility(BUILT, "10.3.0.30", "NVIDIA Jetson AGX Orin", "8.7")
    check_plan_compatibility({}, "11.4.0", "NVIDIA H200", "9.0")  # nothing recorded: not checked


@pytest.mark.parametrize(
    "trt_version, gpu, cc, expected",
    [
        ("10.4.0", "NVIDIA Jetson AGX Orin", "8.7", "built with TensorRT 10.3.0, this is TensorRT 10.4.0"),
        ("11.4.0.106", "NVIDIA Jetson AGX Orin", "8.7", "this is TensorRT 11.4.0.106"),
        ("10.3.0", "NVIDIA H200", "9.0", "compute capability 8.7 (NVIDIA Jetson AGX Orin), this GPU is a NVIDIA H200 (compute capability 9.0)"),
        ("10.3.0", "NVIDIA Jetson Orin Nano", "8.7", "built on a NVIDIA Jetson AGX Orin, this GPU is a NVIDIA Jetson Orin Nano"),
    ],
)  # fmt: skip
def test_incompatible_plans_are_refused_with_the_rebuild_command(trt_version, gpu, cc, expected):
    from runtime.backends.tensorrt import check_plan_compatibility

    with pytest.raises(BackendError) as e:
        check_plan_compatibility(BUILT, trt_version, gpu, cc)
    assert expected in str(e.value)
    assert "gdexport build --fp16 -o DIR ..." in str(e.value)


def test_rebuild_command_names_the_folder_and_precision():
    from runtime.backends.tensorrt import check_plan_compatibility

    with pytest.raises(BackendError, match=r"gdexport build --int8 -o /builds/adm64 \.\.\."):
        check_plan_compatibility(BUILT, "10.4.0", BUILT["gpu_name"], "8.7", precision="int8",
                                 folder="/builds/adm64")  # fmt: skip


# ---------------------------------------------------------------- fake TensorRT and cuda-python

PLAN = b"fake plan"
PROFILE = (1, 2, 4)  # batch min, opt, max


class FakeCudart:
    """cuda-python's runtime module over host memory; tracks what is allocated and live."""

    class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorInvalidValue = 1

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
        cudaStreamCaptureModeThreadLocal = 1

    class cudaDeviceProp:  # noqa: N801
        def __init__(self, name=b"", major=0, minor=0):
            self.name, self.major, self.minor = name, major, minor

    def __init__(self, gpu=(b"Fake GPU\x00\x00", 8, 7)):
        self._gpu = gpu
        self.memory: dict[int, np.ndarray] = {}
        self.streams: set[int] = set()
        self.graphs: set[int] = set()
        self.capture: list | None = None
        self.launches = 0
        self.fail_malloc_after: int | None = None
        self._next = 1

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def _handle(self, kind: set[int]) -> int:
        self._next += 1
        kind.add(self._next)
        return self._next

    def device_array(self, ptr: int, shape, dtype) -> np.ndarray:
        buf = self.memory[ptr]  # KeyError: not a device pointer
        n = int(np.prod(shape, dtype=np.int64))
        return buf.view(dtype)[:n].reshape(shape)

    def _is_device(self, ptr: int, count: int) -> bool:
        return any(p <= ptr and ptr + count <= p + b.nbytes for p, b in self.memory.items())

    # The functions the backend calls, with cuda-python's signatures.
    def cudaSetDevice(self, device):  # noqa: N802
        return self._ok()

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return self._ok(self.cudaDeviceProp(*self._gpu))

    def cudaGetErrorString(self, err):  # noqa: N802
        return self._ok(b"fake error text")

    def cudaStreamCreate(self):  # noqa: N802
        return self._ok(_Stream(self._handle(self.streams)))

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.streams.remove(int(stream))
        return self._ok()

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        assert int(stream) in self.streams
        return self._ok()

    def cudaMalloc(self, nbytes):  # noqa: N802
        if self.fail_malloc_after is not None and len(self.memory) >= self.fail_malloc_after:
            return (self.cudaError_t.cudaErrorMemoryAllocation, 0)
        buf = np.zeros(nbytes, np.uint8)
        self.memory[buf.ctypes.data] = buf
        return self._ok(buf.ctypes.data)

    def cudaFree(self, ptr):  # noqa: N802
        del self.memory[ptr]
        return self._ok()

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        assert self.capture is None, "copies are not part of the graph"
        assert int(stream) in self.streams
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            assert self._is_device(dst, count) and not self._is_device(src, count)
        else:
            assert self._is_device(src, count) and not self._is_device(dst, count)
        ctypes.memmove(dst, src, count)
        return self._ok()

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        assert self.capture is None and int(stream) in self.streams
        self.capture = []
        return self._ok()

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        work, self.capture = self.capture, None
        graph = _Graph(self._handle(self.graphs), work)
        return self._ok(graph)

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        return self._ok(_Graph(self._handle(self.graphs), graph.work))

    def cudaGraphLaunch(self, graph_exec, stream):  # noqa: N802
        assert graph_exec.id in self.graphs
        self.launches += 1
        for run in graph_exec.work:
            run()
        return self._ok()

    def cudaGraphExecDestroy(self, graph_exec):  # noqa: N802
        self.graphs.remove(graph_exec.id)
        return self._ok()

    cudaGraphDestroy = cudaGraphExecDestroy  # noqa: N815


class _Stream:
    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


class _Graph:
    def __init__(self, id: int, work: list):
        self.id, self.work = id, work


class FakeEngine:
    """out = x * scale + t, for x (B, 3, 4, 4) float32, t (B,) int64, scale () float32."""

    TENSORS = {  # name: (input?, dtype, shape)
        "x": (True, np.float32, (-1, 3, 4, 4)),
        "t": (True, np.int64, (-1,)),
        "scale": (True, np.float32, ()),
        "out": (False, np.float32, (-1, 3, 4, 4)),
    }

    def __init__(self, trt, cudart):
        self._trt, self._cudart = trt, cudart
        self.num_io_tensors = len(self.TENSORS)
        self.contexts = []

    def get_tensor_name(self, i):
        return list(self.TENSORS)[i]

    def get_tensor_mode(self, name):
        io = self._trt.TensorIOMode
        return io.INPUT if self.TENSORS[name][0] else io.OUTPUT

    def get_tensor_dtype(self, name):
        return self.TENSORS[name][1]  # the fake's nptype is the identity

    def get_tensor_shape(self, name):
        return self.TENSORS[name][2]

    def get_tensor_profile_shape(self, name, profile):
        shape = self.TENSORS[name][2]
        return [tuple(b if d == -1 else d for d in shape) for b in PROFILE]

    def create_execution_context(self):
        self.contexts.append(FakeContext(self, self._cudart))
        return self.contexts[-1]


class FakeContext:
    def __init__(self, engine: FakeEngine, cudart: FakeCudart):
        self._engine, self._cudart = engine, cudart
        self._shapes = {n: s for n, (inp, _, s) in engine.TENSORS.items() if inp}
        self._addresses: dict[str, int] = {}
        self._stale = True  # TensorRT's deferred setup after a shape change
        self.runs = 0

    def set_input_shape(self, name, shape):
        spec = self._engine.TENSORS[name][2]
        ok = len(shape) == len(spec) and all(
            (PROFILE[0] <= d <= PROFILE[2]) if s == -1 else d == s for s, d in zip(spec, shape)
        )
        if ok and tuple(shape) != self._shapes[name]:
            self._shapes[name] = tuple(shape)
            self._stale = True
        return ok

    def get_tensor_shape(self, name):
        if name == "out":
            return self._shapes["x"]
        return self._shapes[name]

    def set_tensor_address(self, name, ptr):
        assert ptr in self._cudart.memory
        self._addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        assert stream_handle in self._cudart.streams
        assert set(self._addresses) == set(self._engine.TENSORS)
        shapes = dict(self._shapes)
        if self._cudart.capture is not None:
            if self._stale:
                return False  # as TensorRT: the setup after a shape change cannot be captured
            self._cudart.capture.append(lambda: self._run(shapes))
            return True
        self._stale = False
        self._run(shapes)
        return True

    def _run(self, shapes):
        if shapes["x"][0] != shapes["t"][0]:
            raise AssertionError("inconsistent batch")
        self.runs += 1
        mem, a = self._cudart.device_array, self._addresses
        x = mem(a["x"], shapes["x"], np.float32)
        t = mem(a["t"], shapes["t"], np.int64)
        scale = mem(a["scale"], (), np.float32)
        out = mem(a["out"], shapes["x"], np.float32)
        out[...] = x * scale + t[:, None, None, None]


class FakeRuntime:
    def __init__(self, logger, trt=None, cudart=None):
        self._trt, self._cudart = trt, cudart

    def deserialize_cuda_engine(self, data):
        self._trt.deserialised += 1
        return FakeEngine(self._trt, self._cudart) if bytes(data) == PLAN else None


def make_fake_trt(version: str, cudart: FakeCudart | None = None) -> types.ModuleType:
    """A `tensorrt` module: flag enums with the members the names file lists for `version`."""
    names = load_api_names()[f"tensorrt {version}"]
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.deserialised = 0

    def members(enum_name: str) -> list[str]:
        return sorted(n.split(".")[1] for n in names if n.startswith(enum_name + "."))

    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", members("NetworkDefinitionCreationFlag"), start=0
    )
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", members("BuilderFlag"), start=0)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE"], start=0)
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})

    def nptype(dtype):
        if dtype not in (np.float32, np.float16, np.int64, np.int32):
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return dtype

    trt.nptype = nptype
    trt.Runtime = lambda logger: FakeRuntime(logger, trt, cudart)
    return trt


@pytest.fixture
def fakes(monkeypatch):
    """Install a fake TensorRT 10.3 and cuda-python; yields (trt, cudart)."""
    cudart = FakeCudart()
    trt = make_fake_trt("10.3.0", cudart)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return trt, cudart


def public_methods(cls) -> set[str]:
    return {n for n, v in vars(cls).items() if not n.startswith("_") and callable(v)}


def test_fakes_only_have_real_names():
    names = load_api_names()
    trt_names = set.intersection(*(names[f"tensorrt {v}"] for v in TRT_VERSIONS))
    fake_trt = (
        public_methods(FakeEngine) | public_methods(FakeContext) | public_methods(FakeRuntime)
    )
    fake_trt |= {"num_io_tensors"}
    assert fake_trt <= trt_names, sorted(fake_trt - trt_names)
    fake_cuda = {n for n in public_methods(FakeCudart) if n.startswith("cuda")} - {"device_array"}
    assert fake_cuda <= names["cuda-python"], sorted(fake_cuda - names["cuda-python"])


def feeds_for(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "x": rng.standard_normal((batch, 3, 4, 4)).astype(np.float32),
        "t": rng.integers(0, 1000, batch).astype(np.int64),
        "scale": np.array(rng.uniform(0.5, 2.0), np.float32),
    }


def expected(feeds):
    return feeds["x"] * feeds["scale"] + feeds["t"][:, None, None, None].astype(np.float32)


@pytest.fixture
def plan(tmp_path) -> Path:
    path = tmp_path / "unet.plan"
    path.write_bytes(PLAN)
    return path


# ---------------------------------------------------------------- the backend over the fakes


def test_io_specs_and_batch_come_from_the_engine(fakes, plan):
    from runtime.backends.tensorrt import TrtBackend

    with TrtBackend(plan) as b:
        assert list(b.inputs) == ["x", "t", "scale"] and list(b.outputs) == ["out"]
        assert b.inputs["x"].shape == ("batch", 3, 4, 4) and b.inputs["x"].dtype == "float32"
        assert b.inputs["t"].dtype == "int64" and b.inputs["scale"].shape == ()
        assert b.batch == {"min": 1, "opt": 2, "max": 4}


def test_outputs_match_the_formula_for_every_batch_and_are_owned_by_the_caller(fakes, plan):
    from runtime.backends.tensorrt import TrtBackend

    rng = np.random.default_rng(0)
    with TrtBackend(plan) as b:
        first = b(feeds_for(2, rng))
        for batch in (1, 4, 3):
            feeds = feeds_for(batch, rng)
            out = b(feeds)["out"]
            assert out.shape == (batch, 3, 4, 4) and out.dtype == np.float32
            np.testing.assert_array_equal(out, expected(feeds))
        # A later call did not write into an earlier result.
        before = first["out"].copy()
        b(feeds_for(2, rng))
        np.testing.assert_array_equal(first["out"], before)


def test_non_contiguous_inputs_are_copied(fakes, plan):
    from runtime.backends.tensorrt import TrtBackend

    feeds = feeds_for(2, np.random.default_rng(1))
    feeds["x"] = np.asfortranarray(feeds["x"])
    with TrtBackend(plan) as b:
        np.testing.assert_array_equal(b(feeds)["out"], expected(feeds))


def test_bad_feeds_are_refused_before_any_copy(fakes, plan):
    from runtime.backends.tensorrt import TrtBackend

    rng = np.random.default_rng(2)
    _, cudart = fakes
    with TrtBackend(plan) as b:
        with pytest.raises(BackendError, match=r"batch 5 is outside the engine's range 1\.\.4"):
            b(feeds_for(5, rng))
        feeds = feeds_for(2, rng)
        feeds["t"] = feeds["t"].astype(np.int32)
        with pytest.raises(BackendError, match="input 't' must be int64"):
            b(feeds)
        assert b.context.runs == 0


def test_cuda_graph_captures_once_per_shape_and_replays(fakes, plan):
    from runtime.backends.tensorrt import TrtBackend

    rng = np.random.default_rng(3)
    _, cudart = fakes
    with TrtBackend(plan, cuda_graph=True) as b:
        for _ in range(3):  # the graph reads the buffers: new inputs, new outputs
            feeds = feeds_for(2, rng)
            np.testing.assert_array_equal(b(feeds)["out"], expected(feeds))
        assert cudart.launches == 3 and len(cudart.graphs) == 2  # one graph + its instance
        first_graphs = set(cudart.graphs)
        feeds = feeds_for(3, rng)  # a new shape captures again and drops the old graph
        np.testing.assert_array_equal(b(feeds)["out"], expected(feeds))
        assert len(cudart.graphs) == 2 and not cudart.graphs & first_graphs
    assert cudart.graphs == set()


def test_close_frees_everything_and_is_idempotent(fakes, plan):
    from runtime.backends.tensorrt import TrtBackend

    _, cudart = fakes
    b = TrtBackend(plan, cuda_graph=True)
    b(feeds_for(2, np.random.default_rng(4)))
    assert len(cudart.memory) == 4 and len(cudart.streams) == 1
    b.close()
    b.close()
    assert cudart.memory == {} and cudart.streams == set() and cudart.graphs == set()
    with pytest.raises(BackendError, match="closed"):
        b(feeds_for(2, np.random.default_rng(4)))


def test_a_failed_allocation_frees_what_was_allocated(fakes, plan):
    from runtime.backends.tensorrt import TrtBackend

    _, cudart = fakes
    cudart.fail_malloc_after = 2
    with pytest.raises(BackendError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        TrtBackend(plan)
    assert cudart.memory == {} and cudart.streams == set()


def test_a_corrupt_plan_gives_a_clear_error(fakes, tmp_path):
    from runtime.backends.tensorrt import TrtBackend

    bad = tmp_path / "unet.plan"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(BackendError, match="corrupt or built by another version") as e:
        TrtBackend(bad)
    assert f"gdexport build --fp16 -o {tmp_path} ..." in str(e.value)
    with pytest.raises(BackendError, match="does not exist"):
        TrtBackend(tmp_path / "missing.plan")


UNET_COMPONENT = {
    "unet": {
        "image_size": 4, "num_classes": None,
        "diffusion": {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": False},
    }
}  # fmt: skip


def manifest_entry(**extra) -> dict:
    spec = {"name": "x", "dtype": "float32", "shape": ["batch", 3, 4, 4]}
    return {
        "file": "unet.plan", "role": "unet", "precision": "fp16", "backend": "tensorrt",
        "sha256": "0" * 64, "inputs": [spec], "outputs": [spec],
        "batch": {"min": 1, "opt": 2, "max": 4}, **extra,
    }  # fmt: skip


def test_a_plan_from_another_version_is_refused_before_deserialising(fakes, plan):
    from runtime.backends.tensorrt import TrtBackend

    trt, cudart = fakes
    entry = manifest_entry(tensorrt_version="10.2.0", gpu_name="Fake GPU", compute_capability="8.7")
    with pytest.raises(BackendError, match="built with TensorRT 10.2.0, this is TensorRT 10.3.0"):
        TrtBackend(plan, manifest_artifact=Artifact.from_json(entry))
    assert trt.deserialised == 0 and cudart.memory == {}
    # The same entry found in the manifest beside the plan.
    write_json_atomic(
        plan.parent / "manifest.json",
        {"format": FORMAT, "version": VERSION, "components": UNET_COMPONENT, "artifacts": [entry]},
    )
    with pytest.raises(BackendError, match=f"gdexport build --fp16 -o {plan.parent} ..."):
        TrtBackend(plan)
    # Recorded for this TensorRT and GPU (the name without its NUL padding): it opens.
    entry.update(tensorrt_version="10.3.0")
    with TrtBackend(plan, manifest_artifact=Artifact.from_json(entry)) as b:
        assert b.batch == {"min": 1, "opt": 2, "max": 4}


def test_a_batch_range_beyond_the_profile_is_refused(fakes, plan):
    from runtime.backends.tensorrt import TrtBackend

    _, cudart = fakes
    with TrtBackend(plan, batch={"min": 1, "opt": 1, "max": 2}) as b:
        with pytest.raises(BackendError, match=r"outside the engine's range 1\.\.2"):
            b(feeds_for(3, np.random.default_rng(5)))
    with pytest.raises(BackendError, match=r"batch range 1\.\.8 is outside unet.plan's"):
        TrtBackend(plan, batch={"min": 1, "opt": 1, "max": 8})
    assert cudart.memory == {}


def test_open_backend_picks_tensorrt_for_a_plan(fakes, plan):
    with open_backend(plan, batch={"min": 1, "opt": 2, "max": 4}) as b:
        assert type(b).__name__ == "TrtBackend"


def test_gpu_identity_strips_the_name(fakes):
    from runtime.backends.tensorrt import gpu_identity

    assert gpu_identity(0) == ("Fake GPU", "8.7")
