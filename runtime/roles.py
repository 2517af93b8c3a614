"""The roles of a build: which component each graph comes from, and its inputs and outputs.

One declarative table, read by ONNX export (input and output names), parity (what to feed),
the build loop (which graphs become engines), calibration (what to record), `Pipeline` (what to
feed each engine) and Triton (which models to serve). Standard library only, like the manifest.

Dims are ints or names: "batch" (dynamic), "C" (image channels, 3), "H"/"W" (the component's
image size), "h"/"w" (an upsampler's low-res size). `IOSpec.shape(sizes)` resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass

COMPONENTS = ("unet", "classifier", "upsampler")
# The reference network class of each component (`ModelSpec.kind`).
COMPONENT_KIND = {"unet": "unet", "classifier": "classifier", "upsampler": "superres"}


@dataclass(frozen=True)
class IOSpec:
    """One input or output of a role's graph. `optional`: present only for class-conditional
    models (the UNet's and upsampler's labels)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    optional: bool = False

    def shape(self, sizes: dict[str, int]) -> tuple[int | str, ...]:
        """Dims with the named sizes filled in; "batch" stays symbolic."""
        return tuple(sizes.get(d, d) if isinstance(d, str) else d for d in self.dims)


@dataclass(frozen=True)
class Role:
    """A graph of a build: `name` (the manifest's `role`), the `component` it comes from, its
    fp32 `file`, whether the build makes an `engine` of it, its inputs and outputs, and the
    batch sizes a parity check runs (gradients at several, for batch-coupling bugs)."""

    name: str
    component: str
    file: str
    engine: bool
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    check_batches: tuple[int, ...] = (1, 3)

    @property
    def output(self) -> str:
        return self.outputs[0].name

    def input_names(self, conditional: bool) -> list[str]:
        """Input names, in graph order, of a class-conditional model or not."""
        return [i.name for i in self.inputs if conditional or not i.optional]

    def batches_within(self, batch: dict[str, int]) -> tuple[int, ...]:
        """`check_batches` inside an engine's batch range, else its minimum alone."""
        inside = tuple(b for b in self.check_batches if batch["min"] <= b <= batch["max"])
        return inside or (batch["min"],)


_X = IOSpec("x", "float32", ("batch", "C", "H", "W"))
_T = IOSpec("t", "int64", ("batch",))

ROLES: dict[str, Role] = {
    r.name: r
    for r in (
        Role(
            "unet", "unet", "unet.onnx", True,
            (_X, _T, IOSpec("y", "int64", ("batch",), optional=True)),
            (IOSpec("out", "float32", ("batch", "C_out", "H", "W")),),
        ),
        Role(
            "classifier_grad", "classifier", "classifier_grad.onnx", True,
            (_X, _T, IOSpec("y", "int64", ("batch",)), IOSpec("scale", "float32", ("batch",))),
            (IOSpec("grad", "float32", ("batch", "C", "H", "W")),),
            check_batches=(1, 4, 16),
        ),
        Role(
            "classifier", "classifier", "classifier.onnx", False,
            (_X, _T),
            (IOSpec("logits", "float32", ("batch", "classes")),),
        ),
        Role(
            "upsampler", "upsampler", "upsampler.onnx", True,
            (_X, _T, IOSpec("low_res", "float32", ("batch", "C", "h", "w")),
             IOSpec("y", "int64", ("batch",), optional=True)),
            (IOSpec("out", "float32", ("batch", "C_out", "H", "W")),),
        ),
    )
}  # fmt: skip
# The roles the build turns into engines and the runtime loads, in stage order.
ENGINE_ROLES = tuple(name for name, r in ROLES.items() if r.engine)


def roles_of(component: str) -> list[Role]:
    """The graphs exported for a component, in export order."""
    return [r for r in ROLES.values() if r.component == component]


def role(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise KeyError(f"unknown role {name!r}: one of {', '.join(ROLES)}") from None
