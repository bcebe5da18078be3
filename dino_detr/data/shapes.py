"""Rendering of one synthetic image of the demo dataset: a textured background, shapes
with known boxes, and unannotated clutter.

Everything is drawn with OpenCV from a ``numpy.random.Generator``, so an image is a
pure function of the generator's seed.
"""

from typing import Dict, List, Tuple

import cv2
import numpy as np

__all__ = ["SHAPE_CLASSES", "render_image"]

SHAPE_CLASSES = ["circle", "rectangle", "triangle", "star"]

# Largest fraction of an already placed object that a new object may cover.
_MAX_OCCLUSION = 0.35
# Fewest visible pixels of an annotated shape.
_MIN_AREA = 40


def _textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 background: a colour gradient plus one random texture and noise."""
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    t = np.linspace(0.0, 1.0, width if rng.random() < 0.5 else height)
    ramp = c0[None, :] + (c1 - c0)[None, :] * t[:, None]
    image = np.broadcast_to(ramp[None] if len(t) == width else ramp[:, None], (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(0, 3)
    amplitude = rng.uniform(10, 30)
    if kind == 0:  # stripes at a random angle
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
        texture = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 1:  # checkerboard
        cell = int(rng.integers(8, 32))
        texture = (((xx // cell) + (yy // cell)) % 2) * 2.0 - 1.0
    else:  # smooth blobs: upsampled low-resolution noise
        low = rng.uniform(-1, 1, size=(max(2, height // 32), max(2, width // 32))).astype(np.float32)
        texture = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    image += amplitude * texture[..., None] * rng.uniform(0.5, 1.0, size=3)
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, kind: str, cx: float, cy: float, size: float) -> np.ndarray:
    """(K, 2) float vertices of a rotated polygon of the given class, about ``size`` wide."""
    angle = rng.uniform(0, 2 * np.pi)
    if kind == "rectangle":
        aspect = rng.uniform(0.45, 1.0)
        half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * [size / 2, size * aspect / 2]
        points = half
    elif kind == "triangle":
        t = angle + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, size=3)
        return np.stack([cx + size / 2 * np.cos(t), cy + size / 2 * np.sin(t)], axis=1)
    elif kind == "star":
        t = angle + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, size / 2, size / 2 * rng.uniform(0.35, 0.5))
        return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)
    else:
        raise ValueError(f"no polygon for shape class {kind!r}")
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rotation.T + [cx, cy]


def _shape_mask(rng: np.random.Generator, kind: str, height: int, width: int, size: float) -> np.ndarray:
    """(H, W) uint8 0/255 mask of one shape at a random position (it may leave the image a little)."""
    cx, cy = rng.uniform(0.1 * width, 0.9 * width), rng.uniform(0.1 * height, 0.9 * height)
    mask = np.zeros((height, width), np.uint8)
    if kind == "circle":
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(size / 2)), 255, -1, cv2.LINE_8)
    else:
        polygon = np.round(_shape_polygon(rng, kind, cx, cy, size)).astype(np.int32)
        cv2.fillPoly(mask, [polygon], 255, cv2.LINE_8)
    return mask


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random RGB colour at least 60 (L2) away from the mean colour under the shape."""
    mean = background.reshape(-1, 3).mean(axis=0) if background.size else np.full(3, 128.0)
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - mean) > 60:
            return colour
    return 255.0 - mean


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Unannotated distractors in place: thin lines, arcs and small dots."""
    height, width = image.shape[:2]
    for _ in range(count):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        kind = rng.integers(0, 3)
        if kind == 0:
            p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(image, p0, p1, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 1:
            axes = (int(rng.integers(8, 30)), int(rng.integers(8, 30)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(image, p0, axes, 0.0, start, start + float(rng.uniform(60, 200)), colour, 2, cv2.LINE_AA)
        else:
            cv2.circle(image, p0, int(rng.integers(1, 4)), colour, -1, cv2.LINE_AA)


def render_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_objects: int,
    size_range: Tuple[float, float],
) -> Tuple[np.ndarray, List[Dict]]:
    """Draw one image.

    Args:
        rng: the only source of randomness.
        height, width: image size in pixels.
        num_objects: how many shapes to try to place (a placement that would hide more
            than 35% of an earlier shape, or shows fewer than 40 pixels, is skipped).
        size_range: (min, max) shape size in pixels.
    Returns:
        image: (H, W, 3) uint8 RGB.
        objects: dicts with ``category_id`` (index into ``SHAPE_CLASSES``), ``bbox``
            [x, y, w, h] of the visible pixels (XYWH_ABS) and ``area`` (visible pixels).
    """
    image = _textured_background(rng, height, width)
    _draw_clutter(rng, image, int(rng.integers(0, 8)))
    owner = np.full((height, width), -1, np.int32)  # which object each pixel shows
    labels: List[int] = []
    for _ in range(num_objects):
        label = int(rng.integers(0, len(SHAPE_CLASSES)))
        size = rng.uniform(*size_range)
        mask = _shape_mask(rng, SHAPE_CLASSES[label], height, width, size) > 0
        area = int(mask.sum())
        if area < _MIN_AREA:
            continue
        covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(labels))
        visible = np.bincount(owner[owner >= 0], minlength=len(labels))
        if np.any(covered > _MAX_OCCLUSION * np.maximum(visible, 1)):
            continue
        colour = _contrasting_colour(rng, image[mask])
        image[mask] = colour.astype(np.uint8)
        owner[mask] = len(labels)
        labels.append(label)
    objects = []
    for index, label in enumerate(labels):
        ys, xs = np.nonzero(owner == index)
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        objects.append(
            {
                "category_id": label,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(len(xs)),
            }
        )
    image = cv2.GaussianBlur(image, (3, 3), 0.6)
    return image, objects
