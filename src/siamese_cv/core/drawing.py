"""Drawing primitives shared by every figure: thumbnails, captions, borders, atomic PNG writes.

Each figure is written atomically (a temporary name, then `os.replace`) so a killed stage never
leaves a half-written image that looks like a finished output.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from siamese_cv.core.atomic import atomic_path  # noqa: E402

GOOD = "#1a9641"  # green: correct / same class
BAD = "#d7191c"  # red: wrong / other class
DPI = 110
# Images are shrunk to this many pixels on their long side before plotting: the figure cannot
# show more, and full-size photos would make the PNGs (and DVC's cache) needlessly large.
THUMB_PX = 160


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG atomically and close it (pyplot keeps figures alive until closed)."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def thumbnail(image: Image.Image) -> np.ndarray:
    """An RGB uint8 array of `image`, shrunk to at most THUMB_PX on its long side."""
    small = image.convert("RGB")
    small.thumbnail((THUMB_PX, THUMB_PX))
    return np.asarray(small)


def shorten(text: str, width: int = 24) -> str:
    """Shorten a class name so long names do not run into the neighbouring image."""
    return textwrap.shorten(str(text), width=width, placeholder="...")


def show_image(ax: Axes, image: Image.Image) -> None:
    """Draw `image` on `ax` without ticks, keeping the frame (spines) for coloured borders."""
    ax.imshow(thumbnail(image))
    ax.set_xticks([])
    ax.set_yticks([])


def draw_border(ax: Axes, color: str, width: float = 4.0) -> None:
    """Frame `ax` in `color`: green or red says at a glance whether a result is right."""
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)
