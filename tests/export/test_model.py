"""The ADM networks against the original's outputs and against formulas written out here.

The golden test pins the whole forward pass to the original code on one configuration; the rest
pin one detail each against a re-derivation in numpy or float64 torch functional ops, on tiny
networks with every parameter randomised (a zero-initialised layer would hide a wrong detail).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export.loading import build_model, load_model
from export.model import (
    AttentionBlock,
    AttentionPool2d,
    GroupNorm32,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    SuperResModel,
    UNetModel,
    timestep_embedding,
)

TINY_UNET = dict(
    image_size=16,
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_head_channels=32,
    use_scale_shift_norm=True,
)


def randomise(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Every parameter ~ N(0, std^2), so no layer is the identity or zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            nn.init.normal_(p, 0.0, std, generator=g)
    return module.eval()


def params64(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in module.state_dict().items()}


def assert_close(actual: torch.Tensor, expected, tol: float = 1e-5) -> None:
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tol, atol=tol)


# ---- references, written from the paper and the original code's formulas ---------------------


def group_norm_ref(x: torch.Tensor, weight, bias, groups: int = 32, eps: float = 1e-5):
    """GroupNorm (Wu & He 2018): biased variance over each group's channels and positions."""
    b, c = x.shape[:2]
    g = x.reshape(b, groups, -1)
    y = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return y.reshape(x.shape) * weight.reshape(shape) + bias.reshape(shape)


def silu(x):
    return x * torch.sigmoid(x)


def timestep_embedding_ref(t: np.ndarray, dim: int) -> np.ndarray:
    """[cos(t f_i), sin(t f_i)], f_i = exp(-ln(10000) i / half), i < half; zero pad if dim is odd."""
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t.astype(np.float64)[:, None] * freqs[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2)))


