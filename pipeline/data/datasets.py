"""Image-folder scanning, per-file validation and the stable, content-hashed split.

A data source is a folder with one sub-folder per class. Nothing here writes files: prepare
calls these functions and writes their results.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import interrupts
from pipeline.data.images import UnusableImage, content_hash, decode_image
from pipeline.errors import PipelineError

# OS droppings: never images, reported as ignored rather than quarantined
IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "._.ds_store"}
SPLITS = ("train", "val", "test")


@dataclass
class ScannedFile:
    label: str
    path: Path  # absolute
    relative: str  # posix path relative to the data root, as written in the manifest


@dataclass
class Accepted:
    label: str
    relative: str
    sha256: str
    width: int
    height: int
    pixels: np.ndarray
    conversions: list[str]


@dataclass
class ScanResult:
    accepted: list[Accepted] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)  # {path, label, reason}
    ignored: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)  # same bytes, same class: one kept


def scan_source(root: Path) -> tuple[list[str], list[ScannedFile], list[dict]]:
    """List class folders and their files; returns (classes, files, ignored)."""
    if not root.is_dir():
        raise PipelineError(
            f"data.source {root} is not a folder — point it at a folder with one sub-folder per class"
        )
    root = root.resolve()
    classes = sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if len(classes) < 2:
        raise PipelineError(
            f"data.source {root} has {len(classes)} class folder(s) — it needs one sub-folder per "
            "class, at least two"
        )
    files: list[ScannedFile] = []
    ignored: list[dict] = []
    for label in classes:
        class_dir = root / label
        # followlinks=False: a symlinked folder cannot loop us or lead us outside the root
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                relative = path.relative_to(root).as_posix()
                if name.lower() in IGNORED_NAMES or name.startswith("._"):
                    ignored.append({"path": relative, "label": label, "reason": "system file"})
                    continue
                files.append(ScannedFile(label=label, path=path, relative=relative))
    return classes, files, ignored


def _read_inside_root(file: ScannedFile, root: Path) -> bytes:
    try:
        real = file.path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise UnusableImage("broken or looping symlink") from None
    if not real.is_relative_to(root.resolve()):
        raise UnusableImage("symlink points outside the data root")
    if not real.is_file():
        raise UnusableImage("not a regular file")
    return real.read_bytes()


def validate_files(
    root: Path, files: list[ScannedFile], size: int, max_pixels: int, progress=None
) -> ScanResult:
    """Decode every file; sort each into accepted, quarantined (with reason) or duplicate."""
    result = ScanResult()
    by_hash: dict[str, list[Accepted]] = defaultdict(list)
    for file in files:
        interrupts.check()  # a safe point: between images
        try:
            data = _read_inside_root(file, root)
            decoded = decode_image(data, size, max_pixels)
        except UnusableImage as exc:
            result.quarantined.append(
                {"path": file.relative, "label": file.label, "reason": str(exc)}
            )
        else:
            digest = content_hash(data)
            same = [a for a in by_hash[digest] if a.label == file.label]
            if same:
                result.duplicates.append(
                    {"path": file.relative, "label": file.label, "duplicate_of": same[0].relative}
                )
            else:
                item = Accepted(
                    label=file.label,
                    relative=file.relative,
                    sha256=digest,
                    width=decoded.width,
                    height=decoded.height,
                    pixels=decoded.pixels,
                    conversions=decoded.conversions,
                )
                by_hash[digest].append(item)
        if progress is not None:
            progress.update(1)
    # one content under two labels is a labelling error: train on neither, report both
    conflicting = {h for h, items in by_hash.items() if len({a.label for a in items}) > 1}
    for digest, items in by_hash.items():
        if digest in conflicting:
            labels = sorted({a.label for a in items})
            for a in items:
                result.quarantined.append(
                    {
                        "path": a.relative,
                        "label": a.label,
                        "reason": f"same content labelled as {' and '.join(labels)}",
                    }
                )
        else:
            result.accepted.extend(items)
    result.accepted.sort(key=lambda a: a.relative)
    return result


def split_of(sha256: str, val_fraction: float, test_fraction: float) -> str:
    """The split is a function of the content hash alone, so adding images never moves one.

    Each image's position u in [0, 1) is uniform and independent of its class, so every class
    is split in the same proportions in expectation (stratified without a global shuffle).
    """
    u = int(sha256[:15], 16) / float(16**15)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def check_class_sizes(
    classes: list[str], labels: list[str], splits: list[str], min_per_class: int
) -> list[str]:
    """Raise for classes that cannot be trained on; return warnings for thin splits."""
    counts = Counter(labels)
    for label in classes:
        if counts[label] == 0:
            raise PipelineError(
                f"class folder {label!r} has no usable images — add images or remove the folder"
            )
        if counts[label] < min_per_class:
            raise PipelineError(
                f"class {label!r} has {counts[label]} usable images, fewer than "
                f"data.min_images_per_class={min_per_class} — add images or merge/remove the class"
            )
    per_split = Counter(zip(labels, splits, strict=True))
    warnings = []
    for label in classes:
        if per_split[(label, "train")] == 0:
            raise PipelineError(
                f"class {label!r} got no training images from the hash split — add images to it"
            )
        for split in ("val", "test"):
            if per_split[(label, split)] == 0:
                warnings.append(f"class {label!r} has no {split} images; add images to measure it")
    return warnings
