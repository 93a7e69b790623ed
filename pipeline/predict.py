"""Predictions on new images with a head run.

`predict` follows the run's lineage (see lineage.py) back to the extraction, reruns that
extraction on the new images through stage one itself (same tf.data path, same error handling,
into a scratch features dir beside --out), then applies the fitted transform and the head.
One predict at a time writes a given --out (a lock file beside it); under that lock, scratch
dirs and half-written CSVs of that name are a killed predict's, so they are removed.
"""

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.features import open_features
from pipeline.files import atomic_path, output_guard, remove, storage_errors, temp_sibling
from pipeline.lineage import load_lineage
from pipeline.sources import Listing

if TYPE_CHECKING:
    from pipeline.extract import ProgressSink

CHUNK_ROWS = 4096  # feature rows transformed and classified at a time


@dataclass(frozen=True)
class PredictResult:
    out: Path
    predicted: int  # images with a prediction
    errors: list  # [{id, path, reason}] of images that could not be decoded
    correct: int  # labelled images whose label is a class of the run and was predicted
    labelled: int  # labelled images whose label is a class of the run
    unknown_labels: dict  # label name -> images, for labels of SOURCE the run does not know
    warnings: list

    @property
    def accuracy(self):
        return self.correct / self.labelled if self.labelled else None


def csv_columns(top_k):
    tops = [column for rank in range(1, top_k + 1) for column in (f"top{rank}_class", f"top{rank}_prob")]
    return ["id", "path", "predicted", "probability", *tops, "error"]


def predict(
    run_dir: Path | str,
    listing: Listing,
    out: Path | str,
    *,
    batch_size: int = 64,
    top_k: int = 3,
    precision: str = "float32",
    weights: str | None = None,
    progress: "ProgressSink | None" = None,
) -> PredictResult:
    """Classify every image of a `sources.Listing` with a head run; one CSV row per image, sorted by id.

    `top_k` is capped at the number of classes. Undecodable images get a row with the reason in
    `error` and empty predictions. Returns a PredictResult.
    """
    from pipeline.extract import extract
    from pipeline.head import predict_proba

    lineage = load_lineage(run_dir)
    # Stored as float32 whatever the training features were, so that predict equals export.
    config = lineage.extract_config(
        weights=weights, precision=precision, xla=None, batch_size=batch_size, storage_dtype="float32", on_error="skip"
    )
    transform, head = lineage.load_transform(), lineage.load_head()
    out = Path(out).absolute()
    probabilities = {}
    before = f"the previous {out.name} is unchanged" if out.exists() else f"no {out.name} was written"
    with output_guard(out, f"predictions file {out}"):
        with storage_errors(f"{out} (or the scratch features beside it)", f"{before}; free space (or fix the rights) and rerun"):
            scratch = temp_sibling(out)  # beside --out, where there is room for what it writes, not in a small /tmp
            try:
                result = extract(
                    config,
                    listing,
                    scratch / "features",
                    progress=progress,
                    expected_weights=lineage.expected_weights(config.backbones),
                )
                for batch in open_features(result.out_dir).batches(lineage.taps, CHUNK_ROWS):
                    probabilities.update(zip(batch.ids, predict_proba(head, transform.transform(batch.matrix()))))
            finally:
                remove(scratch)
            errors = {error["id"]: error for error in result.manifest["errors"]}
            _write_csv(out, listing.records, probabilities, errors, lineage.classes, min(top_k, len(lineage.classes)))
    correct, labelled, unknown = _score(listing, probabilities, lineage.classes)
    return PredictResult(out, len(probabilities), list(errors.values()), correct, labelled, unknown, result.warnings)


def _score(listing, probabilities, classes):
    """(correct, labelled, {unknown label: images}) over predicted images whose source gave a label."""
    index = {name: i for i, name in enumerate(classes)}
    correct, labelled, unknown = 0, 0, Counter()
    for record in listing.records:
        if record.label < 0 or record.id not in probabilities:
            continue
        name = listing.classes[record.label]
        if name not in index:
            unknown[name] += 1
            continue
        labelled += 1
        correct += int(np.argmax(probabilities[record.id]) == index[name])
    return correct, labelled, dict(unknown)


def _write_csv(path, records, probabilities, errors, classes, top_k):
    """Rows in the listing's (sorted-id) order, written atomically."""
    with atomic_path(path) as tmp:
        # A path whose name is not UTF-8 is written as its own bytes (the id column escapes them).
        with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(csv_columns(top_k))
            for record in records:
                if record.id not in probabilities:
                    writer.writerow([record.id, record.path, "", "", *[""] * (2 * top_k), errors[record.id]["reason"]])
                    continue
                p = probabilities[record.id]
                ranked = np.argsort(-p, kind="stable")[:top_k]  # ties go to the lower class index, as argmax
                tops = [cell for c in ranked for cell in (classes[c], f"{p[c]:.6f}")]
                writer.writerow([record.id, record.path, classes[ranked[0]], f"{p[ranked[0]]:.6f}", *tops, ""])
