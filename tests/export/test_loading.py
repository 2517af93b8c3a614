"""Loading checkpoints: a good file loads unchanged, a bad one fails with the facts in the message."""

from __future__ import annotations

import os

import pytest
import torch

from export.loading import CheckpointError, build_model, check_state_dict, load_model
from export.spec import SpecError

UNET = {
    "image_size": 16, "model_channels": 32, "out_channels": 3, "num_res_blocks": 1,
    "attention_resolutions": [2], "channel_mult": [1, 2], "num_head_channels": 32,
}  # fmt: skip
CLASSIFIER = {**UNET, "out_channels": 10, "pool": "attention"}


def _randomised(spec) -> torch.nn.Module:
    model = build_model(spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, 0.0, 0.2, generator=g)
    return model


def _meta_state_dict(spec) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build_model(spec).state_dict()


def _save(tmp_path, spec, name: str = "model.pt"):
    path = tmp_path / name
    torch.save(_randomised(spec).state_dict(), path)
    return path


def test_pt_round_trip(tmp_path):
    model = _randomised(UNET)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # the wrapped form loads too
    loaded = load_model(UNET, path)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 999])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


def test_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _randomised(UNET)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(model.state_dict(), path)
    loaded = load_model(UNET, path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 999])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


def test_wrong_spec_names_counts_and_tensors(tmp_path):
    path = _save(tmp_path, UNET)
    other = {**UNET, "num_res_blocks": 2}
    have, want = _meta_state_dict(UNET), _meta_state_dict(other)
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    assert missing and unexpected
    with pytest.raises(CheckpointError) as e:
        load_model(other, path)
    msg = str(e.value)
    assert str(path) in msg
    assert f"has {len(have)} tensors" in msg and f"expects {len(want)}" in msg
    assert f"{len(missing)} missing" in msg and missing[0] in msg
    assert f"{len(unexpected)} unexpected" in msg and unexpected[0] in msg


def test_wrong_width_names_misshapen_tensors(tmp_path):
    path = _save(tmp_path, UNET)
    with pytest.raises(CheckpointError) as e:
        load_model({**UNET, "model_channels": 64}, path)
    msg = str(e.value)
    # Same names, other widths: the message shows the first offender with both shapes.
    assert "wrong shape" in msg and "time_embed.0.weight (128, 32) vs (256, 64)" in msg


def test_checkpoint_of_another_preset_suggests_it():
    # Shapes are all the check needs, so meta tensors stand in for the 1.7 GB file.
    with torch.device("meta"):
        model = build_model("adm-64")
    released = _meta_state_dict("adm-128")
    with pytest.raises(CheckpointError) as e:
        check_state_dict(model, released, "128x128_diffusion.pt")
    msg = str(e.value)
    assert f"has {len(released)} tensors" in msg
    assert f"preset adm-64 (unet) expects {len(model.state_dict())}" in msg
    assert "did you mean --preset adm-128?" in msg


def test_classifier_loaded_as_unet(tmp_path):
    path = _save(tmp_path, CLASSIFIER, "classifier.pt")
    with pytest.raises(CheckpointError, match="classifier") as e:
        load_model(UNET, path)
    assert "out.2.positional_embedding" in str(e.value)
    assert load_model(CLASSIFIER, path).out_channels == 10  # the right kind loads


def test_truncated_file(tmp_path):
    path = _save(tmp_path, UNET)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(UNET, path)
    assert str(path) in str(e.value) and "truncated" in str(e.value)
    assert f"{len(data) // 2:,} bytes" in str(e.value)


class _RunsCode:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refused") as e:
        load_model(UNET, path)
    assert "weights_only" in str(e.value)
    assert not marker.exists(), "loading the checkpoint ran its code"
    # Control: the payload is live, so the assertion above could fail.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_unknown_flag_suggests_the_right_one():
    with pytest.raises(SpecError) as e:
        build_model("--image_size 64 --num_chanels 128")
    msg = str(e.value)
    assert "--num_chanels" in msg and "Did you mean --num_channels" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_model(UNET, path)
    assert str(path) in str(e.value)


NOT_CHECKPOINTS = {
    "empty": b"",  # torch.load raises IndexError
    "text": b"hello, this is not a checkpoint\n",  # KeyError
    "zeros": bytes(100),  # UnpicklingError, reported as a pickle that would run code
    "json": b'{"weights": [1, 2]}',  # likewise
}


@pytest.mark.parametrize("content", list(NOT_CHECKPOINTS))
def test_file_that_is_no_checkpoint(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(NOT_CHECKPOINTS[content])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as e:
        load_model(UNET, path)
    assert str(path) in str(e.value) and "run code" not in str(e.value)


def test_refused_pickle_suggests_a_safetensors_conversion_that_works(tmp_path):
    """The suggested fix, run as written on a plain-dict checkpoint, gives a loadable file."""
    path = tmp_path / "legacy.pt"
    model = _randomised(UNET)
    torch.save({**model.state_dict(), "payload": _RunsCode(tmp_path / "m")}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(UNET, path)
    msg = str(e.value)
    assert "safetensors" in msg and ".state_dict(), 'clean.pt'" not in msg
    from safetensors.torch import save_file

    obj = torch.load(path, weights_only=False)
    sd = obj if isinstance(obj, dict) else obj.state_dict()
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    loaded = load_model(UNET, tmp_path / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_fitting_preset_hint_names_the_slot_option():
    with torch.device("meta"):
        model = build_model("adm-64")
    released = _meta_state_dict("adm-128")
    with pytest.raises(CheckpointError, match="did you mean --upsampler-preset adm-128"):
        check_state_dict(model, released, "x.pt", "--upsampler-preset")
