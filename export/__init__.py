"""gdexport's build-time half: the PyTorch reference of the ADM networks and their export."""

from export.loading import CheckpointError, build_model, load_model, read_state_dict
from export.spec import ModelSpec, SpecError, resolve_spec

__all__ = [
    "build_model",
    "load_model",
    "read_state_dict",
    "resolve_spec",
    "ModelSpec",
    "SpecError",
    "CheckpointError",
]
