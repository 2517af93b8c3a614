"""Images out of samples: uint8 conversion as the original scripts do, PNG files, grids.

PNG is written with zlib and struct alone, so the runtime needs no imaging library.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) float in [-1, 1] -> (B, H, W, C) uint8, truncating like the original's
    `((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)`."""
    return np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, C) or (H, W) uint8, C in 1, 3 -> PNG file contents."""
    if image.dtype != np.uint8:
        raise ValueError(f"PNG needs uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        color = 0
    elif image.ndim == 3 and image.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"PNG needs (H, W), (H, W, 1) or (H, W, 3) pixels, got {image.shape}")
    h, w = image.shape[:2]
    raw = np.concatenate(
        [np.zeros((h, 1), np.uint8), np.ascontiguousarray(image).reshape(h, -1)], axis=1
    )  # filter byte 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | Path, image: np.ndarray) -> None:
    Path(path).write_bytes(png_bytes(image))


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image, white padding;
    `scale` enlarges pixels (nearest) so small samples stay visible."""
    n, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = images[k]
    return out


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, C, h, w) -> (B, C, H, W) float32, bilinear with half-pixel centres and edge clamping:
    torch's `F.interpolate(mode="bilinear", align_corners=False)`, the upsampler's own path."""

    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    h0, h1, fh = taps(x.shape[2], size[0])
    w0, w1, fw = taps(x.shape[3], size[1])
    rows = x[:, :, h0, :] * (1 - fh)[:, None] + x[:, :, h1, :] * fh[:, None]  # (B, C, H, w)
    return (rows[..., w0] * (1 - fw) + rows[..., w1] * fw).astype(np.float32)
