"""Image loading (modes, bit depths, EXIF, bad files), input collection, padding and PNG output."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_vae.images import (
    ImageError,
    collect_images,
    crop_to,
    load_image,
    pad_to_multiple,
    round_to_8bit,
    save_image,
    to_uint8,
)


def _rgb(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _expected(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> the (3, H, W) [-1, 1] tensor load_image should give."""
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1) * 2 - 1


def _png16(path: Path, a: np.ndarray) -> None:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB)."""
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("suffix", "kwargs"),
    [(".png", {}), (".bmp", {}), (".tiff", {}), (".webp", {"lossless": True})],
)
def test_lossless_formats_load_exact_values(tmp_path, suffix, kwargs):
    arr = _rgb()
    path = tmp_path / f"x{suffix}"
    Image.fromarray(arr).save(path, **kwargs)
    x = load_image(path)
    assert x.shape == (3, 12, 10) and x.dtype == torch.float32
    torch.testing.assert_close(x, _expected(arr), atol=1e-6, rtol=0)


def test_grayscale_and_bilevel_replicate_to_three_channels(tmp_path):
    gray = _rgb()[..., 0]
    Image.fromarray(gray).save(tmp_path / "l.png")
    x = load_image(tmp_path / "l.png")
    torch.testing.assert_close(x, _expected(np.repeat(gray[..., None], 3, -1)), atol=1e-6, rtol=0)
    Image.fromarray(gray > 127).save(tmp_path / "b.png")  # mode "1"
    assert set(load_image(tmp_path / "b.png").unique().tolist()) == {-1.0, 1.0}


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (0, 0, 0)  # black under every alpha value
    rgba[0, :, 3] = (0, 128, 255)
    rgba[1, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    v = (x + 1) / 2 * 255
    assert v[:, 0, 0].tolist() == [255.0] * 3  # transparent -> white, not the black underneath
    assert v[:, 0, 1].round().tolist() == [127.0] * 3  # half -> blend
    assert v[:, 0, 2].tolist() == [0.0] * 3 and v[:, 1].max() == 0  # opaque -> the colour
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    la.save(tmp_path / "la.png")
    torch.testing.assert_close(load_image(tmp_path / "la.png"), x)


def test_palette_with_and_without_transparency(tmp_path):
    im = Image.new("P", (4, 3))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.save(tmp_path / "p.png")
    x = load_image(tmp_path / "p.png")
    assert x[:, 0, 0].tolist() == [1.0, -1.0, -1.0] and x[:, 1, 1].tolist() == [-1.0, -1.0, 1.0]
    im.info["transparency"] = 0  # colour 0 is transparent -> white
    im.save(tmp_path / "pt.png", transparency=0)
    x = load_image(tmp_path / "pt.png")
    assert x[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and x[:, 1, 1].tolist() == [-1.0, -1.0, 1.0]


@pytest.mark.parametrize("name", ["g16.png", "g16.tif", "g16b.tif"])
def test_16bit_grayscale_is_scaled_not_clipped(tmp_path, name):
    values = np.array([[0, 1000, 30000], [40000, 65000, 65535]], dtype=np.uint16)
    arr = values.astype(">u2") if name.startswith("g16b") else values
    im = Image.fromarray(arr)
    assert im.mode in ("I;16", "I;16B")
    im.save(tmp_path / name)
    x = load_image(tmp_path / name)
    want = torch.from_numpy(values.astype(np.float32) / 65535.0) * 2 - 1
    assert x.shape == (3, 2, 3)
    for c in range(3):
        torch.testing.assert_close(x[c], want, atol=1e-6, rtol=0)


def test_16bit_rgb_png_keeps_its_scale(tmp_path):
    a = np.random.default_rng(1).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    _png16(tmp_path / "rgb16.png", a)
    x = load_image(tmp_path / "rgb16.png")
    want = torch.from_numpy(a.astype(np.float32) / 65535.0).permute(2, 0, 1) * 2 - 1
    assert (x - want).abs().max() <= 2 / 255  # 8 significant bits survive; scale and range are right


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)  # pure cyan
    v = (load_image(tmp_path / "c.jpg") + 1) / 2 * 255
    assert v[0].max() < 8 and v[1].min() > 247 and v[2].min() > 247


def test_exif_orientation_is_applied(tmp_path):
    arr = _rgb(h=6, w=10)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.png", exif=exif)
    x = load_image(tmp_path / "r.png")
    assert x.shape == (3, 10, 6)
    torch.testing.assert_close(x, _expected(np.ascontiguousarray(np.rot90(arr, k=-1))), atol=1e-6, rtol=0)


def _jpeg_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("missing.png", None, "no such file"),
        ("empty.png", b"", "empty"),
        ("truncated.jpg", "truncated-jpeg", "truncated"),
        ("notes.jpg", b"hello, this is text\n" * 20, "not an image"),
        ("half.png", "truncated-png", "truncated"),
    ],
)
def test_bad_files_raise_one_line_error_naming_the_file(tmp_path, name, content, words):
    path = tmp_path / name
    if content == "truncated-jpeg":
        data = _jpeg_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "truncated-png":
        Image.fromarray(_rgb(64, 64)).save(path)
        path.write_bytes(path.read_bytes()[:-300])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and words in message and "\n" not in message


def test_collect_images_recursive_sorted_deduplicated(tmp_path):
    for rel in ["b.png", "a.JPG", "sub/c.webp", "sub/deep/d.tiff", "notes.txt", ".hidden.png", "sub/._e.jpg"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    got = collect_images([tmp_path, tmp_path / "b.png", tmp_path / "sub"])
    names = [p.relative_to(tmp_path).as_posix() for p in got]
    assert names == ["a.JPG", "b.png", "sub/c.webp", "sub/deep/d.tiff"]
    # A file named explicitly counts whatever its suffix.
    assert collect_images([tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]


def test_collect_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ImageError, match="no images"):
        collect_images([tmp_path / "empty"])
    with pytest.raises(ImageError, match="no such file"):
        collect_images([tmp_path / "nope"])


@pytest.mark.parametrize(("h", "w"), [(37, 29), (32, 32), (3, 5), (1, 1)])
def test_pad_to_multiple_and_crop_back(h, w):
    x = torch.randn(2, 3, h, w)
    p = pad_to_multiple(x, 8)
    assert p.shape[-2] % 8 == 0 and p.shape[-1] % 8 == 0
    assert p.shape[-2] - h < 8 and p.shape[-1] - w < 8
    torch.testing.assert_close(crop_to(p, (h, w)), x, rtol=0, atol=0)
    # Also unbatched (C, H, W).
    torch.testing.assert_close(pad_to_multiple(x[0], 8), p[0], rtol=0, atol=0)


def test_padding_reflects_and_falls_back_to_replicate_for_tiny_images():
    x = torch.arange(37 * 29, dtype=torch.float32).reshape(1, 37, 29)
    p = pad_to_multiple(x, 8)  # 40 x 32
    torch.testing.assert_close(p[0, 37, :29], x[0, 35])  # reflect about the last row
    torch.testing.assert_close(p[0, :37, 30], x[0, :, 26])
    tiny = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    p = pad_to_multiple(tiny, 8)  # pad 6 > size 2: reflect impossible
    assert p.shape == (1, 8, 8)
    torch.testing.assert_close(p[0, 7, :3], tiny[0, 1])
    torch.testing.assert_close(p[0, 1, 3:], torch.full((5,), 5.0))


def test_save_image_round_trip_is_quantization(tmp_path):
    x = torch.randn(3, 9, 13) * 0.8  # some values outside [-1, 1]
    path = save_image(x, tmp_path / "new" / "out.png")
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["out.png"]  # no temp file
    back = load_image(path)
    torch.testing.assert_close(back, round_to_8bit(x), atol=1e-6, rtol=0)
    assert (round_to_8bit(x) - x.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6
    assert to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 5).expand(3, 1, 5))[
        0, :, 0
    ].tolist() == [
        0,
        0,
        128,
        255,
        255,
    ]
