"""Edited copies of gallery photos: the query side of the copy-detection evaluation.

The family of edits that image-copy-detection benchmarks (DISC21, Copydays) apply: resizing
with JPEG re-compression, crops, flips, small rotations, colour and contrast changes, blur,
padding, overlaid text, and pairs of them. Each edit draws its strength from a generator seeded
by (seed, photo, edit), so a photo's copy is the same whatever else is in the set.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

Edit = Callable[[Image.Image, np.random.Generator], Image.Image]
SAVE_QUALITY = 95  # the copies' own JPEG encoding, where the edit is not a re-compression


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def resize_jpeg(scale: float, quality: int) -> Edit:
    def edit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return _jpeg(image.resize(size, Image.Resampling.BILINEAR), quality)

    return edit


def crop(keep: float) -> Edit:
    """Keep `keep` of each side, at a random position."""

    def edit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        w, h = round(image.width * keep), round(image.height * keep)
        left = int(rng.integers(0, image.width - w + 1))
        top = int(rng.integers(0, image.height - h + 1))
        return image.crop((left, top, left + w, top + h))

    return edit


def mirror(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(image)


def rotate(max_degrees: float) -> Edit:
    def edit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        angle = float(rng.uniform(max_degrees / 2, max_degrees)) * float(rng.choice([-1, 1]))
        return image.rotate(angle, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))

    return edit


def colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each moved by 20-40%, up or down."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        factor = 1 + float(rng.uniform(0.2, 0.4)) * float(rng.choice([-1, 1]))
        image = enhancer(image).enhance(factor)
    return image


def blur(radius: float) -> Edit:
    def edit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius))

    return edit


def pad(share: float) -> Edit:
    """A border of `share` of the shorter side in a random flat colour (letterboxing)."""

    def edit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        border = round(min(image.size) * share)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        return ImageOps.expand(image, border, fill)

    return edit


def overlay_text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A line of white text with a dark outline across the lower part, as captions and memes."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, image.height // 9))
    words = ["SALE", "yum", "today", "copyright", "2026", "menu", "delicious", "#food"]
    text = " ".join(rng.choice(words, size=3))
    y = int(image.height * float(rng.uniform(0.55, 0.8)))
    draw.text((image.width // 12, y), text, fill="white", font=font, stroke_width=2,
              stroke_fill="black")  # fmt: skip
    return out


def both(first: Edit, second: Edit) -> Edit:
    def edit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return second(first(image, rng), rng)

    return edit


EDITS: dict[str, Edit] = {
    "jpeg q40 half size": resize_jpeg(0.5, 40),
    "jpeg q20": resize_jpeg(1.0, 20),
    "crop 80%": crop(0.8),
    "crop 60%": crop(0.6),
    "mirror": mirror,
    "rotate 5-10 deg": rotate(10.0),
    "colour and contrast": colour,
    "blur": blur(2.0),
    "pad 15%": pad(0.15),
    "text overlay": overlay_text,
    "crop 70% + jpeg q30": both(crop(0.7), resize_jpeg(0.75, 30)),
    "mirror + colour": both(mirror, colour),
}


@dataclass(frozen=True)
class Copy:
    source: int  # the gallery row the copy was made from
    edit: str
    encoded: bytes  # JPEG


def choose_sources(count: int, gallery_size: int, seed: int) -> np.ndarray:
    """`count` distinct gallery rows (all of them when there are fewer), sorted, seeded."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0FE]))
    chosen = rng.choice(gallery_size, size=min(count, gallery_size), replace=False)
    return np.sort(chosen)


def make_copies(
    images: Sequence[bytes], sources: Sequence[int], seed: int, edits: Sequence[str] = ()
) -> list[Copy]:
    """Every edit of `edits` (default: all of `EDITS`) applied to each photo of `sources`.

    Args:
        images: the gallery's stored photos (encoded), indexed by gallery row.
        sources: the gallery rows to copy.
        seed: seeds each (photo, edit)'s strength.
    """
    names = list(edits) or list(EDITS)
    unknown = [n for n in names if n not in EDITS]
    if unknown:
        raise ValueError(f"unknown edit {unknown[0]!r}; choose from {', '.join(EDITS)}")
    copies = []
    for row in sources:
        photo = Image.open(io.BytesIO(images[row])).convert("RGB")
        for name in names:
            edit = list(EDITS).index(name)  # by its place in EDITS: the same for any subset
            rng = np.random.default_rng(np.random.SeedSequence([seed, int(row), edit]))
            edited = EDITS[name](photo, rng).convert("RGB")
            buffer = io.BytesIO()
            edited.save(buffer, "JPEG", quality=SAVE_QUALITY)
            copies.append(Copy(int(row), name, buffer.getvalue()))
    return copies
