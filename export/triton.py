"""`gdexport triton`: a Triton Inference Server model repository made from a build.

    REPO/
      gd_unet/config.pbtxt            tensorrt_plan for a .plan, onnxruntime_onnx for a .onnx
      gd_unet/1/unet.plan             the build's engine, unchanged (checked against its sha256)
      gd_classifier_grad/...          the classifier's input-gradient engine
      gd_upsampler/...                the super-resolution engine (cascades)
      gd_sampler/config.pbtxt         Python backend: the guided loop in the server
      gd_sampler/1/model.py           -> runtime.triton.TritonPythonModel
      gd_sampler/1/runtime/           this installation's runtime package (numpy only), copied so
                                      the repository runs in a stock tritonserver container
      gd_sampler/1/manifest.json      the build's manifest (schedules, sampling defaults, engine I/O)

The sampler calls the engine models every step through BLS, so Triton's dynamic batcher merges the
step calls of concurrent requests. Ensembles cannot loop, hence the Python model. The repository is
written to a staging folder and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import runtime
from runtime.manifest import NEAREST_PRECISIONS, Artifact, Manifest, ManifestError, TensorSpec
from runtime.roles import ENGINE_ROLES

MODEL_NAMES = {role: f"gd_{role}" for role in ENGINE_ROLES} | {"sampler": "gd_sampler"}
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
}
KINDS = ("auto", "gpu", "cpu")
# What a gd_sampler request carries; documented in runtime/triton.py.
SAMPLER_INPUTS = (
    ("labels", "TYPE_INT64", [-1], True),
    ("num_samples", "TYPE_INT32", [1], True),
    ("scale", "TYPE_FP32", [1], True),
    ("steps", "TYPE_INT32", [1], True),
    ("seed", "TYPE_INT64", [1], True),
    ("first_index", "TYPE_INT64", [1], True),
    ("sampler", "TYPE_STRING", [1], True),
)


class TritonRepoError(ValueError):
    """A build that cannot be turned into a model repository; the message says what to do."""


def pick_artifacts(
    manifest: Manifest, precision: str | None, backend: str | None
) -> dict[str, Artifact]:
    """The engine per role: the UNet at `precision`/`backend` (default: the best present), the
    classifier gradient and upsampler at the nearest precision of the same backend."""
    order = ("int8", "fp16", "fp32") if precision is None else (precision,)
    backends = (backend,) if backend else ("tensorrt", "onnxruntime")
    unet = next(
        (a for b in backends for p in order if (a := manifest.artifact("unet", p, b)) is not None),
        None,
    )
    if unet is None:
        have = sorted(
            {f"{a.precision}/{a.backend}" for a in manifest.artifacts if a.role == "unet"}
        )
        raise TritonRepoError(
            f"{manifest.folder} has no UNet engine for precision {precision or 'any'} and backend "
            f"{backend or 'any'} (it has: {', '.join(have) or 'none'}); pass --precision/--backend "
            f"from that list, or run `gdexport build -o {manifest.folder} --fp16` first"
        )
    chosen = {"unet": unet}
    for role in ENGINE_ROLES[1:]:
        for p in NEAREST_PRECISIONS[unet.precision]:
            if (a := manifest.artifact(role, p, unet.backend)) is not None:
                chosen[role] = a
                break
    return chosen


def batchable(artifact: Artifact) -> bool:
    """Triton batches a model only when every input and output has the batch dimension first."""
    return all(s.shape[:1] == ("batch",) for s in (*artifact.inputs, *artifact.outputs))


def _tensor_block(spec: TensorSpec) -> str:
    """One tensor of a batched model, without its batch dimension. Triton has no rank-0 dims: a
    scalar per sample travels as [1] and is reshaped to [] for the engine."""
    dims = [-1 if isinstance(s, str) else int(s) for s in spec.shape[1:]]
    scalar = not dims
    if spec.dtype not in TRITON_DTYPES:
        raise TritonRepoError(f"tensor {spec.name!r} has dtype {spec.dtype}, unknown to Triton")
    reshape = " reshape: { shape: [ ] }" if scalar else ""
    return (
        f'  {{ name: "{spec.name}" data_type: {TRITON_DTYPES[spec.dtype]} '
        f"dims: [ {', '.join(map(str, dims or [1]))} ]{reshape} }}"
    )


def engine_config(
    role: str,
    art: Artifact,
    *,
    kind: str,
    instances: int,
    queue_delay_us: int,
) -> str:
    """config.pbtxt of one engine model (batched: `make_repository` admits no other)."""
    name = MODEL_NAMES[role]
    lines = [f'name: "{name}"']
    if art.backend == "tensorrt":
        lines.append('platform: "tensorrt_plan"')
    else:
        lines.append('backend: "onnxruntime"')
    lines.append(f'default_model_filename: "{art.file}"')
    lines.append(f"max_batch_size: {art.batch['max']}")
    lines.append("input [\n" + ",\n".join(_tensor_block(s) for s in art.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor_block(s) for s in art.outputs) + "\n]")
    lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {int(queue_delay_us)} }}")
    triton_kind = "KIND_GPU" if kind == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [ {{ kind: {triton_kind} count: {int(instances)} }} ]")
    return "\n".join(lines) + "\n"


def sampler_config(arts: dict[str, Artifact], *, instances: int, max_samples: int) -> str:
    params = {"max_samples": str(max_samples)}
    for role, art in arts.items():
        params[f"{role}_model"] = MODEL_NAMES[role]
        params[f"{role}_file"] = art.file
    lines = [
        'name: "gd_sampler"',
        'backend: "python"',
        "max_batch_size: 0",
        "input [\n"
        + ",\n".join(
            f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(map(str, d))} ] optional: {str(o).lower()} }}'
            for n, t, d, o in SAMPLER_INPUTS
        )
        + "\n]",
        "output [\n"
        '  { name: "images" data_type: TYPE_UINT8 dims: [ -1, -1, -1, 3 ] },\n'
        '  { name: "labels" data_type: TYPE_INT64 dims: [ -1 ] }\n'
        "]",
        # One request per instance at a time: the instance count is how many requests the
        # server samples concurrently (their step calls meet in the engines' batchers).
        f"instance_group [ {{ kind: KIND_CPU count: {int(instances)} }} ]",
        "parameters [\n"
        + ",\n".join(
            f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()
        )
        + "\n]",
    ]
    return "\n".join(lines) + "\n"


SAMPLER_MODEL_PY = '''"""gd_sampler: the guided sampling loop of gdexport's runtime, run by Triton's Python backend.