def softmax(a: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def multi_head_attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(B, H, ch, T) each -> (B, H*ch, T): softmax over keys of q.k / sqrt(ch), times v."""
    b, h, ch, t = q.shape
    weights = softmax(np.einsum("bhct,bhcs->bhts", q, k) / np.sqrt(ch), axis=-1)
    return np.einsum("bhts,bhcs->bhct", weights, v).reshape(b, h * ch, t)


def split_heads(qkv: np.ndarray, n_heads: int, legacy: bool):
    """(B, 3*H*ch, T) -> q, k, v each (B, H, ch, T).

    Legacy order: per head [q, k, v] adjacent, (B, H, 3, ch, T). New order: [q | k | v] first,
    then heads, (B, 3, H, ch, T)."""
    b, width, t = qkv.shape
    ch = width // (3 * n_heads)
    if legacy:
        x = qkv.reshape(b, n_heads, 3, ch, t)
        return x[:, :, 0], x[:, :, 1], x[:, :, 2]
    x = qkv.reshape(b, 3, n_heads, ch, t)
    return x[:, 0], x[:, 1], x[:, 2]


def bilinear_ref(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (B, C, h, w), half-pixel centres (align_corners=False), no antialias."""

    def taps(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, rw = taps(x.shape[2], size)
    c0, c1, cw = taps(x.shape[3], size)
    rows = x[:, :, r0] * (1 - rw)[:, None] + x[:, :, r1] * rw[:, None]
    return rows[..., c0] * (1 - cw) + rows[..., c1] * cw


def resblock_ref(p, x, emb, *, scale_shift: bool, resample=None):
    """ADM ResBlock (unet.py): the BigGAN resampling sits after in_layers' norm+SiLU, before the
    conv, on both paths; AdaGN is norm(h) * (1 + scale) + shift, scale the first half."""
    h = silu(group_norm_ref(x, p["in_layers.0.weight"], p["in_layers.0.bias"]))
    if resample is not None:
        h, x = resample(h), resample(x)
    h = F.conv2d(h, p["in_layers.2.weight"], p["in_layers.2.bias"], padding=1)
    e = F.linear(silu(emb), p["emb_layers.1.weight"], p["emb_layers.1.bias"])[:, :, None, None]
    norm = p["out_layers.0.weight"], p["out_layers.0.bias"]
    if scale_shift:
        scale, shift = e[:, : h.shape[1]], e[:, h.shape[1] :]
        h = group_norm_ref(h, *norm) * (1 + scale) + shift
    else:
        h = group_norm_ref(h + e, *norm)
    h = F.conv2d(silu(h), p["out_layers.3.weight"], p["out_layers.3.bias"], padding=1)
    if "skip_connection.weight" in p:
        x = F.conv2d(x, p["skip_connection.weight"], p["skip_connection.bias"])
    return x + h


def upsample_nearest(x):
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def downsample_avg(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


# ---- the whole network against the original ---------------------------------------------------


def test_golden_unet_matches_original(shared_dir):
    golden = shared_dir / "golden"
    config = json.loads((golden / "unet_cond.json").read_text())
    ref = np.load(golden / "fwd_unet_cond.npz")
    model = load_model(config["config"], golden / "unet_cond.pt")
    assert sum(p.numel() for p in model.parameters()) == config["params"]
    with torch.no_grad():
        out = model(*(torch.from_numpy(ref[k]) for k in ("x", "t", "y")))
    assert out.shape == ref["out"].shape
    np.testing.assert_allclose(out.numpy(), ref["out"], rtol=0, atol=1e-5)


# ---- one detail each ------------------------------------------------------------------------


def test_group_norm_computes_in_fp32_for_fp16_input(monkeypatch):
    norm = randomise(GroupNorm32(32, 64), seed=1)
    g = torch.Generator().manual_seed(0)
    # A large common offset, where fp16 arithmetic would lose the variance. CPU kernels
    # accumulate fp16 norms in fp32 anyway, so the values alone cannot tell: the spy can.
    x = (torch.randn(2, 64, 4, 4, generator=g) * 3 + 50).half()
    seen = []
    group_norm = F.group_norm

    def spy(inp, *args, **kwargs):
        seen.append(inp.dtype)
        return group_norm(inp, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "group_norm", spy)
    out = norm(x)
    assert seen == [torch.float32], "the fp16 input must be normalised in fp32"
    assert out.dtype == torch.float16, "the output comes back in the input's dtype"
    p = params64(norm)
    ref = group_norm_ref(x.double(), p["weight"], p["bias"])
    assert_close(out, ref, tol=2e-3)  # fp16 output rounding

    # In a converted (fp16) model every norm, trunk and head, computes in fp32.
    model = randomise(UNetModel(**TINY_UNET))
    model.convert_trunk(torch.float16)
    seen.clear()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 16, generator=g), torch.tensor([10]))
    n_norms = sum(isinstance(m, GroupNorm32) for m in model.modules())
    assert seen == [torch.float32] * n_norms
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_is_cos_then_sin(dim):
    t = np.array([0, 1, 7, 250, 999])
    out = timestep_embedding(torch.from_numpy(t), dim)
    assert out.dtype == torch.float32 and out.shape == (len(t), dim)
    # args reach 999 rad in float32, so cos/sin carry ~6e-5 of argument rounding
    assert_close(out, timestep_embedding_ref(t, dim), tol=2e-4)
    np.testing.assert_array_equal(out[0, : dim // 2].numpy(), 1.0)  # cos(0) first


@pytest.mark.parametrize(
    "scale_shift, out_channels", [(True, 32), (False, 32), (True, 64)], ids=["adagn", "add", "skip"]
)
def test_resblock_scale_shift_norm(scale_shift, out_channels):
    block = randomise(ResBlock(32, 16, 0.0, out_channels, use_scale_shift_norm=scale_shift))
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        out = block(x, emb)
    ref = resblock_ref(params64(block), x.double(), emb.double(), scale_shift=scale_shift)
    assert_close(out, ref)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_resblock_updown_resamples_between_norm_and_conv(direction):
    # Nearest upsampling commutes with the norm, average pooling does not: "down" pins that the
    # resampling follows the norm, both pin that it precedes the conv and that x is resampled.
    block = ResBlock(32, 16, 0.0, 32, use_scale_shift_norm=True, **{direction: True})
    randomise(block)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        out = block(x, emb)
    resample = upsample_nearest if direction == "up" else downsample_avg
    ref = resblock_ref(
        params64(block), x.double(), emb.double(), scale_shift=True, resample=resample
    )
    assert out.shape == ref.shape
    assert_close(out, ref)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "new_order"])
def test_qkv_attention_head_layout(legacy):
    n_heads, ch, length = 3, 4, 5
    qkv = np.random.default_rng(0).normal(size=(2, 3 * n_heads * ch, length)) * 2
    attention = QKVAttentionLegacy(n_heads) if legacy else QKVAttention(n_heads)
    out = attention(torch.from_numpy(qkv).float())
    ref = multi_head_attention_ref(*split_heads(qkv, n_heads, legacy))
    assert_close(out, ref)
    # The two layouts really differ on this input, so each reference pins its own.
    other = multi_head_attention_ref(*split_heads(qkv, n_heads, not legacy))
    assert np.abs(ref - other).max() > 0.1


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new_order"])
def test_attention_block(new_order):
    block = AttentionBlock(64, num_head_channels=32, use_new_attention_order=new_order)
    randomise(block)
    assert block.num_heads == 2
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = block(x)
    p = params64(block)
    tokens = x.double().reshape(2, 64, 16)
    h = group_norm_ref(tokens, p["norm.weight"], p["norm.bias"])
    qkv = torch.einsum("oc,bct->bot", p["qkv.weight"][..., 0], h) + p["qkv.bias"][:, None]
    a = torch.from_numpy(multi_head_attention_ref(*split_heads(qkv.numpy(), 2, not new_order)))
    h = torch.einsum("oc,bct->bot", p["proj_out.weight"][..., 0], a) + p["proj_out.bias"][:, None]
    assert_close(out, (tokens + h).reshape(x.shape))


def test_class_embedding_is_added_after_the_time_mlp():
    model = randomise(UNetModel(**TINY_UNET, num_classes=10))
    seen = {}
    model.input_blocks[1].register_forward_pre_hook(lambda m, args: seen.update(emb=args[1]))
    t, y = np.array([3, 900]), np.array([7, 2])
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16), torch.from_numpy(t), torch.from_numpy(y))
    p = params64(model)
    temb = torch.from_numpy(timestep_embedding_ref(t, 32))
    h = silu(F.linear(temb, p["time_embed.0.weight"], p["time_embed.0.bias"]))
    emb = F.linear(h, p["time_embed.2.weight"], p["time_embed.2.bias"])
    emb = emb + p["label_emb.weight"][torch.from_numpy(y)]
    assert_close(seen["emb"], emb, tol=1e-4)  # 1e-4: float32 arguments of up to 900 rad


