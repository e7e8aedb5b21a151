"""Line charts of Dice against the number of interactions, drawn with Pillow.

Pillow is a core dependency, so figures need no plotting package. Each chart has a Dice
axis from 0 to 1, one tick per interaction (fewer when there are many), one coloured line
with markers per series and a legend. Files are written atomically: the PNG is saved to a
temporary file in the target folder and moved into place with ``os.replace``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["plot_dice_curves"]

logger = logging.getLogger(__name__)

WIDTH, HEIGHT = 800, 520
LEFT, RIGHT, TOP, BOTTOM = 80, 200, 50, 70
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
MAX_X_TICKS = 12


def plot_dice_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str = "Dice against number of interactions",
) -> Path:
    """Draw one line per series of Dice values (interaction 1..N) and save it as PNG.

    Args:
        curves: series name to its N Dice values in [0, 1]; every series has the same N.
            NaN values leave a gap in their line.
        path: PNG file to write; missing parent folders are created.
        title: text above the chart.

    Returns:
        The path written.
    """
    lengths = _checked_curves(curves)
    count = lengths.pop()
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _draw_axes(draw, font, count, title)
    for position, (name, values) in enumerate(curves.items()):
        colour = COLOURS[position % len(COLOURS)]
        _draw_series(draw, [float(value) for value in values], count, colour)
        _draw_legend_entry(draw, font, position, name, colour)
    return _save_atomically(image, Path(path))


def _checked_curves(curves: object) -> set[int]:
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"curves must be a non-empty mapping from series name to Dice values, got {curves!r}")
    lengths = {len(values) for values in curves.values()}
    if len(lengths) != 1 or 0 in lengths:
        sizes = {name: len(values) for name, values in curves.items()}
        raise ValueError(f"every curve needs the same number (>= 1) of Dice values, got lengths {sizes}")
    for name, values in curves.items():
        outside = [value for value in values if not math.isnan(value) and not 0.0 <= value <= 1.0]
        if outside:
            raise ValueError(f"curve {name!r} has Dice values outside [0, 1]: {outside}")
    return lengths


def _x_pixel(interaction: int, count: int) -> float:
    span = WIDTH - LEFT - RIGHT
    if count == 1:
        return LEFT + span / 2
    return LEFT + span * (interaction - 1) / (count - 1)


def _y_pixel(value: float) -> float:
    return HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * value


def _draw_axes(draw: ImageDraw.ImageDraw, font, count: int, title: str) -> None:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    draw.text((LEFT, TOP / 2 - 6), title, fill="black", font=font)
    draw.line([(LEFT, TOP), (LEFT, bottom), (right, bottom)], fill="black", width=2)
    for tick in range(0, 5):
        value = tick / 4
        y = _y_pixel(value)
        draw.line([(LEFT, y), (right, y)], fill="#dddddd", width=1)
        draw.line([(LEFT - 5, y), (LEFT, y)], fill="black", width=1)
        draw.text((LEFT - 40, y - 6), f"{value:.2f}", fill="black", font=font)
    step = max(1, math.ceil(count / MAX_X_TICKS))
    for interaction in range(1, count + 1, step):
        x = _x_pixel(interaction, count)
        draw.line([(x, bottom), (x, bottom + 5)], fill="black", width=1)
        draw.text((x - 3, bottom + 10), str(interaction), fill="black", font=font)
    draw.text(((LEFT + right) / 2 - 60, bottom + 35), "number of interactions", fill="black", font=font)
    draw.text((10, TOP - 25), "Dice", fill="black", font=font)


def _draw_series(draw: ImageDraw.ImageDraw, values: list[float], count: int, colour: str) -> None:
    points = [
        None if math.isnan(value) else (_x_pixel(index + 1, count), _y_pixel(value))
        for index, value in enumerate(values)
    ]
    for start, end in zip(points, points[1:]):
        if start is not None and end is not None:
            draw.line([start, end], fill=colour, width=3)
    for point in points:
        if point is not None:
            x, y = point
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)


def _draw_legend_entry(draw: ImageDraw.ImageDraw, font, position: int, name: str, colour: str) -> None:
    x = WIDTH - RIGHT + 20
    y = TOP + 20 * position
    draw.line([(x, y + 6), (x + 20, y + 6)], fill=colour, width=3)
    draw.text((x + 26, y), str(name), fill="black", font=font)


def _save_atomically(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            image.save(handle, format="PNG")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    logger.info("wrote figure %s", path)
    return path
