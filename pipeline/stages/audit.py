"""Stage audit: suspected label errors and near-duplicates, found on extract's cached features.

Writes data/audit/ (label_issues.csv, near_duplicates.csv, excluded.json) and metrics/audit.json.
With `audit.action: exclude`, excluded.json lists the flagged *training* images — suspected
mislabels and near-duplicates of a val/test image — which train_head and finetune leave out;
val and test stay as they are, so test scores stay comparable. The data folder is never touched.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline import paths
from pipeline.atomic import atomic_path, write_json
from pipeline.audit.duplicates import BLOCK, near_duplicate_pairs, pair_table
from pipeline.audit.label_issues import audit_features, find_issues, out_of_fold_probabilities
from pipeline.data.datasets import SPLITS
from pipeline.devices import Runtime, select_runtime
from pipeline.model import features
from pipeline.params import Params
from pipeline.progress import say
from pipeline.tracking import lineage, logs, runs

AUDITED = ("train", "val")  # label issues: the images training and selection learn from


def audit_runtime(working_bytes: int) -> Runtime:
    """fp32 on the GPU when there is one and working_bytes fit in its share of free memory;
    else the CPU."""
    runtime = select_runtime("fp32")
    return runtime if runtime.fits(working_bytes) else Runtime(torch.device("cpu"), None)


def split_images(manifest: pd.DataFrame, splits) -> pd.DataFrame:
    """Manifest rows of the splits' images, in the order extract cached them."""
    rows = np.concatenate([features.rows(s) for s in splits])
    return manifest.iloc[rows].assign(row=rows).reset_index(drop=True)


