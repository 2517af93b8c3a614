"""PNG bytes decoded by Pillow, the uint8 conversion against the original's formula, grid layout."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest

from runtime.images import grid, png_bytes, to_uint8, write_png


def _decode(data: bytes) -> tuple[str, np.ndarray]:
    image = pytest.importorskip("PIL.Image")
    with image.open(io.BytesIO(data)) as im:
        im.load()
        return im.mode, np.asarray(im)


@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 1, 3), (64, 3, 3)])
def test_rgb_png_decodes_to_the_same_pixels(shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    mode, decoded = _decode(png_bytes(pixels))
    assert mode == "RGB"
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 1)])
def test_gray_png_decodes_to_the_same_pixels(shape):
    pixels = np.arange(24, dtype=np.uint8).reshape(shape) * 10
    mode, decoded = _decode(png_bytes(pixels))
    assert mode == "L"
    np.testing.assert_array_equal(decoded, pixels.reshape(6, 4))


def test_png_from_a_non_contiguous_view(tmp_path):
    nchw = np.random.default_rng(1).integers(0, 256, (2, 3, 8, 5), dtype=np.uint8)
    view = nchw[1].transpose(1, 2, 0)  # (8, 5, 3), not C-contiguous
    write_png(tmp_path / "a.png", view)
    _, decoded = _decode((tmp_path / "a.png").read_bytes())
    np.testing.assert_array_equal(decoded, view)


def test_png_chunks_are_well_formed():
    data = png_bytes(np.zeros((2, 3, 3), np.uint8))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, tags = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        crc = int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big")
        assert crc == zlib.crc32(tag + body), tag
        tags.append(tag)
        pos += 12 + length
    assert tags == [b"IHDR", b"IDAT", b"IEND"]


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((4, 4, 3), np.float32), "PNG needs uint8 pixels, got float32"),
        (np.zeros((4, 4, 4), np.uint8), r"got \(4, 4, 4\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), r"got \(2, 4, 4, 3\)"),
    ],
)
def test_png_refuses_what_it_cannot_write(image, match):
    with pytest.raises(ValueError, match=match):
        png_bytes(image)


def test_to_uint8_truncates_like_the_original():
    # ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8): clamp, then truncate toward zero.
    x = np.array([-2.0, -1.0, -0.999, 0.0, 0.00393, 0.5, 0.99, 1.0, 3.0], np.float32)
    want = np.array([0, 0, 0, 127, 128, 191, 253, 255, 255], np.uint8)
    got = to_uint8(x.reshape(1, 1, 1, -1))
    assert got.shape == (1, 1, x.size, 1) and got.dtype == np.uint8
    np.testing.assert_array_equal(got.ravel(), want)


def test_to_uint8_matches_torch_and_transposes_to_nhwc():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).uniform(-1.3, 1.3, (2, 3, 5, 4)).astype(np.float32)
    original = ((torch.from_numpy(x) + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    original = original.permute(0, 2, 3, 1).contiguous().numpy()
    got = to_uint8(x)
    assert got.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(got, original)


def test_grid_layout():
    images = np.stack([np.full((3, 2, 3), 10 * (k + 1), np.uint8) for k in range(5)])
    images[:, 0, 0] = 1  # mark each tile's top-left pixel
    g = grid(images, pad=2)
    # 5 images -> ceil(sqrt(5)) = 3 columns, 2 rows, tiles of 3 x 2 with 2-pixel borders.
    assert g.shape == (2 * (3 + 2) + 2, 3 * (2 + 2) + 2, 3)
    mask = np.ones(g.shape[:2], bool)
    for k in range(5):
        r, c = divmod(k, 3)
        top, left = 2 + r * 5, 2 + c * 4
        np.testing.assert_array_equal(g[top : top + 3, left : left + 2], images[k])
        mask[top : top + 3, left : left + 2] = False
    assert (g[mask] == 255).all()  # borders and the empty sixth cell are white


def test_grid_columns_and_scale():
    images = np.random.default_rng(3).integers(0, 256, (4, 2, 3, 1), dtype=np.uint8)
    g = grid(images, cols=4, pad=1, scale=3)
    assert g.shape == (1 * (6 + 1) + 1, 4 * (9 + 1) + 1, 1)
    for k in range(4):
        tile = g[1:7, 1 + k * 10 : 10 + k * 10]
        np.testing.assert_array_equal(tile, np.kron(images[k], np.ones((3, 3, 1), np.uint8)))


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (17, 40)])
def test_resize_bilinear_matches_torch(size):
    import torch
    import torch.nn.functional as F

    from runtime.images import resize_bilinear

    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size, mode="bilinear", align_corners=False).numpy()
    got = resize_bilinear(x, size)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
