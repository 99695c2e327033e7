"""Safe image decoding, resizing and re-encoding for untrusted image bytes.

Datasets scraped from the web contain truncated downloads, HTML error pages saved as `.jpg`,
decompression bombs, 16-bit scans, CMYK print files and rotated phone photos. Every such case
either becomes a clean 8-bit RGB image or raises `ImageError` with a short reason that
preprocess can count and report; nothing here crashes a worker or silently yields garbage.

Thresholds (chosen to reject only images no model input could come from):

- `MIN_SIDE = 2`: a 1-px-wide image carries no spatial structure; 2 px is the smallest that
  can still be resized without inventing an axis.
- `MAX_ASPECT = 50`: banners, separators and corrupt headers (60000x1) are not photos; 50:1
  is far beyond any panorama a photo dataset would hold, and stretching past it only smears.
- Pillow's `Image.MAX_IMAGE_PIXELS` (about 89 Mpx by default) stays in force, and its
  warning (over the limit) is treated as fatally as its error (over twice the limit).
"""

from __future__ import annotations

import io
import re
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from siamese_cv.config.choices import ENCODE_FORMATS, RESIZE_MODES

try:  # littlecms ships with Pillow's wheels, but a source build may lack it
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on how Pillow was built
    ImageCms = None  # type: ignore[assignment]

MIN_SIDE = 2
MAX_ASPECT = 50.0

# Formats a photo dataset plausibly holds. Others (EPS runs Ghostscript, PSD, FITS, ...) widen
# the attack surface for no gain, so Pillow is not allowed to try them.
_ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF")
# Downscales by more than this factor first shrink by an integer factor (fast, box filter),
# then finish with BICUBIC; 3.0 is visually indistinguishable from a full BICUBIC pass.
_REDUCING_GAP = 3.0
_WHITE = (255, 255, 255)
_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


class ImageError(Exception):
    """An image that cannot be used; the message is a short reason such as "truncated JPEG"."""


