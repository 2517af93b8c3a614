"""Model specs: presets, MODEL_FLAGS strings, flag dicts and constructor dicts -> one `ModelSpec`.

A `ModelSpec` says which network class to build with which constructor arguments, and the
diffusion the model was trained with (steps, noise schedule, learned sigma), plus the sampling
settings the original README recommends. It is plain data (JSON-able), so the manifest records it.
"""

from __future__ import annotations

import difflib
import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.presets import PRESETS

NUM_CLASSES = 1000
KINDS = ("unet", "classifier", "superres")

# The original script_util defaults, by group.
MODEL_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
)
DIFFUSION_DEFAULTS: dict[str, Any] = dict(
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
)
CLASSIFIER_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    classifier_use_fp16=False,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
)
SR_KEYS = ("large_size", "small_size")
# Flags the original sampling scripts take that do not change the network.
SAMPLING_FLAGS: dict[str, Any] = dict(
    classifier_scale=None,
    use_ddim=False,
    clip_denoised=True,
    num_samples=None,
    batch_size=None,
    model_path=None,
    classifier_path=None,
    base_samples=None,
)
KNOWN_FLAGS = (
    set(MODEL_DEFAULTS) | set(DIFFUSION_DEFAULTS) | set(CLASSIFIER_DEFAULTS)
    | set(SR_KEYS) | set(SAMPLING_FLAGS)
)  # fmt: skip
CONSTRUCTOR_KEYS = {
    "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
    "attention_resolutions", "dropout", "channel_mult", "conv_resample", "dims", "num_classes",
    "use_fp16", "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
    "resblock_updown", "use_new_attention_order", "pool", "use_checkpoint",
}  # fmt: skip
DIFFUSION_KEYS = {"noise_schedule", "diffusion_steps", "learn_sigma"}
SPEC_EXTRA_KEYS = {
    "kind", "recommended_scale", "recommended_respacing", "recommended_start_t", "grayscale", "class",
}  # fmt: skip


class SpecError(ValueError):
    """A model spec that cannot be turned into a network; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one network and to sample with it.

    `ctor` holds the network class's constructor arguments (attention_resolutions as downsample
    factors); `diffusion` holds `diffusion_steps`, `noise_schedule`, `learn_sigma`.
    """

    kind: str
    ctor: dict[str, Any]
    diffusion: dict[str, Any]
    recommended_scale: float | None = None
    recommended_respacing: str = "250"
    # An upsampler may sample best from its noised bilinear input at this timestep (SDEdit).
    recommended_start_t: int | None = None
    # Trained on grey images replicated into the 3 channels: samples are projected back to grey.
    grayscale: bool = False
    preset: str | None = None
    checkpoint_name: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.ctor["image_size"])

    @property
    def num_classes(self) -> int | None:
        if self.kind == "classifier":
            return int(self.ctor["out_channels"])
        return self.ctor.get("num_classes")

    @property
    def low_res_size(self) -> int | None:
        """An upsampler's input size (`small_size`), None for other kinds."""
        return int(self.ctor["small_size"]) if self.kind == "superres" else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _parse_value(key: str, text: str) -> Any:
    default = {**MODEL_DEFAULTS, **DIFFUSION_DEFAULTS, **CLASSIFIER_DEFAULTS, **SAMPLING_FLAGS}.get(
        key
    )
    if isinstance(default, bool) or text in ("True", "False", "true", "false"):
        if text.lower() not in ("true", "false"):
            raise SpecError(f"flag --{key} takes True or False, got {text!r}")
        return text.lower() == "true"
    if isinstance(default, int) or key in (*SR_KEYS, "num_samples", "batch_size"):
        try:
            return int(text)
        except ValueError:
            raise SpecError(f"flag --{key} takes an integer, got {text!r}") from None
    if isinstance(default, float) or key == "classifier_scale":
        try:
            return float(text)
        except ValueError:
            raise SpecError(f"flag --{key} takes a number, got {text!r}") from None
    return text


