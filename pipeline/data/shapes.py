"""The built-in data set: geometric shapes on textured, cluttered backgrounds, written as PNGs.

The seeds' worked example is a shape classifier. Plain shapes on white are solved by any
linear probe, so each image varies size, position, rotation, colour, fill, background texture
and adds clutter strokes — hard enough that the frozen-feature head stays below 100% and
fine-tuning has something to win. Deterministic: image i of class c depends only on
(seed, c, i), so asking for more images per class keeps the existing ones.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.cores import usable_cores
from pipeline.errors import PipelineError
from pipeline.params import ShapesParams

SUPPORTED = ("circle", "square", "triangle", "star", "pentagon", "hexagon", "octagon")


def shape_outline(name: str, cx: float, cy: float, radius: float, angle: float) -> list:
    """Vertices of a shape centred at (cx, cy); circles get a fine polygon."""
    if name == "circle":
        n, radii = 48, [radius]
    elif name == "star":
        n, radii = 10, [radius, radius * 0.45]
    else:
        n = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}[name]
        radii = [radius]
    return [
        (
            cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
            cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth colour gradient plus blurred noise blobs: no two backgrounds alike."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack(
        [a + b * xx + c * yy for a, b, c in rng.uniform(-80, 200, size=(3, 3))], axis=-1
    )
    noise = rng.normal(0, 1, size=(size // 8, size // 8, 3))
    noise = np.asarray(
        Image.fromarray(((noise + 3) * 40).clip(0, 255).astype(np.uint8)).resize(
            (size, size), Image.BICUBIC
        ),
        dtype=np.float64,
    )
    pixels = (base + (noise - 120) * rng.uniform(0.2, 0.8)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def render_shape(name: str, rng: np.random.Generator, params: ShapesParams) -> Image.Image:
    size = params.image_size
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    for _ in range(params.clutter):  # distractors: strokes and arcs that share the shapes' edges
        points = [tuple(p) for p in rng.uniform(0, size, size=(int(rng.integers(2, 4)), 2))]
        draw.line(points, fill=_random_colour(rng), width=int(rng.integers(1, 4)))
    radius = rng.uniform(params.min_size, params.max_size) * size
    cx, cy = rng.uniform(radius * 0.8, size - radius * 0.8, size=2)
    outline = shape_outline(name, cx, cy, radius, rng.uniform(0, 2 * math.pi))
    colour = _random_colour(rng)
    if rng.random() < 0.7:
        draw.polygon(outline, fill=colour)
    else:
        draw.polygon(outline, outline=colour, width=int(rng.integers(2, 6)))
    for _ in range(params.clutter // 2):  # clutter on top partly occludes the shape
        x, y = rng.uniform(0, size, size=2)
        r = rng.uniform(2, size * 0.06)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_random_colour(rng))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))


RENDER_CHUNK = 200  # images one worker process renders per task


def _render_range(name: str, start: int, stop: int, seed: int, params: ShapesParams, class_dir: Path) -> int:
    """Write images start..stop-1 of one class (a worker process's task); returns the count."""
    for i in range(start, stop):
        rng = np.random.default_rng([seed, SUPPORTED.index(name), i])
        render_shape(name, rng, params).save(class_dir / f"{name}_{i:05d}.png", optimize=False)
    return stop - start


def generate(params: ShapesParams, seed: int, out_dir: Path, processes: int | None = None) -> int:
    """Write images_per_class PNGs per class under out_dir/<class>/; returns the count.

    Rendered in worker processes, one per core (default), in chunks of RENDER_CHUNK images:
    each image depends only on (seed, class, index), so the files are the same however many
    processes render them. A folder of fewer than two chunks is rendered here, without a pool.
    """
    unknown = [c for c in params.classes if c not in SUPPORTED]
    if unknown:
        raise PipelineError(
            f"params.yaml: shapes.classes has unknown shape {unknown[0]!r} — use any of {SUPPORTED}"
        )
    tasks = []
    for name in params.classes:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        for start in range(0, params.images_per_class, RENDER_CHUNK):
            stop = min(start + RENDER_CHUNK, params.images_per_class)
            tasks.append((name, start, stop, seed, params, out_dir / name))
    processes = min(processes or usable_cores(), len(tasks))
    if processes <= 1 or len(params.classes) * params.images_per_class < 2 * RENDER_CHUNK:  # no pool pays
        return sum(_render_range(*task) for task in tasks)
    # spawn, not fork: a fresh interpreter per worker inherits no threads or locks of this one
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(_render_range, *zip(*tasks, strict=True)))