def label_issue_table(params: Params, manifest: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, dict, str]:
    """The flagged images, the counts, and the device the linear models were fitted on."""
    meta = features.read_meta()
    per_split = [audit_features(s, meta["cache_blocks"]) for s in AUDITED]
    views = max(x.shape[1] for x in per_split)
    x = np.concatenate([np.repeat(f, views // f.shape[1], axis=1) for f in per_split])  # val: 1 view
    labels = np.concatenate([features.labels(s) for s in AUDITED])
    a = params.audit
    runtime = audit_runtime(3 * x.nbytes)  # the features, their standardised copy, the held-out views
    probs = out_of_fold_probabilities(x, labels, len(classes), a.folds, a.regularization, params.seed, runtime)
    issues = find_issues(labels, probs, a.filter_by)
    images = split_images(manifest, AUDITED)
    flagged = images.iloc[issues.flagged]
    table = pd.DataFrame({
        "path": flagged.path.to_numpy(),
        "split": flagged.split.to_numpy(),
        "row": flagged.row.to_numpy(),
        "given": flagged.label.to_numpy(),
        "suggested": [classes[i] for i in issues.suggested[issues.flagged]],
        "given_probability": probs[issues.flagged, labels[issues.flagged]].round(6),
        "suggested_probability": probs[issues.flagged].max(axis=1).round(6),
        "label_quality": issues.quality[issues.flagged].round(6),
    })
    stats = {"images_audited": len(labels), "out_of_fold_accuracy": float((probs.argmax(1) == labels).mean()),
             "estimated_noise_rate": issues.estimated_noise_rate}
    return table, stats, runtime.device.type


def duplicate_table(params: Params, manifest: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The near-duplicate pairs, and the device the search ran on (its own working set decides)."""
    pooled = np.concatenate([np.load(paths.pooled_features(s), mmap_mode="r")[:, 0] for s in SPLITS])
    runtime = audit_runtime(2 * 4 * pooled.size + 4 * BLOCK * len(pooled))  # features, unit vectors, a block
    pairs = near_duplicate_pairs(pooled, params.audit.duplicate_similarity, runtime)
    return pair_table(pairs, split_images(manifest, SPLITS)), runtime.device.type


def exclusions(issues: pd.DataFrame, duplicates: pd.DataFrame) -> list[dict]:
    """The training images `exclude` leaves out, each with why."""
    out = {row.path: f"suspected label error: given {row.given}, looks like {row.suggested}"
           for row in issues[issues.split == "train"].itertuples()}
    for pair in duplicates[duplicates.cross_split].itertuples():
        ends = [(pair.path_a, pair.split_a), (pair.path_b, pair.split_b)]
        for (mine, my_split), (other, other_split) in (ends, ends[::-1]):
            if my_split == "train" and other_split != "train":  # the copy that leaks into val/test
                out.setdefault(mine, f"near-duplicate of {other_split} image {other}")
    return [{"path": p, "reason": why} for p, why in sorted(out.items())]


def counts(stats: dict, issues: pd.DataFrame, duplicates: pd.DataFrame, excluded: list[dict]) -> dict:
    cross = duplicates[duplicates.cross_split]
    pair_splits = cross.apply(lambda r: "_".join(sorted((r.split_a, r.split_b))), axis=1) if len(cross) else []
    pair_counts = pd.Series(pair_splits, dtype=object).value_counts()
    return {
        **stats,
        "label_issues": len(issues),
        "label_issues_train": int((issues.split == "train").sum()),
        "label_issues_val": int((issues.split == "val").sum()),
        "near_duplicate_pairs": len(duplicates),
        "cross_split_pairs": len(cross),
        "train_test_pairs": int(pair_counts.get("test_train", 0)),
        "train_val_pairs": int(pair_counts.get("train_val", 0)),
        "val_test_pairs": int(pair_counts.get("test_val", 0)),
        "excluded_train_images": len(excluded),
    }


def run(params: Params) -> tuple[dict, dict]:
    """The metrics, and where the out-of-fold models were fitted and the near-duplicates searched
    (tags, not metrics: they differ between machines while the audit's findings need not)."""
    manifest = pd.read_csv(paths.MANIFEST)
    classes = features.read_meta()["classes"]
    issues, stats, fit_device = label_issue_table(params, manifest, classes)
    duplicates, search_device = duplicate_table(params, manifest)
    flagged = exclusions(issues, duplicates)
    excluded = flagged if params.audit.action == "exclude" else []
    by_path = dict(zip(manifest.path, manifest.index, strict=True))
    with atomic_path(paths.AUDIT_DIR) as out:
        out.mkdir()
        issues.to_csv(out / paths.LABEL_ISSUES.name, index=False)
        duplicates.to_csv(out / paths.NEAR_DUPLICATES.name, index=False)
        write_json(out / paths.EXCLUDED.name, {
            "action": params.audit.action,
            "rows": sorted(int(by_path[e["path"]]) for e in excluded),  # manifest rows
            "images": excluded,
        })  # in `report` mode always the same empty list: auditing anew never re-runs training
    summary = counts(stats, issues, duplicates, excluded)
    summary["would_exclude_train_images"] = len(flagged)
    write_json(paths.stage_metrics("audit"), summary)
    return summary, {"device": fit_device, "duplicates_device": search_device}


def main(params: Params) -> None:
    with runs.stage_run("audit", params.mlflow.experiment, logs.flatten("audit", vars(params.audit)),
                        defer=True) as mlrun:  # logs at the end
        summary, devices = run(params)
        logs.log_metrics({f"audit_{k}": v for k, v in summary.items()})
        logs.set_tags(devices)
        logs.log_artifacts(str(paths.AUDIT_DIR), "audit")
        lineage.record_run("audit", mlrun.info.run_id)
    say(f"audit: {summary['label_issues']} suspected label errors in {summary['images_audited']} train/val images "
        f"(out-of-fold accuracy {summary['out_of_fold_accuracy']:.3f}, fitted on {devices['device']}); "
        f"{summary['near_duplicate_pairs']} near-duplicate pairs, {summary['cross_split_pairs']} across splits "
        f"(searched on {devices['duplicates_device']}); "
        f"action {params.audit.action}: {summary['excluded_train_images']} training images excluded "
        f"(see {paths.AUDIT_DIR})")
