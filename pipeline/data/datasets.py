"""Image-folder scanning, per-file validation and the stable, content-hashed split.

A data source is a folder with one sub-folder per class. Nothing here writes files: prepare
calls these functions and writes their results.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import interrupts
from pipeline.cores import usable_cores
from pipeline.data.images import DecodedImage, UnusableImage, content_hash, decode_image
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
    pixels: np.ndarray  # a view of row `position` of the array validate_files decoded into
    conversions: list[str]
    position: int  # the file's place in the scanned list


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


def decode_threads() -> int:
    """Images decoded at once: one per usable core (Pillow releases the GIL while it decodes
    and resizes, so threads scale; the order of the results never depends on them)."""
    return usable_cores()


def _decode_file(position: int, file: ScannedFile, root: Path, size: int, max_pixels: int,
                 decoded_into: np.ndarray) -> tuple[str, DecodedImage] | UnusableImage:
    """(sha256, decoded image) with its pixels copied into decoded_into[position], or the
    UnusableImage that says why not. Runs in a worker thread, the copy included (numpy lets go
    of the GIL for it, so the page faults of a memory-mapped target are paid in parallel too)."""
    try:
        data = _read_inside_root(file, root)
        decoded = decode_image(data, size, max_pixels)
    except UnusableImage as exc:
        return exc
    decoded_into[position] = decoded.pixels
    decoded.pixels = decoded_into[position]
    return content_hash(data), decoded


def decoded_in_order(items: list, decode, threads: int) -> Iterator:
    """decode(*item) for each item, yielded in the items' order, with at most 2 x threads
    decodes in flight (memory stays flat; a stop at a safe point waits for those few only)."""
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        ahead = iter(items)
        pending = deque(pool.submit(decode, *item) for item in itertools.islice(ahead, 2 * threads))
        try:
            while pending:
                outcome = pending.popleft().result()
                pending.extend(pool.submit(decode, *item) for item in itertools.islice(ahead, 1))
                yield outcome
        finally:
            for future in pending:
                future.cancel()


def validate_files(
    root: Path, files: list[ScannedFile], size: int, max_pixels: int, progress=None,
    decoded_into: np.ndarray | None = None, threads: int | None = None,
) -> ScanResult:
    """Decode every file; sort each into accepted, quarantined (with reason) or duplicate.

    Each file is decoded into its row of decoded_into, an (len(files), size, size, 3) uint8
    array (default: one in memory; prepare passes a memory-mapped scratch file, so a large folder
    never sits in memory whole); an accepted image's pixels are a view of its row. threads:
    images decoded at once (default: decode_threads()); the result does not depend on it.
    """
    if decoded_into is None:
        decoded_into = np.empty((len(files), size, size, 3), np.uint8)
    result = ScanResult()
    by_hash: dict[str, list[Accepted]] = defaultdict(list)
    decode = functools.partial(_decode_file, root=root, size=size, max_pixels=max_pixels,
                               decoded_into=decoded_into)
    outcomes = decoded_in_order(list(enumerate(files)), decode, threads or decode_threads())
    for position, (file, outcome) in enumerate(zip(files, outcomes, strict=True)):
        interrupts.check()  # a safe point: between images
        if isinstance(outcome, UnusableImage):
            result.quarantined.append(
                {"path": file.relative, "label": file.label, "reason": str(outcome)}
            )
        else:
            digest, decoded = outcome
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
                    position=position,
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
