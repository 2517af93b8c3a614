"""`build_model` and `load_model`: a spec (and a checkpoint) -> an eval-mode PyTorch network."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.model import EncoderUNetModel, SuperResModel, UNetModel
from export.presets import PRESETS
from export.spec import ModelSpec, SpecError, preset_spec, resolve_spec


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested network; the message says why."""


def build_model(spec: str | dict[str, Any] | ModelSpec, *, kind: str | None = None) -> nn.Module:
    """Build the network a spec describes, in eval mode, on the current default device.

    `spec`: a preset name, a MODEL_FLAGS string, a flags dict, a constructor-argument dict, or a
    `ModelSpec`. `kind`: "unet", "classifier" or "superres" (inferred where the spec says it).
    `with torch.device("meta"): build_model("adm-256")` builds without allocating.
    """
    s = resolve_spec(spec, kind)
    # The reference computes in fp32 whatever the training flags said; the fp16 export casts the
    # trunk explicitly (`model.convert_trunk(torch.float16)`), as the original's sampling does.
    ctor = {k: v for k, v in s.ctor.items() if k != "small_size"} | {"use_fp16": False}
    cls = {"unet": UNetModel, "superres": SuperResModel, "classifier": EncoderUNetModel}[s.kind]
    try:
        model = cls(**ctor)
    except TypeError as e:
        raise SpecError(f"cannot build a {s.kind} from {ctor}: {e}") from None
    model.spec = s  # type: ignore[attr-defined]
    return model.eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.pt` (weights only, no code runs) or `.safetensors` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(
                "reading .safetensors needs the safetensors package: pip install 'gdexport[export]'"
            ) from None
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file: {e}"
            ) from None
    head = path.read_bytes()[:4] if path.stat().st_size else b""
    looks_torch = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
    size = path.stat().st_size
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not looks_torch:
            raise CheckpointError(
                f"checkpoint {path} ({size:,} bytes) is not a PyTorch checkpoint (no zip or pickle "
                f"header); pass the .pt or .safetensors file the model was saved to"
            ) from None
        raise CheckpointError(
            f"refused to load {path}: it is a pickle that would run code or build objects other "
            f"than tensors, and gdexport loads checkpoints with weights_only=True. If you trust the "
            f"file, convert its tensors to safetensors in a separate Python session and pass that "
            f"file: obj = torch.load(p, weights_only=False); sd = obj if isinstance(obj, dict) "
            f"else obj.state_dict(); safetensors.torch.save_file({{k: v.contiguous() for k, v in "
            f"sd.items()}}, 'model.safetensors'). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        OSError,
        KeyError,
        IndexError,
        ValueError,
    ) as e:
        what = "looks truncated" if looks_torch else "is not a PyTorch checkpoint"
        raise CheckpointError(
            f"checkpoint {path} ({size:,} bytes) cannot be read: it {what}; download or copy it "
            f"again. Detail: {(str(e).splitlines() or [type(e).__name__])[0]}"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return sd


def _fitting_presets(sd: dict[str, torch.Tensor]) -> list[str]:
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    fits = []
    for name in PRESETS:
        with torch.device("meta"):
            m = build_model(name)
        if {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes:
            fits.append(name)
    return fits


def check_state_dict(
    model: nn.Module, sd: dict[str, torch.Tensor], source: str, flag: str = "--preset"
) -> None:
    """Raise CheckpointError naming counts, missing / unexpected / misshapen tensors, a fitting preset."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    if want == have:
        return
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    spec: ModelSpec = getattr(model, "spec", None)
    what = f"preset {spec.preset}" if spec is not None and spec.preset else "the given spec"
    parts = [
        f"checkpoint {source} has {len(have)} tensors, {what} ({spec.kind if spec else 'model'}) expects {len(want)}"
    ]
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} with the wrong shape (first: {'; '.join(wrong[:3])})")
    if "out.2.positional_embedding" in have and "out.2.positional_embedding" not in want:
        parts.append(
            "the checkpoint is a classifier (it has an attention-pool head): load it as kind='classifier'"
        )
    fits = _fitting_presets(sd)
    if fits:
        parts.append(f"did you mean {flag} {' or '.join(fits)}?")
    else:
        parts.append("no preset fits it: pass the MODEL_FLAGS it was trained with")
    raise CheckpointError("; ".join(parts))


def load_model(
    spec: str | dict[str, Any] | ModelSpec,
    checkpoint: str | Path,
    *,
    kind: str | None = None,
    flag: str = "--preset",
) -> nn.Module:
    """Build the network for `spec` and load `checkpoint` into it, unchanged; eval mode, fp32.

    Raises CheckpointError / SpecError with the fix in the message (`flag`: the CLI option a
    fitting preset is suggested for)."""
    sd = read_state_dict(checkpoint)
    if kind is None and isinstance(spec, str) and spec.strip().startswith("--"):
        # A MODEL_FLAGS string carries model and classifier flags alike: the file decides.
        if "out.2.positional_embedding" in sd or "out.2.c_proj.weight" in sd:
            kind = "classifier"
    with torch.device("meta"):
        meta = build_model(spec, kind=kind)
    check_state_dict(meta, sd, str(checkpoint), flag)
    model = build_model(meta.spec)
    model.load_state_dict(sd)
    return model.eval()


__all__ = ["build_model", "load_model", "read_state_dict", "CheckpointError", "preset_spec"]
