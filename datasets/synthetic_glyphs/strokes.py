"""The glyph model: alphabets have a style, characters are 2-4 strokes, and each
drawing of a character is the same strokes redrawn by a slightly shaky hand.

Coordinates: a character lives in a unit box [-1, 1]^2; a drawing maps it to
pixels of a 105x105 canvas (x right, y down) through a jittered affine map.
"""
import math
from collections import namedtuple

import numpy as np

from . import raster
from .randomness import chance, integer, normal, uniform

CANVAS = 105  # Omniglot's image size
Style = namedtuple("Style", "curvy max_points connect dot turn")
Stroke = namedtuple("Stroke", "points curve")  # points: [n, 2] in the unit box


def alphabet_style(rng):
    """What the characters of one alphabet have in common."""
    return Style(curvy=uniform(rng, 0.1, 0.9),        # share of smooth strokes
                 max_points=integer(rng, 3, 5),      # control points per stroke
                 connect=uniform(rng, 0.4, 0.9),     # strokes starting on earlier ones
                 dot=uniform(rng, 0.0, 0.25),        # chance of a short dash / dot
                 turn=uniform(rng, 0.6, 1.6))        # how sharply strokes bend (radians)


def character(rng, style):
    """A random character: 2-4 strokes, later ones often branching off earlier ones."""
    strokes, segments = [], 0
    for _ in range(integer(rng, 2, 4)):
        heading = uniform(rng, 0.0, 2.0 * math.pi)
        if strokes and chance(rng, style.connect):
            host = strokes[integer(rng, 0, len(strokes) - 1)].points
            k = integer(rng, 0, len(host) - 2)
            t = uniform(rng, 0.0, 1.0)
            start = host[k] + t * (host[k + 1] - host[k])
            # branch off roughly across the host, as crossbars and stems do;
            # along it the new stroke would just retrace the old one
            along = math.atan2(host[k + 1][1] - host[k][1], host[k + 1][0] - host[k][0])
            heading = along + (1 if chance(rng, 0.5) else -1) * uniform(rng, 1.0, 2.1)
        else:
            start = np.array([uniform(rng, -0.7, 0.7), uniform(rng, -0.7, 0.7)])
        if chance(rng, style.dot):
            strokes.append(_walk(rng, start, heading, 2, 0.08, 0.18, style.turn, curve=False))
            continue
        curve = chance(rng, style.curvy)
        n = integer(rng, 3 if curve else 2, style.max_points)
        if strokes and segments + n - 1 > 7:  # keep glyphs legible, not scribbles
            break
        segments += n - 1
        strokes.append(_walk(rng, start, heading, n, 0.45, 1.0, style.turn, curve))
    return _fit(strokes)


def _walk(rng, start, heading, n, min_step, max_step, turn, curve):
    """Control points of a pen walk that bends by about `turn` per step."""
    points = [start]
    for i in range(n - 1):
        if i:  # the first step keeps the given heading
            # capped: a near-U-turn would retrace the stroke into a thin wedge
            heading += max(-2.2, min(2.2, normal(rng, turn)))
        step = uniform(rng, min_step, max_step)
        x = points[-1][0] + step * math.cos(heading)
        if abs(x) > 1.0:  # reflect off the box's sides like a billiard ball
            heading = math.pi - heading
            x = points[-1][0] + step * math.cos(heading)
        y = points[-1][1] + step * math.sin(heading)
        if abs(y) > 1.0:
            heading = -heading
            y = points[-1][1] + step * math.sin(heading)
        points.append(np.array([x, y]))
    return Stroke(np.vstack(points), curve)


def _fit(strokes):
    """Centre the character and scale its larger side to 2 (the unit box)."""
    allpts = np.vstack([s.points for s in strokes])
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    centre, extent = (lo + hi) / 2.0, max(float((hi - lo).max()), 0.3)
    return [Stroke((s.points - centre) * (2.0 / extent), s.curve) for s in strokes]


def drawing(rng, strokes):
    """One drawer's rendering of a character: bool [105, 105], True = ink."""
    size = uniform(rng, 24.0, 33.0)  # half the glyph's larger side, in px
    angle = math.radians(normal(rng, 7.0))
    sx, sy = size * uniform(rng, 0.9, 1.1), size * uniform(rng, 0.9, 1.1)
    shear = normal(rng, 0.08)
    cx, cy = CANVAS / 2.0 + uniform(rng, -7.0, 7.0), CANVAS / 2.0 + uniform(rng, -7.0, 7.0)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    radius = uniform(rng, 1.1, 1.9)  # pen tip: strokes 3-4 px wide like Omniglot
    samples = []
    for stroke in strokes:
        pts = stroke.points + np.array([[normal(rng, 0.06), normal(rng, 0.06)]])
        noise = np.array([[normal(rng, 0.07), normal(rng, 0.07)] for _ in pts])
        u = pts[:, 0] + noise[:, 0]
        v = pts[:, 1] + noise[:, 1]
        u = u + shear * v
        # elementwise affine on purpose: a matrix product may use BLAS (not bit-stable)
        px = cx + sx * (cos_a * u) - sy * (sin_a * v)
        py = cy + sx * (sin_a * u) + sy * (cos_a * v)
        ctrl = np.stack([px, py], axis=1)
        samples.append(raster.catmull_rom(ctrl) if stroke.curve else raster.polyline(ctrl))
    return raster.draw(samples, radius, CANVAS)