def decode_image(data: bytes, *, target_size: int | None = None) -> Image.Image:
    """Decode untrusted bytes into a fully loaded 8-bit RGB image.

    Decoding is eager (`load()`), so a truncated file fails here rather than later inside a
    training batch. EXIF orientation is applied so rotated phone photos come out upright, and
    animated GIF/WebP files give their first frame.

    Args:
        data: The raw file bytes.
        target_size: The side the caller will resize to. A JPEG at least twice that size on its
            shorter side is decoded at a reduced DCT scale (still at least `target_size`), which
            is several times faster and loses nothing the resize would keep.

    Returns:
        An RGB image with mode "RGB" and all pixels loaded.

    Raises:
        ImageError: The bytes are empty, not an image, an unsupported format, a decompression
            bomb, truncated or corrupt, too small, or too elongated.
    """
    if not data:
        raise ImageError("zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
        except Image.UnidentifiedImageError:
            raise ImageError(_sniff(data)) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageError(_bomb_reason(error)) from None
        except (
            Exception
        ) as error:  # malformed headers raise anything from SyntaxError to struct.error
            raise ImageError(f"corrupt image header ({_short(error)})") from None
        fmt = img.format or "image"
        _check_dimensions(*img.size)
        if target_size and fmt in ("JPEG", "MPO") and min(img.size) >= 2 * target_size:
            img.draft("RGB", (target_size, target_size))
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageError(_bomb_reason(error)) from None
        except Exception as error:  # decoders report damage as OSError, SyntaxError, ValueError...
            raise ImageError(_load_reason(fmt, error)) from None
    return _to_rgb(img)


def resize_image(img: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize to a `size` x `size` square.

    Args:
        img: The image to resize (any mode Pillow can resample; RGB from `decode_image`).
        size: The output side in pixels.
        mode: "stretch" scales both axes to `size`, ignoring the aspect ratio (the original
            project's behaviour); "shorter_side_crop" scales the shorter side to `size` and
            keeps the centre square, so objects keep their shape.

    Returns:
        A new `size` x `size` image, resampled with BICUBIC (after an integer pre-reduction
        for big downscales).

    Raises:
        ValueError: `mode` is not one of `RESIZE_MODES`, or `size` is not positive.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    width, height = img.size
    if mode == "stretch":
        box = (0, 0, width, height)
    elif mode == "shorter_side_crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    else:
        raise ValueError(f"unknown resize mode {mode!r}; valid modes: {', '.join(RESIZE_MODES)}")
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=_REDUCING_GAP)


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    """Encode an RGB image without metadata, so equal pixels always give equal bytes.

    Args:
        img: The image to encode.
        fmt: "jpeg" (or "jpg"), "png" or "webp", case-insensitive.
        quality: 1-100 for JPEG and lossy WebP; ignored for PNG, which is lossless.

    Returns:
        The encoded file bytes (no EXIF, ICC profile or timestamps).

    Raises:
        ValueError: `fmt` is not one of `ENCODE_FORMATS`.
    """
    key = fmt.lower()
    buffer = io.BytesIO()
    if key in ("jpeg", "jpg"):
        img.save(buffer, "JPEG", quality=quality)
    elif key == "png":
        img.save(buffer, "PNG", compress_level=6)
    elif key == "webp":
        img.save(buffer, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(
            f"unknown image format {fmt!r}; valid formats: {', '.join(ENCODE_FORMATS)}"
        )
    return buffer.getvalue()


def prepare_image(data: bytes, size: int, mode: str, fmt: str, quality: int) -> bytes:
    """Decode, resize and re-encode one image: the whole per-image job of a preprocess worker.

    Args:
        data: Raw source bytes.
        size: Output side in pixels.
        mode: A resize mode from `RESIZE_MODES`.
        fmt: An output format from `ENCODE_FORMATS`.
        quality: Encoder quality (1-100).

    Returns:
        The encoded `size` x `size` RGB image.

    Raises:
        ImageError: The source bytes are not a usable image.
        ValueError: `mode` or `fmt` is unknown.
    """
    img = decode_image(data, target_size=size)
    return encode_image(resize_image(img, size, mode), fmt, quality)


def load_rgb(path_or_bytes: str | PathLike[str] | bytes, size: int, mode: str) -> Image.Image:
    """Read a query image from a file or bytes, decoded and resized exactly like the dataset.

    Args:
        path_or_bytes: A file path, or the image bytes themselves.
        size: Output side in pixels.
        mode: A resize mode from `RESIZE_MODES`.

    Returns:
        A `size` x `size` RGB image.

    Raises:
        ImageError: The file cannot be read or is not a usable image (the message names the
            file when a path was given).
        ValueError: `mode` is unknown.
    """
    if isinstance(path_or_bytes, bytes | bytearray):
        return resize_image(decode_image(bytes(path_or_bytes), target_size=size), size, mode)
    path = Path(path_or_bytes)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        img = decode_image(data, target_size=size)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None
    return resize_image(img, size, mode)


def _check_dimensions(width: int, height: int) -> None:
    """Reject images too small or too elongated to be photos (see the module docstring)."""
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{width}x{height} px is too small (need at least {MIN_SIDE} px a side)")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageError(
            f"{width}x{height} px: aspect ratio over {MAX_ASPECT:g}:1 (a banner, not a photo)"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB: alpha over white, 16-bit scaled, CMYK via ICC."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(img).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*_WHITE, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageError(f"unsupported pixel mode {mode} ({_short(error)})") from None


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit grayscale to 8 bits instead of clipping (Pillow's convert clips at 255).

    "I;16*" is 16-bit by definition: divide by 257 (65535 -> 255). Mode "I" is what some
    plugins give 16-bit PNG/TIFF files, so it is scaled as 16-bit unless every value already
    fits in 8 bits. Mode "F" is taken as 0-1 when its maximum is at most 1, else as 0-255.
    """
    values = np.asarray(img).astype(np.float64)
    peak = float(values.max()) if values.size else 0.0
    if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
        values = values / 257.0
    elif img.mode == "F" and peak <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile when there is one, else Pillow's naive formula."""
    profile = img.info.get("icc_profile")
    if profile and ImageCms is not None:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(
                img, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
            if converted is not None:
                return converted
        except (OSError, ValueError, ImageCms.PyCMSError):
            pass  # a broken profile is common in the wild; the naive conversion is still usable
    return img.convert("RGB")


def _sniff(data: bytes) -> str:
    """Why Pillow could not identify `data`: say what the bytes look like instead."""
    for magic, name in _MAGIC.items():
        if data.startswith(magic):
            return f"corrupt or truncated {name} header"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "corrupt or truncated WEBP header"
    head = data[:1024].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "not an image (HTML)"
    if head.startswith((b"<?xml", b"<svg")):
        return "not an image (XML/SVG)"
    if head.startswith((b"{", b"[")):
        return "not an image (JSON)"
    try:
        data[:1024].decode("utf-8")
    except UnicodeDecodeError:
        return "not an image (unrecognised format)"
    return "not an image (text)"


def _bomb_reason(error: Exception) -> str:
    numbers = [int(n) for n in re.findall(r"\d+", str(error))]
    if len(numbers) >= 2:
        return f"decompression bomb: {numbers[0]:.2g} pixels > limit {numbers[1]:.2g}"
    return f"decompression bomb ({_short(error)})"


def _load_reason(fmt: str, error: Exception) -> str:
    text = str(error)
    if "truncated" in text.lower() or isinstance(error, EOFError):
        return f"truncated {fmt}"
    return f"corrupt {fmt} ({_short(error)})"


def _short(error: BaseException, limit: int = 80) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
