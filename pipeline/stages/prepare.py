"""Stage prepare: validate every image, quarantine what can't be used, split by content hash,
and write the manifest plus all images decoded once at the working size."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap

from pipeline import paths
from pipeline.atomic import atomic_path, write_json
from pipeline.data.datasets import SPLITS, Accepted, check_class_sizes, scan_source, split_of, validate_files
from pipeline.params import DataParams, Params
from pipeline.progress import bar, say
from pipeline.tracking import lineage, logs, runs

GATHER_ROWS = 1024  # images copied into images.npy at a time


def data_hash(manifest: pd.DataFrame) -> str:
    """Identity of the prepared data: which contents, with which labels, in which split."""
    rows = sorted(zip(manifest["sha256"], manifest["label"], manifest["split"], strict=True))
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def build_report(result, classes, manifest, warnings) -> dict:
    reasons = Counter(q["reason"].split(" (")[0] for q in result.quarantined)
    converted = [a for a in result.accepted if a.conversions]
    return {
        "counts": {
            "accepted": len(result.accepted),
            "converted": len(converted),
            "quarantined": len(result.quarantined),
            "duplicates": len(result.duplicates),
            "ignored": len(result.ignored),
        },
        "quarantined_by_reason": dict(sorted(reasons.items())),
        "quarantined": result.quarantined,
        "converted": [{"path": a.relative, "conversions": a.conversions} for a in converted],
        "duplicates": result.duplicates,
        "ignored": result.ignored,
        "classes": classes,
        "per_split": {
            split: {c: int(((manifest.split == split) & (manifest.label == c)).sum()) for c in classes}
            for split in SPLITS
        },
        "warnings": warnings,
    }


def summary(report: dict) -> str:
    c = report["counts"]
    lines = [
        f"prepare: {c['accepted']} images accepted ({c['converted']} converted), "
        f"{c['quarantined']} quarantined, {c['duplicates']} duplicates dropped, "
        f"{c['ignored']} system files ignored"
    ]
    for reason, n in report["quarantined_by_reason"].items():
        lines.append(f"  quarantined {n:>4}  {reason}")
    for split, counts in report["per_split"].items():
        lines.append(f"  {split:<5} " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    lines += [f"  warning: {w}" for w in report["warnings"]]
    if report["quarantined"]:
        lines.append(f"  details: {paths.PREPARE_REPORT}")
    return "\n".join(lines)


def manifest_of(accepted: list[Accepted], classes: list[str], d: DataParams) -> pd.DataFrame:
    """One row per accepted image, in images.npy's order; the split follows from the content hash."""
    manifest = pd.DataFrame(
        {
            "path": [a.relative for a in accepted],
            "sha256": [a.sha256 for a in accepted],
            "label": [a.label for a in accepted],
            "label_index": [classes.index(a.label) for a in accepted],
            "split": [split_of(a.sha256, d.val_fraction, d.test_fraction) for a in accepted],
            "width": [a.width for a in accepted],
            "height": [a.height for a in accepted],
        }
    )
    manifest["index"] = np.arange(len(manifest))
    return manifest


def write_images(decoded: np.memmap, positions: list[int], scratch: Path, target: Path) -> None:
    """images.npy: the rows of `decoded` (memory-mapped from `scratch`) at the accepted images'
    positions, in the manifest's order. When that is every row in order — nothing rejected, the
    scan already in path order — the scratch file is renamed, not copied."""
    rows = np.asarray(positions, dtype=np.int64)
    if np.array_equal(rows, np.arange(len(decoded))):
        decoded.flush()
        os.replace(scratch, target)
        return
    images = open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(rows), *decoded.shape[1:]))
    for start in range(0, len(rows), GATHER_ROWS):
        images[start:start + GATHER_ROWS] = decoded[rows[start:start + GATHER_ROWS]]
    images.flush()
    scratch.unlink()  # its disk space returns when the last view of it goes


def run(params: Params) -> dict:
    d = params.data
    root = Path(d.source)
    classes, files, ignored = scan_source(root)
    with atomic_path(paths.PREPARED_DIR) as out:
        out.mkdir()
        # decoded in the files' order into a scratch memmap (a large folder never sits in memory
        # whole), then gathered into images.npy in the manifest's order
        scratch = out / "decoded.scratch.npy"
        shape = (d.image_size, d.image_size, 3)
        decoded = open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(len(files), *shape))
        with bar(len(files), "prepare") as progress:  # rows of a plain view of it are cheap views
            result = validate_files(root, files, d.image_size, d.max_image_pixels, progress,
                                    decoded_into=decoded.view(np.ndarray))
        result.ignored = ignored
        manifest = manifest_of(result.accepted, classes, d)
        warnings = check_class_sizes(classes, list(manifest.label), list(manifest.split), d.min_images_per_class)
        report = build_report(result, classes, manifest, warnings)
        report["data_hash"] = data_hash(manifest)

        write_images(decoded, [a.position for a in result.accepted], scratch, out / paths.IMAGES.name)
        manifest.to_csv(out / paths.MANIFEST.name, index=False)
        write_json(out / paths.CLASSES.name, {"classes": classes, "data_hash": report["data_hash"]})
        write_json(out / paths.PREPARE_REPORT.name, report)
    return report


def main(params: Params) -> None:
    with runs.stage_run("prepare", params.mlflow.experiment, logs.flatten("data", vars(params.data)),
                        defer=True) as mlrun:  # MLflow's import waits until there is something to log
        report = run(params)
        counts = {f"prepare_{k}": v for k, v in report["counts"].items()}
        logs.log_metrics(counts)
        write_json(paths.stage_metrics("prepare"), {**report["counts"],
                                                     "quarantined_by_reason": report["quarantined_by_reason"]})
        lineage.record_run("prepare", mlrun.info.run_id)
        logs.set_tags({"data_hash": report["data_hash"]})
        logs.log_artifact(str(paths.PREPARE_REPORT))
    say(summary(report))