def parse_flags(text: str) -> dict[str, Any]:
    """`"--image_size 64 --class_cond True ..."` -> `{"image_size": 64, "class_cond": True, ...}`."""
    tokens = shlex.split(text)
    flags: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise SpecError(f"expected a flag like --image_size, got {tok!r} in {text!r}")
        key, _, inline = tok[2:].partition("=")
        if inline:
            value = inline
            i += 1
        else:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise SpecError(f"flag --{key} has no value in {text!r}")
            value = tokens[i + 1]
            i += 2
        _check_known(key)
        flags[key] = _parse_value(key, value)
    return flags


def _check_known(key: str) -> None:
    if key not in KNOWN_FLAGS:
        close = difflib.get_close_matches(key, sorted(KNOWN_FLAGS), n=3)
        hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
        raise SpecError(
            f"unknown flag --{key}: it is not one of the original guided-diffusion scripts' flags."
            f"{hint} Known: {', '.join(sorted(KNOWN_FLAGS))}."
        )


def _resolutions_to_factors(text: str, image_size: int) -> tuple[int, ...]:
    try:
        return tuple(image_size // int(r) for r in str(text).split(",") if r.strip())
    except ValueError:
        raise SpecError(f"attention resolutions must be like '32,16,8', got {text!r}") from None


def _default_channel_mult(image_size: int, what: str) -> tuple[float, ...]:
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }
    if image_size not in table:
        raise SpecError(
            f"the original {what} has no default channel_mult for image size {image_size} "
            f"(it has them for {sorted(table)}): pass --channel_mult, or a constructor dict"
        )
    return table[image_size]


def _parse_mult(text: str) -> tuple[float, ...]:
    vals = [float(c) for c in str(text).split(",")]
    return tuple(int(v) if v.is_integer() else v for v in vals)


def _diffusion_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    d = {**DIFFUSION_DEFAULTS, **{k: v for k, v in flags.items() if k in DIFFUSION_DEFAULTS}}
    for key in ("use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas"):
        if d[key]:
            raise SpecError(
                f"--{key} True is not supported: every released ADM model uses the default "
                f"(False), and the exported samplers assume it"
            )
    return {k: d[k] for k in ("diffusion_steps", "noise_schedule", "learn_sigma")}


def _infer_kind(flags: dict[str, Any]) -> str:
    if any(k in flags for k in SR_KEYS):
        return "superres"
    model_keys = set(MODEL_DEFAULTS) - {"image_size", "use_fp16"}
    clf_keys = set(CLASSIFIER_DEFAULTS) - {"image_size"}
    if any(k in flags for k in clf_keys) and not any(k in flags for k in model_keys):
        return "classifier"
    return "unet"


