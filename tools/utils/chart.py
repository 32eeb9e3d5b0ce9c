"""Line charts drawn with Pillow alone (matplotlib is not a dependency).

A chart is a title plus stacked panels sharing the x axis; each panel has
line series and point series (optionally with error bars), numbered ticks,
grid lines and a legend row above its plot area. Everything is drawn at
twice the size and scaled down, which gives smooth anti-aliased lines.
"""
import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

SCALE = 2  # supersampling factor
WIDTH, PANEL_HEIGHT, TITLE_HEIGHT = 960, 330, 44
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 84, 28, 40, 50
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
INK, GRID, FRAME = (30, 30, 30), (225, 225, 225), (90, 90, 90)


@dataclass
class Series:
    label: str
    points: list  # [(x, y)]
    style: str = "line"  # "line" or "points"
    errors: list = None  # half-widths matching points, for error bars


@dataclass
class Panel:
    ylabel: str
    series: list = field(default_factory=list)


def _font(size):
    try:
        return ImageFont.load_default(size=size * SCALE)
    except TypeError:  # Pillow < 10.1 has only a small fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(low, high, count=6):
    """Round tick values covering [low, high] and the decimals to print them."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(factor * magnitude for factor in (1, 2, 2.5, 5, 10) if factor * magnitude >= raw)
    first = math.floor(low / step) * step
    last = math.ceil(high / step) * step
    ticks = [first + index * step for index in range(int(round((last - first) / step)) + 1)]
    decimals = max(0, -math.floor(math.log10(step)) + (1 if str(step / magnitude).startswith("2.5") else 0))
    return ticks, decimals


def _text(draw, xy, text, font, anchor, fill=INK):
    draw.text(xy, text, font=font, fill=fill, anchor=anchor)


class _Axes:
    """Maps data coordinates into one panel's plot rectangle (in pixels)."""

    def __init__(self, box, x_ticks, y_ticks):
        self.box = box
        self.x_low, self.x_high = x_ticks[0], x_ticks[-1]
        self.y_low, self.y_high = y_ticks[0], y_ticks[-1]

    def to_pixel(self, x, y):
        left, top, right, bottom = self.box
        px = left + (x - self.x_low) / (self.x_high - self.x_low) * (right - left)
        py = bottom - (y - self.y_low) / (self.y_high - self.y_low) * (bottom - top)
        return px, py


def _y_range(panel):
    values = []
    for series in panel.series:
        for index, (_, y) in enumerate(series.points):
            spread = series.errors[index] if series.errors else 0.0
            values += [y - (spread or 0.0), y + (spread or 0.0)]
    values = [value for value in values if math.isfinite(value)]
    return (min(values), max(values)) if values else (0.0, 1.0)


def _draw_grid(draw, axes, x_ticks, x_decimals, y_ticks, y_decimals, font):
    left, top, right, bottom = axes.box
    tick = 6 * SCALE
    for value in y_ticks:
        _, y = axes.to_pixel(axes.x_low, value)
        draw.line([(left, y), (right, y)], fill=GRID, width=SCALE)
        draw.line([(left - tick, y), (left, y)], fill=FRAME, width=SCALE)
        _text(draw, (left - tick - 4 * SCALE, y), f"{value:.{y_decimals}f}", font, "rm")
    for value in x_ticks:
        x, _ = axes.to_pixel(value, axes.y_low)
        draw.line([(x, top), (x, bottom)], fill=GRID, width=SCALE)
        draw.line([(x, bottom), (x, bottom + tick)], fill=FRAME, width=SCALE)
        _text(draw, (x, bottom + tick + 3 * SCALE), f"{value:.{x_decimals}f}", font, "mt")
    draw.rectangle(axes.box, outline=FRAME, width=SCALE)


def _draw_series(draw, axes, series, color):
    pixels = [axes.to_pixel(x, y) for x, y in series.points if math.isfinite(y)]
    if series.style == "line" and len(pixels) > 1:
        draw.line(pixels, fill=color, width=2 * SCALE, joint="curve")
    radius = 4 * SCALE if series.style == "points" else 2 * SCALE
    if series.style == "points" or len(pixels) == 1:
        for index, (x, y) in enumerate(pixels):
            if series.errors and series.errors[index]:
                _, y_top = axes.to_pixel(0, series.points[index][1] + series.errors[index])
                _, y_bottom = axes.to_pixel(0, series.points[index][1] - series.errors[index])
                cap = 5 * SCALE
                draw.line([(x, y_top), (x, y_bottom)], fill=color, width=SCALE * 2)
                draw.line([(x - cap, y_top), (x + cap, y_top)], fill=color, width=SCALE * 2)
                draw.line([(x - cap, y_bottom), (x + cap, y_bottom)], fill=color, width=SCALE * 2)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=INK)


def _draw_legend(draw, panel, colors, left, y, font):
    x = left
    for series, color in zip(panel.series, colors):
        if series.style == "line":
            draw.line([(x, y), (x + 24 * SCALE, y)], fill=color, width=3 * SCALE)
        else:
            radius = 4 * SCALE
            draw.ellipse([x + 12 * SCALE - radius, y - radius, x + 12 * SCALE + radius, y + radius],
                         fill=color, outline=INK)
        _text(draw, (x + 30 * SCALE, y), series.label, font, "lm")
        x += 30 * SCALE + draw.textlength(series.label, font=font) + 24 * SCALE


def render_chart(path, title, panels, xlabel):
    """Draw `panels` (sharing one x axis) under `title` into a PNG at `path`."""
    width = WIDTH * SCALE
    height = (TITLE_HEIGHT + PANEL_HEIGHT * len(panels)) * SCALE
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, font = _font(18), _font(13)
    _text(draw, (width / 2, TITLE_HEIGHT * SCALE / 2), title, title_font, "mm")

    xs = [x for panel in panels for series in panel.series for x, _ in series.points]
    x_ticks, x_decimals = nice_ticks(min(xs, default=0.0), max(xs, default=1.0), count=8)
    for number, panel in enumerate(panels):
        top = (TITLE_HEIGHT + number * PANEL_HEIGHT + MARGIN_TOP) * SCALE
        bottom = (TITLE_HEIGHT + (number + 1) * PANEL_HEIGHT - MARGIN_BOTTOM) * SCALE
        box = (MARGIN_LEFT * SCALE, top, width - MARGIN_RIGHT * SCALE, bottom)
        y_ticks, y_decimals = nice_ticks(*_y_range(panel), count=5)
        axes = _Axes(box, x_ticks, y_ticks)
        _draw_grid(draw, axes, x_ticks, x_decimals, y_ticks, y_decimals, font)
        colors = [COLORS[index % len(COLORS)] for index in range(len(panel.series))]
        for series, color in zip(panel.series, colors):
            _draw_series(draw, axes, series, color)
        _draw_legend(draw, panel, colors, box[0], top - 16 * SCALE, font)
        _text(draw, ((box[0] + box[2]) / 2, bottom + 30 * SCALE), xlabel, font, "mt")
        # Rotated y label: draw on a small image, rotate, paste.
        label = Image.new("RGB", (int(draw.textlength(panel.ylabel, font=font)) + 8, 20 * SCALE), "white")
        ImageDraw.Draw(label).text((4, 10 * SCALE), panel.ylabel, font=font, fill=INK, anchor="lm")
        label = label.rotate(90, expand=True)
        image.paste(label, (6 * SCALE, int((top + bottom) / 2 - label.height / 2)))
    image = image.resize((WIDTH, height // SCALE), Image.LANCZOS)
    image.save(path, format="PNG")
