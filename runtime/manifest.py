"""The build folder's `manifest.json`: the contract between build time and run time.

Written last and atomically by `gdexport export` / `build`, so a folder with a manifest is
complete. It lists each model component (spec, diffusion settings, classes, image sizes) and each
artefact (graph or engine file, its role, precision, backend, sha256, I/O tensors, batch range).
Standard library only: C++ apps read the same JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT = "gdexport-manifest"
VERSION = 1
ROLES = ("unet", "classifier_grad", "classifier", "upsampler")


class ManifestError(ValueError):
    """A build folder or manifest that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: `shape` holds ints and the symbolic name "batch"."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: str | Path, data) -> None:
    """Write bytes (or any buffer, e.g. TensorRT's IHostMemory) to a temporary file beside `path`,
    fsync, then rename over it, with the permissions a plain file would get (mkstemp's are 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


@dataclass
class Artifact:
    """One file the runtime can load: an ONNX graph or a TensorRT plan."""

    file: str
    role: str
    precision: str
    backend: str  # "onnxruntime" or "tensorrt"
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: dict[str, int]
    extra: dict[str, Any]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Artifact:
        known = {"file", "role", "precision", "backend", "sha256", "inputs", "outputs", "batch"}
        return cls(
            file=d["file"],
            role=d["role"],
            precision=d["precision"],
            backend=d["backend"],
            sha256=d["sha256"],
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            batch=dict(d["batch"]),
            extra={k: v for k, v in d.items() if k not in known},
        )


class Manifest:
    """A parsed manifest and the folder it lives in."""

    def __init__(self, data: dict[str, Any], folder: Path):
        self.data = data
        self.folder = folder
        self.artifacts = [Artifact.from_json(a) for a in data.get("artifacts", [])]

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """From a build folder, a manifest.json, or any file inside a build folder."""
        path = Path(path)
        if path.is_dir():
            file = path / MANIFEST_NAME
        elif path.name == MANIFEST_NAME:
            file = path
        else:
            file = path.parent / MANIFEST_NAME
        if not file.is_file():
            raise ManifestError(
                f"no {MANIFEST_NAME} in {file.parent}: it is not a complete gdexport build "
                f"(an interrupted build leaves none). Run `gdexport build -o {file.parent} ...` again."
            )
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{file} is not valid JSON ({e}); rebuild the folder") from None
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ManifestError(
                f"{file} is not a {FORMAT} version {VERSION} manifest "
                f"(format={data.get('format')!r}, version={data.get('version')!r})"
            )
        return cls(data, file.parent)

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.data["components"]

    @property
    def sampling(self) -> dict[str, Any]:
        return self.data.get("sampling", {})

    def artifact(self, role: str, precision: str | None = None, backend: str | None = None):
        """The artefact for a role; the preferred precision/backend when given and present."""
        found = [a for a in self.artifacts if a.role == role]
        if precision is not None:
            found = [a for a in found if a.precision == precision]
        if backend is not None:
            found = [a for a in found if a.backend == backend]
        return found[0] if found else None

    def artifact_for_file(self, path: str | Path) -> Artifact:
        name = Path(path).name
        for a in self.artifacts:
            if a.file == name:
                return a
        listed = ", ".join(a.file for a in self.artifacts) or "none"
        raise ManifestError(
            f"{name} is not listed in {self.folder / MANIFEST_NAME} (it lists: {listed}); "
            f"pass an engine from that build or rebuild"
        )

    def path_of(self, artifact: Artifact) -> Path:
        return self.folder / artifact.file

    def verify(self, artifact: Artifact) -> Path:
        """The artefact's path, after checking it exists and its sha256 matches the manifest."""
        path = self.path_of(artifact)
        if not path.is_file():
            raise ManifestError(
                f"{path} is missing, though {MANIFEST_NAME} lists it; rebuild the folder"
            )
        digest = sha256_of(path)
        if digest != artifact.sha256:
            raise ManifestError(
                f"{path} does not match its manifest (sha256 {digest[:12]}... vs "
                f"{artifact.sha256[:12]}...): the file was changed or corrupted after the build; "
                f"rebuild the folder with the same `gdexport build` command"
            )
        return path
