"""Safe decoding: each broken kind fails with a clear reason, each odd-but-valid kind gives RGB.

Every input is generated in tmp_path (written, then read back as bytes, the way a source reads
it), except one real food photo read in place from the shared dataset.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamese_cv.data.images import (
    ImageError,
    decode_image,
    encode_image,
    load_rgb,
    prepare_image,
    resize_image,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _write(tmp_path: Path, name: str, data: bytes) -> bytes:
    path = tmp_path / name
    path.write_bytes(data)
    return path.read_bytes()


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _close(actual: tuple, expected: tuple, tol: int = 12) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


# --- broken inputs: ImageError with a reason --------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="zero-byte file"):
        decode_image(_write(tmp_path, "empty.jpg", b""))


def test_truncated_jpeg(tmp_path: Path) -> None:
    whole = _save(_noise((64, 64)), "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated JPEG"):
        decode_image(_write(tmp_path, "cut.jpg", whole[: len(whole) // 2]))


def test_truncated_png(tmp_path: Path) -> None:
    whole = _save(_noise((64, 64)), "PNG")
    with pytest.raises(ImageError, match="truncated PNG"):
        decode_image(_write(tmp_path, "cut.png", whole[: len(whole) // 2]))


def test_text_named_jpg(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"not an image \(text\)"):
        decode_image(_write(tmp_path, "notes.jpg", b"shopping list: flour, apples\n"))


def test_html_named_png(tmp_path: Path) -> None:
    page = b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n"
    with pytest.raises(ImageError, match=r"not an image \(HTML\)"):
        decode_image(_write(tmp_path, "photo.png", page))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` but holds no pixels: a cheap bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_header(tmp_path: Path) -> None:
    data = _write(tmp_path, "bomb.png", _png_header_only(60000, 60000))
    with pytest.raises(ImageError, match=r"decompression bomb: 3.6e\+09 pixels > limit"):
        decode_image(data)


def test_decompression_bomb_warning_is_fatal(tmp_path: Path, monkeypatch) -> None:
    # 12x12 = 144 px is over a limit of 100 but under twice it: Pillow only warns there.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = _write(tmp_path, "small_bomb.png", _save(Image.new("RGB", (12, 12)), "PNG"))
    with pytest.raises(ImageError, match="decompression bomb: 1.4e\\+02 pixels > limit 1e\\+02"):
        decode_image(data)


def test_one_pixel_is_too_small(tmp_path: Path) -> None:
    data = _write(tmp_path, "dot.png", _save(Image.new("RGB", (1, 1)), "PNG"))
    with pytest.raises(ImageError, match="1x1 px is too small"):
        decode_image(data)


def test_extreme_aspect_ratio(tmp_path: Path) -> None:
    data = _write(tmp_path, "line.png", _save(Image.new("L", (60000, 1)), "PNG"))
    with pytest.raises(ImageError, match="60000x1 px"):
        decode_image(data)


# --- odd but valid inputs: 8-bit RGB ----------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768], [65535, 32768]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)
    data = _write(tmp_path, "deep.png", _save(Image.fromarray(values), "PNG"))
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((7, 0)) == (128, 128, 128)  # mid-grey stays mid-grey
    assert img.getpixel((0, 7)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    data = _write(tmp_path, "print.jpg", _save(cyan, "JPEG", quality=95))
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (16, 16)
    assert _close(img.getpixel((8, 8)), (0, 255, 255))


def test_palette_png_with_transparency_goes_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([*RED, *BLUE] + [0] * 762)
    img.paste(1, (4, 0, 8, 8))  # right half opaque blue, left half transparent red
    data = _write(tmp_path, "sticker.png", _save(img, "PNG", transparency=0))
    out = decode_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((7, 0)) == BLUE


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    img = decode_image(_write(tmp_path, "anim.gif", data))
    assert img.mode == "RGB" and img.size == (8, 8)
    assert img.getpixel((4, 4)) == RED


def test_animated_webp_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), GREEN), Image.new("RGB", (8, 8), BLUE)]
    data = _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    img = decode_image(_write(tmp_path, "anim.webp", data))
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert img.mode == "RGB" and img.getpixel((4, 4)) == GREEN


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = _write(tmp_path, "phone.jpg", _save(img, "JPEG", quality=95, exif=exif))
    out = decode_image(data)
    assert out.size == (20, 40)  # dimensions swapped
    assert _close(out.getpixel((10, 5)), RED)  # the left half is now on top
    assert _close(out.getpixel((10, 35)), BLUE)


def test_large_jpeg_is_draft_decoded_but_never_below_target(tmp_path: Path) -> None:
    data = _write(tmp_path, "big.jpg", _save(_noise((1000, 800)), "JPEG"))
    assert decode_image(data).size == (1000, 800)
    assert decode_image(data, target_size=244).size == (500, 400)  # DCT scale 1/2
    assert decode_image(data, target_size=450).size == (1000, 800)  # under 2x: full decode


def test_real_food_photo_both_modes() -> None:
    from conftest import food10_photos  # skips when the shared food10 set is absent

    photo = next(iter(food10_photos("train", per_class=1, classes=1).values()))[0]
    for mode in ("stretch", "shorter_side_crop"):
        img = load_rgb(photo, 244, mode)
        assert img.mode == "RGB" and img.size == (244, 244)
        assert np.asarray(img).std() > 10  # a photo, not a flat fill


# --- resize and encode ------------------------------------------------------------------------


def test_resize_modes_keep_or_crop_the_sides() -> None:
    img = Image.new("RGB", (300, 100), RED)
    img.paste(GREEN, (100, 0, 200, 100))
    img.paste(BLUE, (200, 0, 300, 100))
    stretched = resize_image(img, 30, "stretch")
    cropped = resize_image(img, 30, "shorter_side_crop")
    assert stretched.size == cropped.size == (30, 30)
    assert stretched.getpixel((2, 15)) == RED and stretched.getpixel((27, 15)) == BLUE
    # BICUBIC reads a few source pixels past the box, so the outermost column may tint slightly.
    assert {cropped.getpixel((x, 15)) for x in (2, 15, 27)} == {GREEN}


def test_unknown_resize_mode_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="stretch, shorter_side_crop"):
        resize_image(Image.new("RGB", (8, 8)), 4, "squash")


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_encode_is_deterministic_and_prepare_roundtrips(fmt: str) -> None:
    img = _noise((50, 40), seed=1)
    assert encode_image(img, fmt, 90) == encode_image(img.copy(), fmt, 90)
    out = prepare_image(_save(img, "PNG"), 32, "shorter_side_crop", fmt, 90)
    decoded = Image.open(io.BytesIO(out))
    assert decoded.format == fmt.upper() and decoded.size == (32, 32)


def test_load_rgb_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"nope")
    with pytest.raises(ImageError, match="broken.jpg: not an image"):
        load_rgb(path, 32, "stretch")
    with pytest.raises(ImageError, match="missing.jpg: cannot read"):
        load_rgb(tmp_path / "missing.jpg", 32, "stretch")
