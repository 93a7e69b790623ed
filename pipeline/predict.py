"""Using a trained head: the lineage run -> reduced -> features, and predictions on new images.

A run's config.json names its reduced dir, whose reduce.json names the features dir, whose
manifest.json holds the extraction config and the weights' fingerprints. `predict` reruns that
extraction on new images through stage one itself (same tf.data path, same error handling,
into a temporary features dir), then applies the fitted transform and the head.
"""

import csv
import dataclasses
import hashlib
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np

from pipeline import shards
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_path, read_json
from pipeline.reduce import FORMAT as REDUCED_FORMAT, REPORT_NAME, TRANSFORM_NAME
from pipeline.train import CONFIG_NAME

HEAD_NAME = "model.keras"  # the head a run saves (see train._head_run)
CHUNK_ROWS = 4096  # feature rows transformed and classified at a time
# Manifest config keys that describe the listed images rather than the extraction.
_SOURCE_KEYS = ("source", "source_sha256")


def _sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _locate(pointer, base, relative, absolute, needed, what):
    """The directory that `pointer` (a JSON file) names: `relative` to `base` if it holds `needed`, else `absolute`."""
    candidates = [Path(os.path.normpath(base / relative)), Path(absolute)]  # relative as os.path.relpath made it
    for directory in candidates:
        if (directory / needed).is_file():
            return directory
    raise PipelineError(
        f"cannot find the {what} that {pointer} points to: no {needed} in {candidates[0]} nor in {candidates[1]}; "
        "put the directory back where one of these says"
    )


@dataclass(frozen=True)
class Lineage:
    """A head run and what it was made from, each file checked to be the one it was made from."""

    run_dir: Path
    reduced_dir: Path
    report: dict  # reduce.json
    features_dir: Path
    manifest: dict  # the features' manifest.json

    @property
    def taps(self):
        """The taps the transform reads, in its column order."""
        return tuple(tap["key"] for tap in self.report["taps"])

    @property
    def classes(self):
        return list(self.report["classes"])

    def extract_config(self, weights=None, **changes):
        """The recorded extraction, cut to the transform's taps, with `changes` applied.

        `weights` replaces where the backbone weights come from (say, a file that moved); by
        default the recorded sources load again: imagenet, random, or the recorded absolute path.
        """
        manifest_path = self.features_dir / shards.MANIFEST_NAME
        recorded = {key: value for key, value in self.manifest["config"].items() if key not in _SOURCE_KEYS}
        # A setting added after these features were made takes its default, which by design keeps the
        # old behaviour; a setting this version does not know cannot be rebuilt.
        unknown = sorted(set(recorded) - {f.name for f in dataclasses.fields(ExtractConfig)})
        if unknown:
            raise PipelineError(
                f"{manifest_path} records extraction settings this version does not know ({', '.join(unknown)}); "
                "use the pipeline version that made the features"
            )
        config = ExtractConfig(**{**recorded, "taps": self.taps, **changes})
        return dataclasses.replace(config, weights=weights or self._recorded_weights(config.backbones, manifest_path))

    def _recorded_weights(self, backbones, manifest_path):
        parts = []
        for name in backbones:
            source = self.manifest["weights"][name]["source"]
            value = "random" if source.startswith("random(") else source
            if value not in ("imagenet", "random") and not Path(value).is_file():
                raise PipelineError(
                    f"{name} weights file {value} (recorded in {manifest_path}) does not exist; "
                    f"pass --weights {name}=PATH to where it is now"
                )
            parts.append(f"{name}={value}")
        return ",".join(parts)

    def expected_weights(self, config):
        """The recorded {source, sha256} of each backbone `config` runs."""
        return {name: self.manifest["weights"][name] for name in config.backbones}

    def load_transform(self):
        return joblib.load(self.reduced_dir / TRANSFORM_NAME)

    def load_head(self):
        import keras

        return keras.saving.load_model(self.run_dir / HEAD_NAME, compile=False)


def load_lineage(run_dir):
    """Follow a head run back to its reduced and features dirs, refusing anything missing or changed since."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise PipelineError(f"{run_dir} is not a run directory: it has no {CONFIG_NAME}; give RUNS/<run id>")
    run = read_json(config_path)
    if run.get("kind") != "head":
        raise PipelineError(f"run {run_dir.name} is a {run.get('kind')} run without a Keras head; choose a head run")
    if not (run_dir / HEAD_NAME).is_file():
        raise PipelineError(f"run {run_dir} has no {HEAD_NAME}; train it again")

    recorded = run["reduced"]
    reduced_dir = _locate(
        config_path, run_dir.parent, recorded["path"], recorded["absolute"], REPORT_NAME, "reduced directory"
    )
    report_path = reduced_dir / REPORT_NAME
    if _sha256_file(report_path) != recorded["reduce_json_sha256"]:
        raise PipelineError(
            f"{report_path} changed since run {run_dir.name} was trained on it (reduced again?); "
            "train the head again on this reduced directory"
        )
    report = read_json(report_path)
    if report.get("format") != REDUCED_FORMAT or not (reduced_dir / TRANSFORM_NAME).is_file():
        raise PipelineError(
            f"{reduced_dir} is not a complete reduced directory (format {REDUCED_FORMAT}, {TRANSFORM_NAME}); reduce again"
        )

    inputs = report["inputs"]
    features_dir = _locate(
        report_path, reduced_dir, inputs["features"], inputs["features_absolute"], shards.MANIFEST_NAME, "features directory"
    )
    manifest_path = features_dir / shards.MANIFEST_NAME
    actual = _sha256_file(manifest_path)
    if actual != inputs["manifest_sha256"]:
        raise PipelineError(
            f"the features changed since reduce: {manifest_path} has sha256 {actual[:12]}, "
            f"{report_path} was made from {inputs['manifest_sha256'][:12]}; reduce and train again"
        )
    return Lineage(run_dir, reduced_dir, report, features_dir, shards.read_manifest(features_dir))


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


def predict(run_dir, listing, out, *, batch_size=64, top_k=3, precision="float32", weights=None, progress=None):
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    probabilities = {}
    with tempfile.TemporaryDirectory(prefix=".predict-", dir=out.parent) as scratch:
        result = extract(
            config, listing, Path(scratch) / "features", progress=progress, expected_weights=lineage.expected_weights(config)
        )
        for ids, _, _, X in shards.iter_feature_chunks(result.out_dir, result.manifest, list(lineage.taps), CHUNK_ROWS):
            probabilities.update(zip(ids, predict_proba(head, transform.transform(X))))
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
        with tmp.open("w", newline="") as f:
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
