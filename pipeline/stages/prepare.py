"""Stage prepare: validate every image, quarantine what can't be used, split by content hash,
and write the manifest plus all images decoded once at the working size."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.atomic import atomic_path, write_json
from pipeline.data.datasets import SPLITS, check_class_sizes, scan_source, split_of, validate_files
from pipeline.params import Params
from pipeline.progress import bar, say
from pipeline.tracking import lineage, logs, runs


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


def run(params: Params) -> dict:
    root = Path(params.data.source)
    classes, files, ignored = scan_source(root)
    with bar(len(files), "prepare") as progress:
        result = validate_files(
            root, files, params.data.image_size, params.data.max_image_pixels, progress
        )
    result.ignored = ignored
    d = params.data
    manifest = pd.DataFrame(
        {
            "path": [a.relative for a in result.accepted],
            "sha256": [a.sha256 for a in result.accepted],
            "label": [a.label for a in result.accepted],
            "label_index": [classes.index(a.label) for a in result.accepted],
            "split": [split_of(a.sha256, d.val_fraction, d.test_fraction) for a in result.accepted],
            "width": [a.width for a in result.accepted],
            "height": [a.height for a in result.accepted],
        }
    )
    warnings = check_class_sizes(
        classes, list(manifest.label), list(manifest.split), d.min_images_per_class
    )
    manifest["index"] = np.arange(len(manifest))
    report = build_report(result, classes, manifest, warnings)
    report["data_hash"] = data_hash(manifest)

    with atomic_path(paths.PREPARED_DIR) as out:
        out.mkdir()
        size = d.image_size
        images = np.lib.format.open_memmap(
            out / paths.IMAGES.name, mode="w+", dtype=np.uint8, shape=(len(manifest), size, size, 3)
        )
        for i, accepted in enumerate(result.accepted):
            images[i] = accepted.pixels
        images.flush()
        del images
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
