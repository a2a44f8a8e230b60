"""Stage shapes: write the built-in shapes data set (pipeline/data/shapes.py) to data/shapes."""

from __future__ import annotations

from pipeline.data.shapes import generate


def main(params) -> None:
    """Stage shapes: (re)write the built-in data set under data/shapes, atomically."""
    from pipeline import paths
    from pipeline.atomic import atomic_path
    from pipeline.progress import say

    with atomic_path(paths.SHAPES_DIR) as out:
        count = generate(params.shapes, params.seed, out)
    say(f"shapes: wrote {count} PNGs in {len(params.shapes.classes)} classes to {paths.SHAPES_DIR}")
