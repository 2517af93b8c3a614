"""The build folder's `manifest.json`: the contract between build time and run time.

Written last and atomically by `gdexport export` / `build`, so a folder with a manifest is
complete. It lists each model component (spec, diffusion settings, classes, image sizes) and each
artefact (graph or engine file, its role, precision, backend, sha256, I/O tensors, batch range).
Standard library only: C++ apps read the same JSON.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.roles import ROLES

MANIFEST_NAME = "manifest.json"
FORMAT = "gdexport-manifest"
VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# The precisions a stage falls back to, nearest first, when the build has no engine of the
# UNet's precision for it (an int8 build whose gradient did not hold up quantised runs fp16).
NEAREST_PRECISIONS = {
    "int8": ("int8", "fp16", "fp32"),
    "fp16": ("fp16", "fp32"),
    "bf16": ("bf16", "fp32", "fp16"),
    "fp32": ("fp32", "fp16"),
}


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
    """A parsed manifest and the folder it lives in.

    `staging`: a build's staging folder, whose files are found before the folder's (the build
    runs its staged engines through `Pipeline` before it commits them)."""

    def __init__(self, data: dict[str, Any], folder: Path, *, staging: Path | None = None):
        validate(data, Path(folder) / MANIFEST_NAME)
        self.data = data
        self.folder = Path(folder)
        self.staging = staging
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
        except OSError as e:
            raise ManifestError(f"cannot read {file}: {e.strerror or e}") from None
        validate(data, file)
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

    def nearest(self, role: str, precision: str, backend: str) -> Artifact | None:
        """The role's artefact on `backend` at `precision` or the nearest one present
        (`NEAREST_PRECISIONS`), else any of the role on that backend, else any at all."""
        for prec in NEAREST_PRECISIONS.get(precision, (precision,)):
            if (art := self.artifact(role, prec, backend)) is not None:
                return art
        return self.artifact(role, None, backend) or self.artifact(role)

    def artifact_for_file(self, path: str | Path) -> Artifact:
        name = Path(path).name
        for a in self.artifacts:
            if Path(a.file).name == name:
                return a
        listed = ", ".join(a.file for a in self.artifacts) or "none"
        raise ManifestError(
            f"{name} is not listed in {self.folder / MANIFEST_NAME} (it lists: {listed}); "
            f"pass an engine from that build or rebuild"
        )

    def path_of(self, artifact: Artifact) -> Path:
        if self.staging is not None and (self.staging / artifact.file).exists():
            return confined(self.staging, artifact.file)
        return confined(self.folder, artifact.file)

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
        data = artifact.extra.get("external_data")
        if data:  # an ONNX graph's external weights or an OpenVINO IR's .bin
            side = confined(path.parent, data["file"])
            if not side.is_file() or sha256_of(side) != data["sha256"]:
                state = "missing" if not side.is_file() else "changed or corrupted"
                raise ManifestError(
                    f"{side} (the weights of {path.name}) is {state} since the build; rebuild "
                    f"the folder with the same `gdexport build` command"
                )
        return path


# -- validation -------------------------------------------------------------------------------


def confined(folder: Path, file: str) -> Path:
    """`folder / file`, refused unless it stays inside `folder` (no absolute path, no "..", no
    symlink leading out): a manifest only ever names files of its own build."""
    where = f"{Path(folder) / MANIFEST_NAME}"
    if (
        not isinstance(file, str)
        or not file
        or Path(file).is_absolute()
        or ".." in Path(file).parts
    ):
        raise ManifestError(
            f"{where} names the artefact file {file!r}, which is not a path inside the build "
            f"folder; a build only refers to its own files: rebuild the folder"
        )
    path = Path(folder) / file
    root = Path(folder).resolve()
    real = path.resolve()
    if real != root and root not in real.parents:
        raise ManifestError(
            f"{where}: the artefact {file!r} resolves to {real}, outside the build folder "
            f"{root} (a symlink out of it?); a build only refers to its own files: copy the file "
            f"in or rebuild the folder"
        )
    return path


def _fail(where, key: str, what: str) -> None:
    raise ManifestError(
        f"{where} is not a valid gdexport manifest: {key} {what}. The file was edited or written "
        f"by another tool; rebuild the folder with `gdexport build`"
    )


def _need(where, d: Any, key: str, types: type | tuple[type, ...], path: str, *, none=False):
    if not isinstance(d, dict) or key not in d:
        _fail(where, f"{path}{key!r}", "is missing")
    v = d[key]
    if v is None and none:
        return v
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in _tuple(types))
    if isinstance(v, float) and not math.isfinite(v):
        ok = False
    if not ok:
        names = "/".join(t.__name__ for t in _tuple(types)) + (" or null" if none else "")
        _fail(where, f"{path}{key!r}", f"must be {names}, got {v!r}")
    return v


def _tuple(types) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def validate(data: Any, where: str | Path = MANIFEST_NAME) -> None:
    """Raise ManifestError naming the first key that is missing or of the wrong type.

    Checked once, on load and on write: the format and version, the components the runtime
    reads (sizes, classes, diffusion), the sampling defaults, and every artefact's role,
    precision, sha256, I/O specs and batch range."""
    if not isinstance(data, dict):
        raise ManifestError(
            f"{where} is not a gdexport manifest: it holds a JSON {type(data).__name__}, not an "
            f"object; rebuild the folder"
        )
    if data.get("format") != FORMAT:
        raise ManifestError(
            f"{where} is not a {FORMAT} manifest (format={data.get('format')!r}); rebuild the folder"
        )
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise ManifestError(
            f"{where} is a version {version} manifest, written by a newer gdexport; this one "
            f"reads version {VERSION}: upgrade gdexport (`pip install -U gdexport`) or rebuild the "
            f"folder with this version"
        )
    if version != VERSION:
        raise ManifestError(
            f"{where} is not a {FORMAT} version {VERSION} manifest (version={version!r}); "
            f"rebuild the folder"
        )
    comps = _need(where, data, "components", dict, "")
    if not comps:
        _fail(where, "'components'", "is empty")
    for name, c in comps.items():
        p = f"components.{name}."
        if name not in ("unet", "classifier", "upsampler"):
            _fail(where, f"components.{name!r}", "is not a component (unet, classifier, upsampler)")
        _need(where, c, "image_size", int, p)
        _need(where, c, "num_classes", int, p, none=True)
        diff = _need(where, c, "diffusion", dict, p)
        _need(where, diff, "noise_schedule", str, p + "diffusion.")
        _need(where, diff, "diffusion_steps", int, p + "diffusion.")
        _need(where, diff, "learn_sigma", bool, p + "diffusion.")
        if name == "upsampler":
            _need(where, c, "low_res_size", int, p)
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        _fail(where, "'sampling'", f"must be an object, got {sampling!r}")
    for key, types in (
        ("scale", (int, float)), ("respacing", str), ("upsampler_respacing", str),
        ("upsampler_start_t", int), ("grayscale", bool),
    ):  # fmt: skip
        if key in sampling:
            _need(where, sampling, key, types, "sampling.", none=True)
    if isinstance(sampling.get("scale"), (int, float)) and sampling["scale"] < 0:
        _fail(where, "sampling.'scale'", f"must be >= 0, got {sampling['scale']}")
    arts = _need(where, data, "artifacts", list, "")
    for i, a in enumerate(arts):
        p = f"artifacts[{i}]."
        file = _need(where, a, "file", str, p)
        p = f"artifacts[{i}] ({file})."
        role = _need(where, a, "role", str, p)
        if role not in ROLES:
            _fail(where, p + "'role'", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if ROLES[role].component not in comps:
            _fail(
                where, p + "'role'", f"is {role!r}, but the manifest has no {ROLES[role].component}"
            )
        prec = _need(where, a, "precision", str, p)
        if prec not in PRECISIONS:
            _fail(where, p + "'precision'", f"must be one of {', '.join(PRECISIONS)}, got {prec!r}")
        _need(where, a, "backend", str, p)
        sha = _need(where, a, "sha256", str, p)
        if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
            _fail(where, p + "'sha256'", f"must be 64 hex digits, got {sha!r}")
        for key in ("inputs", "outputs"):
            specs = _need(where, a, key, list, p)
            for j, t in enumerate(specs):
                q = f"{p}{key}[{j}]."
                _need(where, t, "name", str, q)
                _need(where, t, "dtype", str, q)
                shape = _need(where, t, "shape", list, q)
                if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
                    _fail(where, q + "'shape'", f"must hold ints and names, got {shape!r}")
        batch = _need(where, a, "batch", dict, p)
        b = [_need(where, batch, k, int, p + "batch.") for k in ("min", "opt", "max")]
        if not 1 <= b[0] <= b[1] <= b[2]:
            _fail(where, p + "'batch'", f"must satisfy 1 <= min <= opt <= max, got {batch}")
    parity = data.get("parity", {})
    if not isinstance(parity, dict):
        _fail(where, "'parity'", f"must be an object, got {parity!r}")


# -- the one writer ---------------------------------------------------------------------------


class ManifestWriter:
    """The only code that writes a `manifest.json`: builds the document section by section,
    validates it, then commits a build's staged files and the manifest, last and atomically.

        w = ManifestWriter.new(components=..., sampling=..., tools=...)   # or .of(manifest)
        w.put_artifacts(entries); w.put_parity(rows); w.put_trajectories("fp16", rows)
        w.commit(folder, staging)
    """

    def __init__(self, data: dict[str, Any]):
        self.data = copy.deepcopy(data)
        self.data.setdefault("parity", {})

    @classmethod
    def new(
        cls, *, components: dict[str, Any], sampling: dict[str, Any], tools: dict[str, str]
    ) -> ManifestWriter:
        return cls(
            {
                "format": FORMAT,
                "version": VERSION,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "tools": tools,
                "components": components,
                "sampling": sampling,
                "artifacts": [],
                "parity": {"components": []},
            }
        )

    @classmethod
    def of(cls, manifest: Manifest) -> ManifestWriter:
        """Start from an existing build's manifest (a build or check adding to it)."""
        return cls(manifest.data)

    def put_artifacts(self, entries: Iterable[dict[str, Any]]) -> None:
        """Add artefact entries, replacing any of the same file."""
        entries = [dict(e) for e in entries]
        files = {e["file"] for e in entries}
        self.data["artifacts"] = [a for a in self.data["artifacts"] if a["file"] not in files]
        self.data["artifacts"] += entries

    def drop_precision(self, precision: str) -> None:
        """Remove a precision's artefacts and parity rows (a rebuild of it may make fewer)."""
        self.data["artifacts"] = [a for a in self.data["artifacts"] if a["precision"] != precision]
        parity = self.data["parity"]
        for key in ("components", "trajectories"):
            if key in parity:
                parity[key] = [r for r in parity[key] if r.get("precision") != precision]

    def put_parity(self, rows: Iterable[Any]) -> None:
        """Per-artefact parity rows (objects with `to_json()` or dicts), replacing the same
        artefact's earlier row."""
        by_file = {r["artifact"]: r for r in self.data["parity"].get("components", [])}
        for r in rows:
            r = r.to_json() if hasattr(r, "to_json") else dict(r)
            by_file[r["artifact"]] = r
        self.data["parity"]["components"] = list(by_file.values())

    def put_trajectories(self, precisions: Iterable[str], rows: Iterable[Any]) -> None:
        """Trajectory parity rows; replaces only the rows of the precisions measured."""
        precisions = set(precisions)
        kept = [
            r for r in self.data["parity"].get("trajectories", [])
            if r.get("precision") not in precisions
        ]  # fmt: skip
        new = [r.to_json() if hasattr(r, "to_json") else dict(r) for r in rows]
        self.data["parity"]["trajectories"] = kept + new

    def put_section(self, key: str, value: Any) -> None:
        """A top-level section such as "int8" (the calibration and what was quantised)."""
        if key in ("format", "version", "artifacts", "parity"):
            raise ValueError(f"{key!r} is written through its own method")
        self.data[key] = copy.deepcopy(value)

    def commit(self, folder: str | Path, staging: str | Path | None = None) -> dict[str, Any]:
        """Validate, move `staging`'s files into `folder`, then write the manifest last.

        The old manifest goes first, so at no moment does a manifest point at files being
        replaced; a failure before that leaves the old build whole. Returns the data written."""
        folder = Path(folder)
        validate(self.data, folder / MANIFEST_NAME)
        for a in self.data["artifacts"]:
            confined(folder, a["file"])
        if staging is not None:
            (folder / MANIFEST_NAME).unlink(missing_ok=True)
            for f in Path(staging).iterdir():
                os.replace(f, folder / f.name)
        write_json_atomic(folder / MANIFEST_NAME, self.data)
        return copy.deepcopy(self.data)
