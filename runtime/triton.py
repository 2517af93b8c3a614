"""The `gd_sampler` model of a Triton repository (`gdexport triton`): `Pipeline.sample`, this
runtime's own loop, run by Triton's Python backend with the engines called through BLS.

Request inputs (optional ones take the build's defaults):
    labels       INT64 [N]   class of each sample (or `num_samples` for an unconditional build)
    num_samples  INT32 [1]   samples when no labels are given (labels then drawn per sample)
    scale        FP32  [1]   classifier guidance scale, 0 = unguided (default: the manifest's)
    steps        INT32 [1]   sampling steps (default: the manifest's respacing)
    seed         INT64 [1]   sample j uses the generator (seed, first_index + j), as in-process
    first_index  INT64 [1]   index of the request's first sample (default 0)
    sampler      BYTES [1]   "ddim" (default) or "ddpm"
Response outputs: images UINT8 [N, H, W, 3], labels INT64 [N].

A bad request gets an error response that says what was wrong; the model keeps serving.
`triton_python_backend_utils` exists only inside the server, so it is imported there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import BackendError, check_feeds
from runtime.manifest import Artifact, Manifest, TensorSpec
from runtime.pipeline import Pipeline, SamplingError
from runtime.roles import ENGINE_ROLES as ROLES


class BlsBackend:
    """A Backend whose engine is another model of the same Triton server, called through BLS.

    Every engine model is batched. Triton has no rank-0 dims, so a scalar per sample travels as
    [B, 1] and the engine model's config reshapes it back to [B] (`gdexport triton` writes it).
    """

    def __init__(self, model_name: str, artifact: Artifact):
        self.model_name = model_name
        self.inputs: dict[str, TensorSpec] = {s.name: s for s in artifact.inputs}
        self.outputs: dict[str, TensorSpec] = {s.name: s for s in artifact.outputs}
        self.batch = artifact.batch
        self._out_names = list(self.outputs)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import triton_python_backend_utils as pb_utils

        check_feeds(self.inputs, feeds, self.batch)
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(a).reshape(-1, 1) if a.ndim == 1 else a)
            for name, a in ((n, feeds[n]) for n in self.inputs)
        ]
        request = pb_utils.InferenceRequest(
            model_name=self.model_name,
            requested_output_names=self._out_names,
            inputs=tensors,
        )
        response = request.exec()
        if response.has_error():
            raise BackendError(f"Triton model {self.model_name}: {response.error().message()}")
        return {
            name: np.array(pb_utils.get_output_tensor_by_name(response, name).as_numpy())
            for name in self._out_names
        }

    def close(self) -> None:
        pass


def _scalar(request, name: str, kind: type, default: Any = None) -> Any:
    import triton_python_backend_utils as pb_utils

    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    a = t.as_numpy().reshape(-1)
    if a.size != 1:
        raise SamplingError(f"input {name!r} must hold one value, got {a.size}")
    v = a[0]
    if kind is str:
        return (v.decode() if isinstance(v, bytes) else str(v)).strip()
    return kind(v)


class TritonPythonModel:
    """Triton's entry point: `initialize` opens the pipeline over BLS backends, `execute` samples."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        manifest = Manifest.load(folder / "manifest.json")
        engines: dict[str, tuple[Artifact, BlsBackend] | None] = {}
        for role in ROLES:
            file = params.get(f"{role}_file")
            if not file:
                engines[role] = None
                continue
            art = manifest.artifact_for_file(file)
            engines[role] = (art, BlsBackend(params[f"{role}_model"], art))
        self.pipeline = Pipeline(
            manifest, engines["unet"], engines["classifier_grad"], engines["upsampler"]
        )
        self.max_samples = int(params.get("max_samples", "64"))

    def _sample(self, request):
        import triton_python_backend_utils as pb_utils

        labels_t = pb_utils.get_input_tensor_by_name(request, "labels")
        labels = None if labels_t is None else labels_t.as_numpy().reshape(-1).astype(np.int64)
        num = _scalar(request, "num_samples", int)
        n = len(labels) if labels is not None else num
        if n is None:
            raise SamplingError("send `labels` (INT64 [N]) or `num_samples` (INT32 [1])")
        if not 1 <= n <= self.max_samples:
            raise SamplingError(
                f"{n} samples requested; one request takes 1..{self.max_samples} "
                f"(split it, or remake the repository with a larger --max-samples)"
            )
        steps = _scalar(request, "steps", int)
        sampler = _scalar(request, "sampler", str, "ddim")
        if steps is not None and steps < 1:
            raise SamplingError(f"steps must be a positive number of sampling steps, got {steps}")
        respacing = None if steps is None else (f"ddim{steps}" if sampler == "ddim" else str(steps))
        scale = _scalar(request, "scale", float)
        if scale is not None and not np.isfinite(scale):
            raise SamplingError(f"scale must be a finite number, got {scale}")
        seed = _scalar(request, "seed", int, 0)
        first = _scalar(request, "first_index", int, 0)
        if seed < 0 or first < 0:
            raise SamplingError(f"seed and first_index must be >= 0, got {seed} and {first}")
        result = self.pipeline.sample(
            labels, num_samples=None if labels is not None else num, scale=scale,
            steps=respacing, sampler=sampler, seed=seed, first_index=first,
        )  # fmt: skip
        out_labels = result.labels if result.labels is not None else np.full(n, -1, np.int64)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("images", np.ascontiguousarray(result.images)),
                pb_utils.Tensor("labels", out_labels.astype(np.int64)),
            ]
        )

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                responses.append(self._sample(request))
            except SamplingError as e:  # the request's fault: HTTP 400 / INVALID_ARGUMENT
                err = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
            except BackendError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
            except Exception as e:  # keep serving: the error goes to this request only
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"gd_sampler failed: {type(e).__name__}: {e}")
                    )
                )
        return responses

    def finalize(self) -> None:
        self.pipeline.close()
