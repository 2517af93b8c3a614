"""Backends: one tiny protocol, numpy in and numpy out, the caller owns the outputs.

Each backend module imports its heavy library (onnxruntime, openvino, tensorrt + cuda-python)
itself, so
importing this package costs nothing. `open_backend` picks one from the file's suffix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.manifest import TensorSpec

BACKENDS = ("onnxruntime", "openvino", "tensorrt")


class BackendError(RuntimeError):
    """A backend that cannot be created or run; the message says what to do."""


class Backend(Protocol):
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def backend_for_file(path: str | Path) -> str:
    suffix = Path(path).suffix
    if suffix == ".plan" or suffix == ".engine":
        return "tensorrt"
    if suffix == ".onnx" or suffix == ".ort":
        return "onnxruntime"
    if suffix == ".xml":
        return "openvino"
    raise BackendError(
        f"cannot tell the backend of {path}: expected a .onnx (ONNX Runtime), .xml (OpenVINO IR) "
        f"or .plan (TensorRT) file, or pass --backend {'/'.join(BACKENDS)}"
    )


def open_backend(path: str | Path, backend: str | None = None, **options) -> Backend:
    """Create the backend for an engine file. `backend`: "onnxruntime", "openvino", "tensorrt"
    or None (from the file's suffix). OpenVINO also runs every ONNX graph.

    Options go to the backend's constructor (ONNX Runtime: `providers`, `threads`; OpenVINO:
    `precision`, `threads`, `cache_dir`, `device`).
    """
    name = backend or backend_for_file(path)
    if name == "onnxruntime":
        from runtime.backends.onnxruntime import OrtBackend

        return OrtBackend(path, **options)
    if name == "openvino":
        from runtime.backends.openvino import OvBackend

        return OvBackend(path, **options)
    if name == "tensorrt":
        from runtime.backends.tensorrt import TrtBackend

        return TrtBackend(path, **options)
    raise BackendError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")


def check_feeds(
    specs: Mapping[str, TensorSpec],
    feeds: Mapping[str, np.ndarray],
    batch: Mapping[str, int] | None,
) -> None:
    """Raise BackendError on a missing / unexpected input, a wrong dtype or shape, or a batch
    outside the engine's range. Cheap: shapes and dtypes only."""
    missing = [n for n in specs if n not in feeds]
    extra = [n for n in feeds if n not in specs]
    if missing or extra:
        raise BackendError(
            f"engine inputs are {list(specs)}; missing {missing}, unexpected {extra}"
        )
    for name, spec in specs.items():
        a = feeds[name]
        if a.dtype != np.dtype(spec.dtype):
            raise BackendError(f"input {name!r} must be {spec.dtype}, got {a.dtype}")
        if len(a.shape) != len(spec.shape) or any(
            isinstance(s, int) and s != d for s, d in zip(spec.shape, a.shape)
        ):
            raise BackendError(f"input {name!r} must have shape {spec.shape}, got {a.shape}")
        if batch and spec.shape and spec.shape[0] == "batch":
            b = a.shape[0]
            if not batch["min"] <= b <= batch["max"]:
                raise BackendError(
                    f"batch {b} is outside the engine's range {batch['min']}..{batch['max']}; "
                    f"use a batch in range or rebuild with --batch-max {b}"
                )