def test_decoder_concatenates_h_then_skip():
    model = randomise(UNetModel(**TINY_UNET))
    skips, outs, ins = [], [], []
    for block in model.input_blocks:
        block.register_forward_hook(lambda m, args, out: skips.append(out))
    model.middle_block.register_forward_hook(lambda m, args, out: outs.append(out))
    for block in model.output_blocks:
        block.register_forward_pre_hook(lambda m, args: ins.append(args[0]))
        block.register_forward_hook(lambda m, args, out: outs.append(out))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16), torch.tensor([5, 600]))
    assert len(ins) == len(skips) == len(model.output_blocks)
    # Decoder block i gets [previous output (middle block for i = 0), i-th skip from the end].
    for i, got in enumerate(ins):
        torch.testing.assert_close(got, torch.cat([outs[i], skips[-1 - i]], dim=1))


def test_attention_resolutions_are_resolutions_in_flags():
    flags = (
        "--image_size 64 --num_channels 32 --channel_mult 1,2,2,2 --num_res_blocks 1 "
        "--attention_resolutions 32,16,8 --num_head_channels 32"
    )
    model = randomise(build_model(flags))
    assert model.spec.ctor["attention_resolutions"] == (2, 4, 8)  # downsample factors
    seen: list[int] = []
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64), torch.tensor([1]))
    # Per attended level: 1 encoder block + 2 decoder blocks (num_res_blocks + 1); the 8x8 level
    # is also the middle block's. The 64x64 level (ds 1) has none.
    assert {r: seen.count(r) for r in set(seen)} == {32: 3, 16: 3, 8: 4}


def test_superres_concatenates_x_and_bilinear_low_res():
    sr = randomise(SuperResModel(**TINY_UNET, num_classes=10))
    unet = UNetModel(**{**TINY_UNET, "in_channels": 6}, num_classes=10).eval()
    unet.load_state_dict(sr.state_dict())
    rng = np.random.default_rng(0)
    x, low_res = rng.normal(size=(2, 3, 16, 16)), rng.normal(size=(2, 3, 4, 4))
    t, y = torch.tensor([10, 700]), torch.tensor([1, 9])
    both = np.concatenate([x, bilinear_ref(low_res, 16)], axis=1)
    with torch.no_grad():
        out = sr(torch.from_numpy(x).float(), t, torch.from_numpy(low_res).float(), y)
        ref = unet(torch.from_numpy(both).float(), t, y)
    assert_close(out, ref)


def test_classifier_attention_pool():
    spec = {
        "image_size": 16, "model_channels": 32, "out_channels": 10, "num_res_blocks": 1,
        "attention_resolutions": [2], "channel_mult": [1, 2], "num_head_channels": 32,
        "pool": "attention",
    }  # fmt: skip
    model = randomise(build_model(spec))
    pool = model.out[2]
    assert isinstance(pool, AttentionPool2d)
    assert pool.positional_embedding.shape == (64, (16 // 2) ** 2 + 1)  # image // ds, squared, +1
    seen = {}
    pool.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 400]))
    assert out.shape == (2, 10)

    p = {k: v.numpy() for k, v in params64(pool).items()}
    x = seen["x"].double().numpy().reshape(2, 64, -1)  # (B, C, HW)
    tokens = np.concatenate([x.mean(-1, keepdims=True), x], -1) + p["positional_embedding"]
    qkv = np.einsum("oc,bct->bot", p["qkv_proj.weight"][..., 0], tokens)
    qkv += p["qkv_proj.bias"][:, None]
    a = multi_head_attention_ref(*split_heads(qkv, 2, legacy=False))
    logits = np.einsum("oc,bct->bot", p["c_proj.weight"][..., 0], a) + p["c_proj.bias"][:, None]
    assert_close(out, logits[:, :, 0])  # the mean token's output


def test_only_the_2d_networks_are_built():
    from export.model import UNetModel

    with pytest.raises(ValueError, match="dims=3: gdexport implements the 2-D ADM networks only"):
        UNetModel(16, 3, 32, 3, 1, (), dims=3)
