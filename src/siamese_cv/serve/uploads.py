"""Untrusted uploads: size and pixel limits before decoding, and one-line reasons for refusals."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from siamese_cv.data.images import ImageError
from siamese_cv.retrieval.engine import SearchEngine
from siamese_cv.serve.settings import Settings


class Refused(Exception):
    """An upload the server will not search with: an HTTP status and a one-line reason."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def too_large(size: int | None, settings: Settings) -> Refused:
    """413 for an upload of `size` bytes (None: cut off while arriving, size unknown)."""
    what = "the upload" if size is None else f"{size / 1024 / 1024:.2f} MB"
    return Refused(
        413,
        f"image: {what} is over the {settings.max_upload_mb:g} MB upload limit; send a smaller "
        "file (the server's --max-upload-mb)",
    )


def prepare_upload(
    data: bytes, engine: SearchEngine, settings: Settings
) -> tuple[Image.Image, tuple[int, int]]:
    """Check and decode an uploaded photo into the network's input.

    Returns:
        (the prepared image, the upload's (width, height)).

    Raises:
        Refused: empty, over the size or pixel limit, or not a usable image.
    """
    if not data:
        raise Refused(400, "image: the file is empty (zero bytes); choose a photo")
    if len(data) > settings.max_upload_bytes:
        raise too_large(len(data), settings)
    size = _peek_size(data)
    if size is not None and size[0] * size[1] > settings.max_pixels:
        width, height = size
        raise Refused(
            413,
            f"image: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the "
            f"{settings.max_pixels / 1e6:g} megapixel limit (a decompression bomb?); send a "
            "smaller photo",
        )
    try:
        image = engine.prepare(data)
    except ImageError as error:
        raise Refused(
            400, f"image: {error}; send a JPEG, PNG, WebP, GIF, BMP or TIFF photo"
        ) from None
    return image, size or (0, 0)


def _peek_size(data: bytes) -> tuple[int, int] | None:
    """The image's size from its header alone (nothing decoded); None if Pillow cannot tell."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.size
        except Image.DecompressionBombError as error:  # over twice Pillow's own limit
            raise Refused(413, f"image: {error}; send a smaller photo") from None
        except Exception:  # not an image, or a damaged header: decode_image names it
            return None