Made by `gdexport triton`; the `runtime` package beside this file is the runtime it was made with.
"""

import sys
from pathlib import Path

# This version folder first, so the runtime copied here wins over any other installed one.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime.triton import TritonPythonModel  # noqa: E402,F401
'''


def _copy_runtime(dest: Path) -> None:
    src = Path(runtime.__file__).resolve().parent
    shutil.copytree(src, dest / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def make_repository(
    build_dir: str | Path,
    out: str | Path,
    *,
    precision: str | None = None,
    backend: str | None = None,
    kind: str = "auto",
    instances: int = 1,
    sampler_instances: int = 8,
    queue_delay_us: int = 2000,
    max_samples: int = 64,
    force: bool = False,
) -> dict[str, Artifact]:
    """Write the model repository for `build_dir` to `out` (staged, then renamed into place).

    Returns the artefact chosen per role. `kind`: where the engine models run (auto: GPU for
    TensorRT plans, CPU for ONNX graphs). `sampler_instances`: requests sampled concurrently.
    """
    if kind not in KINDS:
        raise TritonRepoError(f"kind must be one of {KINDS}, got {kind!r}")
    for what, v in (("instances", instances), ("sampler instances", sampler_instances)):
        if v < 1:
            raise TritonRepoError(f"{what} must be at least 1, got {v}")
    if max_samples < 1:
        raise TritonRepoError(f"max samples must be at least 1, got {max_samples}")
    if queue_delay_us < 0:
        raise TritonRepoError(f"queue delay must be >= 0 microseconds, got {queue_delay_us}")
    manifest = Manifest.load(build_dir)
    out = Path(out)
    if out.exists() and not force:
        raise TritonRepoError(f"{out} exists; pass --force to replace it, or choose another -o")
    arts = pick_artifacts(manifest, precision, backend)
    for art in arts.values():
        if not batchable(art):
            unbatched = [s.name for s in art.inputs if s.shape[:1] != ("batch",)]
            raise TritonRepoError(
                f"{art.file} takes {', '.join(unbatched)} as one scalar per call (exported before "
                f"gdexport took one guidance scale per sample); Triton batches only tensors with "
                f"a batch dimension and serves no scalar inputs. "
                f"Export and build again: `gdexport build -o NEW_DIR ...` with the same sources"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for role, art in arts.items():
            model_kind = kind if kind != "auto" else ("gpu" if art.backend == "tensorrt" else "cpu")
            folder = staging / MODEL_NAMES[role]
            (folder / "1").mkdir(parents=True)
            src = manifest.verify(art)
            shutil.copy2(src, folder / "1" / art.file)
            data = art.extra.get("external_data")
            if data:
                data_src = manifest.folder / data["file"]
                if not data_src.is_file():
                    raise ManifestError(f"{data_src} is missing, though the manifest lists it")
                shutil.copy2(data_src, folder / "1" / data["file"])
            (folder / "config.pbtxt").write_text(
                engine_config(
                    role,
                    art,
                    kind=model_kind,
                    instances=instances,
                    queue_delay_us=queue_delay_us,
                )  # fmt: skip
            )
        folder = staging / MODEL_NAMES["sampler"]
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.py").write_text(SAMPLER_MODEL_PY)
        _copy_runtime(folder / "1")
        shutil.copy2(manifest.folder / "manifest.json", folder / "1" / "manifest.json")
        (folder / "config.pbtxt").write_text(
            sampler_config(arts, instances=sampler_instances, max_samples=max_samples)
        )
        (staging / "README.md").write_text(_readme(manifest, arts))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return arts


def _readme(manifest: Manifest, arts: dict[str, Artifact]) -> str:
    engines = "\n".join(
        f"- `{MODEL_NAMES[r]}`: {a.file} ({a.precision}, {a.backend})" for r, a in arts.items()
    )
    return (
        f"# Triton model repository (gdexport)\n\nMade from {manifest.folder.resolve()}.\n\n"
        f"{engines}\n- `gd_sampler`: the guided loop (Python backend, numpy only)\n\n"
        "Serve: `tritonserver --model-repository .`; "
        "request: see `examples/triton_client.py` in gdexport.\n\n"
        "Build facts:\n\n```json\n" + json.dumps(manifest.sampling, indent=1) + "\n```\n"
    )