def spec_from_flags(flags: dict[str, Any], kind: str | None = None) -> ModelSpec:
    """A dict of the original scripts' flags (defaults filled in) -> ModelSpec."""
    for key in flags:
        _check_known(key)
    kind = kind or _infer_kind(flags)
    diffusion = _diffusion_from_flags(flags)
    scale = flags.get("classifier_scale")
    respacing = str(flags.get("timestep_respacing") or "250")
    if kind == "classifier":
        f = {**CLASSIFIER_DEFAULTS, **{k: v for k, v in flags.items() if k in CLASSIFIER_DEFAULTS}}
        size = f["image_size"]
        mult = _default_channel_mult(size, "classifier")
        ctor = dict(
            image_size=size,
            in_channels=3,
            model_channels=f["classifier_width"],
            out_channels=NUM_CLASSES,
            num_res_blocks=f["classifier_depth"],
            attention_resolutions=_resolutions_to_factors(
                f["classifier_attention_resolutions"], size
            ),
            channel_mult=mult,
            use_fp16=f["classifier_use_fp16"],
            num_head_channels=64,
            use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
            resblock_updown=f["classifier_resblock_updown"],
            pool=f["classifier_pool"],
        )
    else:
        f = {**MODEL_DEFAULTS, **{k: v for k, v in flags.items() if k in MODEL_DEFAULTS}}
        if kind == "superres":
            if "large_size" not in flags or "small_size" not in flags:
                raise SpecError("a super-resolution spec needs both --large_size and --small_size")
            size = int(flags["large_size"])
            mult = (
                _parse_mult(f["channel_mult"])
                if f["channel_mult"]
                else _default_channel_mult(size if size != 512 else 256, "super-resolution model")
            )
        else:
            size = f["image_size"]
            mult = (
                _parse_mult(f["channel_mult"])
                if f["channel_mult"]
                else _default_channel_mult(size, "UNet")
            )
        ctor = dict(
            image_size=size,
            in_channels=3,
            model_channels=f["num_channels"],
            out_channels=6 if diffusion["learn_sigma"] else 3,
            num_res_blocks=f["num_res_blocks"],
            attention_resolutions=_resolutions_to_factors(f["attention_resolutions"], size),
            dropout=f["dropout"],
            channel_mult=mult,
            num_classes=NUM_CLASSES if f["class_cond"] else None,
            use_fp16=f["use_fp16"],
            num_heads=f["num_heads"],
            num_head_channels=f["num_head_channels"],
            num_heads_upsample=f["num_heads_upsample"],
            use_scale_shift_norm=f["use_scale_shift_norm"],
            resblock_updown=f["resblock_updown"],
            # The original sr_create_model does not pass this flag on.
            use_new_attention_order=f["use_new_attention_order"] if kind == "unet" else False,
        )
        if kind == "superres":
            ctor["small_size"] = int(flags["small_size"])
    return ModelSpec(
        kind=kind,
        ctor=ctor,
        diffusion=diffusion,
        recommended_scale=scale,
        recommended_respacing=respacing,
        flags=dict(flags),
    )


def spec_from_ctor(d: dict[str, Any], kind: str | None = None) -> ModelSpec:
    """A dict of the original classes' constructor arguments (plus diffusion keys) -> ModelSpec."""
    unknown = set(d) - CONSTRUCTOR_KEYS - DIFFUSION_KEYS - SPEC_EXTRA_KEYS - {"small_size"}
    if unknown:
        raise SpecError(
            f"unknown constructor argument(s) {sorted(unknown)}; known: "
            f"{sorted(CONSTRUCTOR_KEYS | DIFFUSION_KEYS | SPEC_EXTRA_KEYS)}"
        )
    kind = kind or d.get("kind")
    if kind is None:
        cls = d.get("class", "")
        kind = (
            "classifier" if "pool" in d or cls == "EncoderUNetModel"
            else "superres" if "small_size" in d or cls == "SuperResModel"
            else "unet"
        )  # fmt: skip
    ctor = {k: v for k, v in d.items() if k in CONSTRUCTOR_KEYS | {"small_size"}}
    ctor.pop("use_checkpoint", None)
    for req in ("image_size", "model_channels", "out_channels", "num_res_blocks"):
        if req not in ctor:
            raise SpecError(f"constructor dict for a {kind} is missing {req!r}")
    if kind == "superres" and "small_size" not in ctor:
        raise SpecError(
            'an upsampler\'s constructor arguments need "small_size", the low-res input size '
            "(the original SuperResModel takes it only at sampling time, so it cannot be "
            f'inferred): add e.g. "small_size": {int(ctor["image_size"]) // 4} for a 4x upsampler'
        )
    ctor.setdefault("in_channels", 3)
    ctor.setdefault("attention_resolutions", ())
    ctor["attention_resolutions"] = tuple(int(a) for a in ctor["attention_resolutions"])
    if "channel_mult" in ctor:
        ch = ctor["channel_mult"]
        ctor["channel_mult"] = _parse_mult(ch) if isinstance(ch, str) else tuple(ch)
    learn_sigma = d.get("learn_sigma", kind != "classifier" and ctor["out_channels"] == 6)
    diffusion = dict(
        diffusion_steps=int(d.get("diffusion_steps", 1000)),
        noise_schedule=d.get("noise_schedule", "linear"),
        learn_sigma=bool(learn_sigma),
    )
    return ModelSpec(
        kind=kind,
        ctor=ctor,
        diffusion=diffusion,
        recommended_scale=d.get("recommended_scale"),
        recommended_respacing=str(d.get("recommended_respacing", "250")),
        recommended_start_t=d.get("recommended_start_t"),
        grayscale=bool(d.get("grayscale", False)),
    )


