"""The ADM networks (Dhariwal & Nichol 2021), our own implementation, state-dict compatible.

Three networks, in dependency order: the UNet (`UNetModel`), the super-resolution UNet
(`SuperResModel`, the UNet on `cat([x, bilinear(low_res)])`) and the noisy-image classifier
(`EncoderUNetModel`, the UNet's encoder half with an attention-pool head). Parameter names and
shapes equal the released guided-diffusion checkpoints; in fp32 the forward pass computes what the
original computes. Training-only machinery (gradient checkpointing, in-place fp16 conversion) is left
out, and so are the original's 1-D / 3-D variants: every released ADM model is 2-D. The reference
runs in fp32; `convert_trunk(torch.float16)` casts the trunk as the original's fp16 mode does
(`gdexport build --fp16` exports that copy). The constructors take the original classes'
arguments unchanged; `dims` must be 2 and `use_fp16` is accepted and ignored (fp16 is a graph
precision here, not a constructor flag).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding `[cos, sin]` of (B,) timesteps -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in fp32, whatever the trunk's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def _only_2d(dims: int) -> None:
    if dims != 2:
        raise ValueError(
            f"dims={dims}: gdexport implements the 2-D ADM networks only (every released "
            f"checkpoint is 2-D); pass dims=2"
        )


class TimestepEmbedSequential(nn.Sequential):
    """A sequential whose residual blocks also take the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or by average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block with timestep conditioning; AdaGN when `use_scale_shift_norm`.

    With `up` / `down` it is the BigGAN-style resampling block: both paths are resampled between
    the first normalisation+activation and the first convolution.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(
                emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels
            ),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)  # (B, C_out, H, W)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2)))  # (B, C', 1, 1)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)  # scale first, as the original
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ch: int) -> torch.Tensor:
    """(N, ch, T) each -> (N, ch, T); q and k scaled by ch**-0.25, softmax in fp32."""
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # (N, T, T)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


class QKVAttentionLegacy(nn.Module):
    """Heads split from (B, H*3*ch, T): per head q, k, v are adjacent (the original's legacy order)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        return _attention(q, k, v, ch).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """Heads split after q, k, v (`use_new_attention_order`): (B, 3*H*ch, T) -> (B, H*ch, T)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (a.reshape(bs * self.n_heads, ch, length) for a in qkv.chunk(3, dim=1))
        return _attention(q, k, v, ch).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, residual."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels do not split into heads of {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        attn = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attn(self.num_heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (B, C, T)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends over all positions."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)  # (B, C, HW)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # (B, C, HW+1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]  # (B, out)


@dataclass(frozen=True)
class TrunkConfig:
    """The encoder's hyperparameters, shared by the UNet and the classifier."""

    in_channels: int
    model_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]  # downsample factors
    dropout: float
    channel_mult: Sequence[float]
    conv_resample: bool
    num_heads: int
    num_head_channels: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    use_new_attention_order: bool
    num_classes: int | None = None

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


class _Trunk(nn.Module):
    """The shared encoder: time embedding, input blocks and middle block of the ADM UNet."""

    def _build_encoder(self, cfg: TrunkConfig) -> tuple[int, int, list[int]]:
        """Build the encoder; returns (channels out, downsample factor reached, skip channels)."""
        emb_dim = cfg.time_embed_dim
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.model_channels, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        res = dict(use_scale_shift_norm=cfg.use_scale_shift_norm)
        attn = dict(
            num_heads=cfg.num_heads,
            num_head_channels=cfg.num_head_channels,
            use_new_attention_order=cfg.use_new_attention_order,
        )
        ch = int(cfg.channel_mult[0] * cfg.model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
        )
        chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out_ch = int(mult * cfg.model_channels)
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, cfg.dropout, out_ch, **res)]
                ch = out_ch
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, **attn))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = (
                    ResBlock(ch, emb_dim, cfg.dropout, ch, down=True, **res)
                    if cfg.resblock_updown
                    else Downsample(ch, cfg.conv_resample, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, cfg.dropout, **res),
            AttentionBlock(ch, **attn),
            ResBlock(ch, emb_dim, cfg.dropout, **res),
        )
        return ch, ds, chans


class UNetModel(_Trunk):
    """The ADM UNet: (B,C,H,W) x, (B,) timesteps[, (B,) labels] -> (B, out_channels, H, W).

    `attention_resolutions` are downsample factors (1, 2, 4, ...), as in the original class;
    `build_model` turns the flags' resolutions into factors.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        _only_2d(dims)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.dtype = torch.float32
        ch, ds, chans = self._build_encoder(
            TrunkConfig(
                in_channels, model_channels, num_res_blocks, attention_resolutions, dropout,
                channel_mult, conv_resample, num_heads, num_head_channels, use_scale_shift_norm,
                resblock_updown, use_new_attention_order, num_classes,
            )
        )  # fmt: skip
        time_embed_dim = model_channels * 4
        res = dict(use_scale_shift_norm=use_scale_shift_norm)
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = chans.pop()
                layers: list[nn.Module] = [
                    ResBlock(ch + ich, time_embed_dim, dropout, int(model_channels * mult), **res)
                ]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch,
                            num_heads=num_heads_upsample,
                            num_head_channels=num_head_channels,
                            use_new_attention_order=use_new_attention_order,
                        )
                    )
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, time_embed_dim, dropout, ch, up=True, **res)
                        if resblock_updown
                        else Upsample(ch, conv_resample, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            nn.Conv2d(input_ch, out_channels, 3, padding=1),
        )

    def convert_trunk(self, dtype: torch.dtype) -> None:
        """Cast the trunk (blocks, not embeddings or the output head) as the original's fp16 mode."""
        self.dtype = dtype
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            _convert_convs(blocks, dtype)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "pass class labels y exactly when the model is class-conditional "
                f"(num_classes={self.num_classes}, y given: {y is not None})"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))  # (B, 4C)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)  # skip concatenation [h, skip]
        return self.out(h.type(x.dtype))


class SuperResModel(UNetModel):
    """The UNet on `cat([x, bilinear_upsample(low_res)])`: in_channels is the image's (3)."""

    def __init__(self, image_size: int, in_channels: int, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        low_res: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")  # (B, 3, H, W)
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, y)


class EncoderUNetModel(_Trunk):
    """The noisy-image classifier: (B,C,H,W) x, (B,) timesteps -> (B, out_channels) logits."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        _only_2d(dims)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.dtype = torch.float32
        ch, ds, _ = self._build_encoder(
            TrunkConfig(
                in_channels, model_channels, num_res_blocks, attention_resolutions, dropout,
                channel_mult, conv_resample, num_heads, num_head_channels, use_scale_shift_norm,
                resblock_updown, use_new_attention_order,
            )
        )  # fmt: skip
        self.pool = pool
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                nn.Conv2d(ch, out_channels, 1),
                nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels")
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        else:
            raise ValueError(f"unsupported classifier pool {pool!r}: use 'attention' or 'adaptive'")

    def convert_trunk(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        for blocks in (self.input_blocks, self.middle_block):
            _convert_convs(blocks, dtype)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
        h = self.middle_block(h, emb)
        return self.out(h.type(x.dtype))


def _convert_convs(module: nn.Module, dtype: torch.dtype) -> None:
    """The original's `convert_module_to_f16`: convolutions only; norms and linears stay fp32."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
