"""Serve a `gdexport triton` repository on a CPU machine with the tritonserver bundled in the
nvidia-pytriton wheel: the test and demo harness (`bash examples/install_triton.sh` installs it).

    python examples/triton_cpu.py REPO [--port 8000]        # serves on 127.0.0.1 until Ctrl-C

That server carries the Python backend only, no onnxruntime or tensorrt backend. So this harness
serves a copy of the repository in which each engine model is stood in by a Python-backend model
that runs the same .onnx file with the runtime's ONNX Runtime backend, under the same name, inputs,
outputs, batching and instance count. The repository users get from `gdexport triton` is left as
it is; `gd_sampler` is served unchanged.

Pitfalls handled here: the Python stub embeds the interpreter found first on PATH (so the serving
venv's bin goes first, and numpy inside it must be 1.x: BLS calls break under numpy 2), needs that
Python's lib folder on LD_LIBRARY_PATH, and does not inherit PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".venv-triton"

STAND_IN_MODEL = '''"""Stand-in for a native engine model on a CPU-only test server: the same .onnx through the
gdexport runtime's ONNX Runtime backend (examples/triton_cpu.py)."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "gd_sampler" / "1"))

import triton_python_backend_utils as pb_utils  # noqa: E402

from runtime.backends.onnxruntime import OrtBackend  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        graph = config["parameters"]["onnx_file"]["string_value"]
        # Several server processes share the cores: spinning worker threads would starve them.
        self.engine = OrtBackend(folder / graph, batch={"min": 1, "max": 1 << 30}, spin=False)
        self.outputs = [o["name"] for o in config["output"]]

    def _feed(self, name, arrays):
        """The requests' tensors as one batch, as the native backend would: [B, 1] -> [B]."""
        a = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        return a.reshape(a.shape[0]) if len(self.engine.inputs[name].shape) == 1 else a

    def execute(self, requests):
        try:
            return self._run(requests)
        except Exception as e:
            err = pb_utils.TritonError(f"{type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]

    def _run(self, requests):
        ins = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name in self.engine.inputs
        }
        sizes = [len(a) for a in next(iter(ins.values()))]
        out = self.engine({n: self._feed(n, arrays) for n, arrays in ins.items()})
        bounds = np.cumsum([0, *sizes])
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, np.ascontiguousarray(out[n][lo:hi])) for n in self.outputs]
            )
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
'''


class ServerError(RuntimeError):
    """The test server could not be set up or started; the message says what to do."""


def venv_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.is_file():
        raise ServerError(
            f"no serving venv at {venv}: run `bash examples/install_triton.sh` first "
            f"(it installs nvidia-pytriton's tritonserver, numpy 1.x and onnxruntime there)"
        )
    return py


def _venv_facts(venv: Path) -> tuple[str, Path, Path]:
    """(python version "3.11", site-packages, the base Python's lib folder)."""
    code = (
        "import sys, sysconfig, pytriton, pathlib;"
        "print('%d.%d' % sys.version_info[:2]);"
        "print(pathlib.Path(pytriton.__file__).parent.parent);"
        "print(sysconfig.get_config_var('LIBDIR'))"
    )
    out = subprocess.run(
        [str(venv_python(venv)), "-c", code], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise ServerError(f"the serving venv {venv} lacks nvidia-pytriton: {out.stderr.strip()}")
    version, site, libdir = out.stdout.split("\n")[:3]
    return version, Path(site), Path(libdir)


def stand_in_repository(repo: str | Path, dest: str | Path) -> Path:
    """Copy `repo` to `dest`, replacing every onnxruntime engine model by a Python-backend
    stand-in that runs the same graph (TensorRT plans cannot run on a CPU machine)."""
    repo, dest = Path(repo), Path(dest)
    shutil.copytree(repo, dest)
    for config in sorted(dest.glob("*/config.pbtxt")):
        text = config.read_text()
        if 'platform: "tensorrt_plan"' in text:
            raise ServerError(
                f"{config.parent.name} is a TensorRT plan, which this CPU harness cannot serve; "
                "make the repository from an ONNX Runtime build (`gdexport triton --backend "
                "onnxruntime`)"
            )
        if 'backend: "onnxruntime"' not in text:
            continue
        graph = re.search(r'default_model_filename: "([^"]+)"', text).group(1)
        text = text.replace('backend: "onnxruntime"', 'backend: "python"')
        text = text.replace(
            f'default_model_filename: "{graph}"', 'default_model_filename: "model.py"'
        )
        text += f'parameters [ {{ key: "onnx_file" value: {{ string_value: "{graph}" }} }} ]\n'
        config.write_text(text)
        (config.parent / "1" / "model.py").write_text(STAND_IN_MODEL)
    return dest


class TritonServer:
    """A tritonserver on 127.0.0.1 serving a stand-in copy of `repo`; a context manager."""

    def __init__(
        self,
        repo: str | Path,
        *,
        http_port: int = 0,
        venv: str | Path = DEFAULT_VENV,
        log: str | Path | None = None,
        start_timeout: float = 120.0,
    ):
        self.venv = Path(venv)
        self.work = Path(tempfile.mkdtemp(prefix="gd-triton-"))
        self.repo = stand_in_repository(repo, self.work / "repo")
        self.http_port = http_port or _free_port()
        self.grpc_port = _free_port()
        self.url = f"127.0.0.1:{self.http_port}"
        self.log_path = Path(log) if log else self.work / "server.log"
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    def start(self) -> TritonServer:
        version, site, libdir = _venv_facts(self.venv)
        dist = site / "pytriton" / "tritonserver"
        backends = self.work / "backends"
        shutil.copytree(dist / "backends", backends)
        shutil.copy2(
            dist / "python_backend_stubs" / version / "triton_python_backend_stub",
            backends / "python" / "triton_python_backend_stub",
        )
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        libs = [str(site / "nvidia_pytriton.libs"), str(libdir)]
        env["LD_LIBRARY_PATH"] = ":".join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        cmd = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--cache-directory={dist / 'caches'}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--exit-timeout-secs=10",
            f"--backend-config=python,shm-region-prefix-name=gd{os.getpid()}_{self.http_port}_",
        ]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited ({self.process.returncode}):\n{self.log_tail()}"
                )
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise ServerError(
            f"tritonserver not ready after {self.start_timeout:.0f} s:\n{self.log_tail()}"
        )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, n: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-n:])

    def executions(self, model: str) -> tuple[int, int]:
        """(inferences, executions) of a model from the server's statistics: how many calls it
        served, and in how many engine runs (fewer when the dynamic batcher merged them)."""
        import json

        with urllib.request.urlopen(f"http://{self.url}/v2/models/{model}/stats", timeout=10) as r:
            stats = json.loads(r.read())["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repo", type=Path, help="a repository made by `gdexport triton`")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the serving venv")
    args = ap.parse_args()
    if not re.fullmatch(r"\d+", str(args.port)) or not 0 < args.port < 65536:
        sys.exit(f"error: --port must be 1..65535, got {args.port}")
    try:
        with TritonServer(args.repo, http_port=args.port, venv=args.venv) as server:
            print(
                f"serving {args.repo} at http://{server.url} (log: {server.log_path}); Ctrl-C stops"
            )
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass
    except ServerError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
