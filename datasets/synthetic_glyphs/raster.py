"""Rasterize pen strokes: sample each stroke densely and stamp a round pen tip."""
import math

import numpy as np

STEP = 0.4  # px between samples; below 0.5 so the stamped tips leave no gaps


def catmull_rom(points):
    """Smooth curve through the control points ([n, 2] float64) as dense samples."""
    pts = np.vstack([points[:1], points, points[-1:]])  # repeat ends as tangents
    out = [points[:1]]
    for k in range(1, len(pts) - 2):
        p0, p1, p2, p3 = pts[k - 1], pts[k], pts[k + 1], pts[k + 2]
        n = max(2, int(math.ceil(_length(p1, p2) / STEP)) + 1)
        t = (np.arange(1, n) / (n - 1))[:, None]
        out.append(0.5 * (2.0 * p1 + (p2 - p0) * t + (2.0 * p0 - 5.0 * p1 + 4.0 * p2 - p3) * t * t
                          + (3.0 * p1 - p0 - 3.0 * p2 + p3) * t * t * t))
    return np.vstack(out)


def polyline(points):
    """Straight segments between the control points as dense samples."""
    out = [points[:1]]
    for p1, p2 in zip(points[:-1], points[1:]):
        n = max(2, int(math.ceil(_length(p1, p2) / STEP)) + 1)
        t = (np.arange(1, n) / (n - 1))[:, None]
        out.append(p1 + (p2 - p1) * t)
    return np.vstack(out)


def _length(p, q):
    return math.hypot(float(q[0] - p[0]), float(q[1] - p[1]))


def pen_tip(radius):
    """Integer offsets covered by a round tip of the given radius."""
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    keep = dx * dx + dy * dy <= radius * radius
    return np.stack([dx[keep], dy[keep]], axis=1)


def draw(samples, radius, size):
    """bool [size, size] with ink wherever the pen tip touched; samples are (x, y) px."""
    ink = np.zeros((size, size), dtype=bool)
    centres = np.rint(np.vstack(samples)).astype(np.int64)
    cover = (centres[:, None, :] + pen_tip(radius)[None, :, :]).reshape(-1, 2)
    inside = (cover >= 0).all(axis=1) & (cover < size).all(axis=1)
    ink[cover[inside, 1], cover[inside, 0]] = True
    return ink