def resolve_spec(spec: str | dict[str, Any] | ModelSpec, kind: str | None = None) -> ModelSpec:
    """A preset name, a MODEL_FLAGS string, a flags dict, a constructor dict or a JSON file path."""
    if kind is not None and kind not in KINDS:
        raise SpecError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(spec, ModelSpec):
        out = spec
    elif isinstance(spec, dict):
        if "model_channels" in spec:
            out = spec_from_ctor(spec, kind)
        else:
            flags = {k: v for k, v in spec.items() if k != "kind"}
            out = spec_from_flags(flags, kind or spec.get("kind"))
    elif isinstance(spec, str) and spec.strip().startswith("--"):
        out = spec_from_flags(parse_flags(spec), kind)
    elif isinstance(spec, str) and spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise SpecError(f"config file {spec} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SpecError(f"config file {spec} is not valid JSON: {e}") from None
        return resolve_spec(data, kind)
    elif isinstance(spec, str):
        out = preset_spec(spec)
    else:
        raise SpecError(f"cannot make a model spec from {type(spec).__name__}")
    if kind is not None and out.kind != kind:
        if out.preset is not None:
            raise SpecError(
                f"preset {out.preset} is a {out.kind}, not a {kind}: "
                f"use a {kind} preset ({', '.join(n for n, p in PRESETS.items() if p['kind'] == kind)})"
            )
        out = resolve_spec({**out.flags, "kind": kind}) if out.flags else out
    return out


def preset_spec(name: str) -> ModelSpec:
    """The spec of a preset, by name or by its checkpoint's file name (`64x64_diffusion.pt`)."""
    key = _preset_key(name)
    p = PRESETS[key]
    if "argv" in p:
        base = spec_from_flags(parse_flags(p["argv"]), p["kind"])
    else:
        base = spec_from_ctor(p["ctor"], p["kind"])
    return ModelSpec(
        kind=base.kind,
        ctor=base.ctor,
        diffusion=base.diffusion,
        recommended_scale=p.get("recommended_scale"),
        recommended_respacing=p.get("recommended_respacing", "250"),
        recommended_start_t=p.get("recommended_start_t"),
        grayscale=bool(p.get("grayscale", False)),
        preset=key,
        checkpoint_name=p.get("checkpoint"),
        flags=base.flags,
    )


def _preset_key(name: str) -> str:
    if name in PRESETS:
        return name
    stem = Path(name).name.removesuffix(".pt").removesuffix(".safetensors")
    for key, p in PRESETS.items():
        if p.get("checkpoint", "").removesuffix(".pt") == stem:
            return key
    close = difflib.get_close_matches(name, list(PRESETS), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise SpecError(
        f"unknown preset {name!r}.{hint} Presets: {', '.join(PRESETS)} "
        f"(`gdexport presets` lists them); or pass MODEL_FLAGS starting with '--'."
    )


# Preset sets for `--set`: the components that are sampled together.
PRESET_SETS: dict[str, dict[str, str]] = {
    "digits": {
        "unet": "digits-16",
        "classifier": "digits-16-classifier",
        "upsampler": "digits-16-32-upsampler",
    },
    "adm-64": {"unet": "adm-64", "classifier": "adm-64-classifier", "upsampler": "adm-64-256"},
    "adm-128": {"unet": "adm-128", "classifier": "adm-128-classifier", "upsampler": "adm-128-512"},
    "adm-256": {"unet": "adm-256", "classifier": "adm-256-classifier"},
    "adm-512": {"unet": "adm-512", "classifier": "adm-512-classifier"},
}
