"""Lineage: how each stage's output names what it was made from, and following that back.

A run's config.json links to its reduced dir, whose reduce.json links to the features dir,
whose manifest.json holds the extraction config and the weights' fingerprints. A link is a
relative path (from the reduced dir, or from the runs dir for a run; tried first, so a tree
moved as a whole still works), the absolute path, and the sha256 of the file it points to, so
that a file rewritten since is refused. This module owns the names and format tags of the files the chain passes
through; it imports no stage module, so that every stage can import it.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.config import SOURCE_KEYS, ExtractConfig, WeightSource, sha256_json
from pipeline.errors import PipelineError
from pipeline.files import read_json
from pipeline.splits import FIRST_RULE, rule_of

FEATURES_FORMAT = "pipeline-features/1"
REDUCED_FORMAT = "pipeline-reduced/1"
MANIFEST_NAME = "manifest.json"  # features/: the extraction's record
REPORT_NAME = "reduce.json"  # reduced/: the reduction's record, linking to the features
TRANSFORM_NAME = "transform.joblib"  # reduced/: the fitted scaling + PCA
RUN_CONFIG_NAME = "config.json"  # runs/<id>/: the run's record, linking to the reduced dir
HEAD_NAME = "model.keras"  # runs/<id>/: the trained head


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_format(path: Path | str, record: Any, expected: str, remedy: str) -> None:
    """Refuse a record (a parsed JSON file or HDF5 attrs) whose `format` is not `expected`."""
    found = record.get("format") if isinstance(record, Mapping) else None
    if found != expected:
        raise PipelineError(f"{path} has format {found!r}, not {expected!r}; {remedy}")


def read_record(path: Path, expected_format: str, remedy: str) -> dict:
    """A JSON record of the chain, parsed and format-checked; `remedy` ends the sentence when it is not."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PipelineError(f"{path} is not readable JSON ({e}); {remedy}") from None
    return parse_record(path, data, expected_format, remedy)


def parse_record(path: Path, data: bytes, expected_format: str, remedy: str) -> dict:
    """read_record on bytes already read from `path` (say, the very bytes whose sha256 was checked)."""
    try:
        record = json.loads(data)
    except ValueError as e:  # UnicodeDecodeError too
        raise PipelineError(f"{path} is not readable JSON ({e}); {remedy}") from None
    check_format(path, record, expected_format, remedy)
    return record


def read_hashed(path: Path) -> tuple[bytes, str]:
    """(bytes, hex sha256 of those bytes) of a small record file: one read, so the hash is of what is parsed."""
    data = Path(path).read_bytes()
    return data, hashlib.sha256(data).hexdigest()


class Link(NamedTuple):
    """Where a directory was, seen from the file that links to it, and the sha256 of its key file."""

    relative: str  # POSIX path from the linking file's directory
    absolute: str
    sha256: str  # of the key file inside the directory

    def to_json(self, kind: str) -> dict:
        """The link as `kind`'s record stores it (see _JSON_KEYS)."""
        return dict(zip(_JSON_KEYS[kind], self))

    @classmethod
    def from_json(cls, record: dict, kind: str) -> "Link":
        return cls(*(record[key] for key in _JSON_KEYS[kind]))


# The keys each record stores a link under: reduce.json's `inputs` links the features, a run's
# config.json `reduced` links the reduced dir.
_JSON_KEYS = {
    "features": ("features", "features_absolute", "manifest_sha256"),
    "reduced": ("path", "absolute", "reduce_json_sha256"),
}


def link(directory: Path, key_file: str, base: Path) -> Link:
    """The link from `base` to `directory`, fingerprinted by `directory/key_file`."""
    absolute = Path(directory).absolute()
    relative = Path(os.path.relpath(absolute, Path(base).absolute())).as_posix()
    return Link(relative, str(absolute), sha256_file(absolute / key_file))


def follow_link(pointer: Path, recorded: Link, base: Path, key_file: str, what: str, changed: str) -> Path:
    """The directory that `pointer` (a JSON file) links to, checked to hold the very `key_file` it linked.

    The path relative to `base` (as `link` made it) is tried first, then the absolute one. `what`
    names the directory when neither holds `key_file`; `changed` ends the sentence when it differs.
    """
    return follow_link_bytes(pointer, recorded, base, key_file, what, changed)[0]


def follow_link_bytes(
    pointer: Path,
    recorded: Link,
    base: Path,
    key_file: str,
    what: str,
    changed: str,
    still_serves=None,
) -> tuple[Path, bytes]:
    """follow_link, and the bytes of `key_file` whose sha256 was checked: parse these, not a second read that may differ.

    `still_serves(bytes)`, when given, may accept a `key_file` whose sha256 changed (say, a manifest updated by extract).
    """
    candidates = [Path(os.path.normpath(base / recorded.relative)), Path(recorded.absolute)]
    for directory in candidates:
        if (directory / key_file).is_file():
            break
    else:
        raise PipelineError(
            f"cannot find the {what} that {pointer} points to: no {key_file} in {candidates[0]} nor in {candidates[1]}; "
            "put the directory back where one of these says"
        )
    try:
        data, actual = read_hashed(directory / key_file)
    except OSError as e:
        raise PipelineError(f"cannot read {directory / key_file} ({e.strerror}), which {pointer} points to; {changed}") from None
    if actual != recorded.sha256 and not (still_serves is not None and still_serves(data)):
        raise PipelineError(
            f"{directory / key_file} has sha256 {actual[:12]} but {pointer} was made from {recorded.sha256[:12]}; {changed}"
        )
    return directory, data


def extraction_sha256(manifest: dict) -> str | None:
    """sha256 of what predict and export take from a features manifest: the extraction settings and the weights'
    fingerprints, not which images it holds (an extract update changes those). None when the manifest lacks them.
    """
    try:
        settings = {key: value for key, value in manifest["config"].items() if key not in SOURCE_KEYS}
        return sha256_json({"config": settings, "weights": manifest["weights"]})
    except (KeyError, TypeError, AttributeError):
        return None


def _same_extraction(recorded: str | None):
    """still_serves for a features manifest: it was updated since, but its extraction is the one `recorded`."""

    def serves(data: bytes) -> bool:
        try:
            manifest = json.loads(data)
        except ValueError:
            return False
        return recorded is not None and isinstance(manifest, dict) and extraction_sha256(manifest) == recorded

    return serves


def check_fingerprints(loaded, expected):
    """Refuse weights whose fingerprint differs from the recorded one, naming backbone and both prefixes."""
    for name, weights in loaded.items():
        if weights["sha256"] != expected[name]["sha256"]:
            loaded_from, expected_from = (WeightSource.from_record(w["source"]) for w in (weights, expected[name]))
            raise PipelineError(
                f"{name} weights from {loaded_from} have sha256 {weights['sha256'][:12]}, but the features "
                f"were extracted with sha256 {expected[name]['sha256'][:12]} (from {expected_from}); "
                "load those weights instead"
            )


@dataclass(frozen=True)
class Lineage:
    """A head run and what it was made from, each file checked to be the one it was made from."""

    run_dir: Path
    reduced_dir: Path
    report: dict  # reduce.json
    features_dir: Path
    manifest: dict  # the features' manifest.json
    run: dict = dataclasses.field(default_factory=dict)  # the run's config.json

    @property
    def taps(self) -> tuple[str, ...]:
        """The taps the transform reads, in its column order."""
        return tuple(tap["key"] for tap in self.report["taps"])

    @property
    def classes(self) -> list[str]:
        return list(self.report["classes"])

    def extract_config(self, weights: str | None = None, **changes) -> ExtractConfig:
        """The recorded extraction as an ExtractConfig, cut to the transform's taps, with `changes` applied.

        `weights` replaces where the backbone weights come from (say, a file that moved); by
        default the recorded sources load again: imagenet, random, or the recorded absolute path.
        """
        manifest_path = self.features_dir / MANIFEST_NAME
        config = ExtractConfig.from_record(self.manifest["config"], str(manifest_path), **{"taps": self.taps, **changes})
        if weights is None:
            sources = {name: WeightSource.from_record(self.manifest["weights"][name]["source"]) for name in config.backbones}
            for name, source in sources.items():
                if source.kind == "file" and not Path(source.path).is_file():
                    raise PipelineError(
                        f"{name} weights file {source.path} (recorded in {manifest_path}) does not exist; "
                        f"pass --weights {name}=PATH to where it is now"
                    )
            weights = ",".join(f"{name}={source.spec()}" for name, source in sources.items())
        return dataclasses.replace(config, weights=weights)

    def expected_weights(self, backbones: tuple[str, ...]) -> dict:
        """The recorded {source, sha256} of each of `backbones`."""
        return {name: self.manifest["weights"][name] for name in backbones}

    def load_transform(self):
        """The fitted scaling + PCA, checked against the sha256 reduce.json recorded (when it recorded one)."""
        import joblib

        path = self.reduced_dir / TRANSFORM_NAME
        remedy = "rerun the `pipeline reduce` command that made it (the same settings rebuild it)"
        check_sha256(path, self.report.get("outputs", {}).get(TRANSFORM_NAME), REPORT_NAME, remedy)
        try:
            return joblib.load(path)
        except Exception as e:  # unpickling a damaged file fails in many ways (EOFError, KeyError, UnpicklingError, ...)
            raise PipelineError(f"{path} cannot be loaded ({type(e).__name__}: {e}); it is damaged, so {remedy}") from None

    def load_head(self):
        """The trained head, checked against the sha256 the run recorded (when it recorded one)."""
        import keras

        path = self.run_dir / HEAD_NAME
        remedy = "rerun the `pipeline train` command that made it, which trains a damaged run again"
        check_sha256(path, self.run.get("model_sha256"), RUN_CONFIG_NAME, remedy)
        try:
            return keras.saving.load_model(path, compile=False)
        except Exception as e:  # Keras reports a damaged zip as anything from "file not found" to a ValueError
            raise PipelineError(f"{path} cannot be loaded ({type(e).__name__}); it is damaged, so {remedy}") from None


def check_sha256(path: Path, recorded: str | None, record_name: str, remedy: str) -> None:
    """Refuse a file whose sha256 differs from the one `record_name` recorded (None: an older record that kept none)."""
    if recorded is not None and sha256_file(path) != recorded:
        raise PipelineError(f"{path} is damaged: its sha256 is not the one {record_name} recorded; {remedy}")


def recorded_link(path: Path, record: dict, key: str, kind: str, remedy: str) -> Link:
    """The Link that `record` (read from `path`) stores under `key`, or one sentence when it lacks a complete one."""
    try:
        return Link.from_json(record[key], kind)
    except (KeyError, TypeError, IndexError) as e:
        missing = f"lacks {e}" if isinstance(e, KeyError) else "is not a mapping"
        raise PipelineError(f"{path} has no {key!r} record of what it was made from (it {missing}); {remedy}") from None


def reduced_notes(reduced_dir: Path, report: dict) -> list[str]:
    """Sentences a trainer should hear about a reduced dir: an old split rule, features updated since it was made.

    A reduced dir is self-contained, so these are warnings: features moved away or unreadable say nothing.
    """
    notes = []
    if rule_of(report.get("splits", {})) == FIRST_RULE:
        notes.append(
            f"{reduced_dir} was split by the first rule ({FIRST_RULE}: ids ranked within each class), under which adding images "
            "moved old ones between val and test; reduce again (with --overwrite, or into another --out) for the stable rule"
        )
    changed = _features_changed(reduced_dir, report)
    if changed:
        notes.append(changed)
    return notes


def _features_changed(reduced_dir: Path, report: dict) -> str | None:
    """A sentence when the manifest reduce.json links to has changed since (an extract update), else None."""
    try:
        recorded = Link.from_json(report["inputs"], "features")
    except (KeyError, TypeError, IndexError):
        return None
    for directory in (Path(os.path.normpath(reduced_dir / recorded.relative)), Path(recorded.absolute)):
        try:
            data, actual = read_hashed(directory / MANIFEST_NAME)
            break
        except OSError:
            continue
    else:
        return None
    if actual == recorded.sha256:
        return None
    try:
        generation = json.loads(data).get("generation", 0)
    except (ValueError, AttributeError):
        generation = None
    then = report["inputs"].get("generation", 0)
    updated = (
        f" (extract updated it: generation {then}, now {generation})"
        if isinstance(generation, int) and generation != then
        else ""
    )
    return (
        f"the features in {directory} changed since {reduced_dir} was reduced from them{updated}; this trains on the rows "
        "as they were then: reduce again (into another --out, or with --overwrite) to train on the current ones"
    )


def load_lineage(run_dir: Path | str) -> Lineage:
    """Follow a head run back to its reduced and features dirs, refusing anything missing or changed since."""
    run_dir = Path(run_dir)
    config_path = run_dir / RUN_CONFIG_NAME
    if not config_path.is_file():
        raise PipelineError(f"{run_dir} is not a run directory: it has no {RUN_CONFIG_NAME}; give RUNS/<run id>")
    try:
        run = read_json(config_path)
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"{config_path} is not readable JSON ({e}); rerun the `pipeline train` command that made the run, "
            "which trains a damaged run again"
        ) from None
    if not isinstance(run, dict):
        raise PipelineError(
            f"{config_path} is not a run record (a JSON object); rerun the `pipeline train` command that made the run"
        )
    if run.get("kind") != "head":
        raise PipelineError(f"run {run_dir.name} is a {run.get('kind')} run without a Keras head; choose a head run")
    if not (run_dir / HEAD_NAME).is_file():
        raise PipelineError(f"run {run_dir} has no {HEAD_NAME}; train it again")

    retrain = "rerun the `pipeline train` command that made the run, which trains a damaged run again"
    reduced_dir, report_bytes = follow_link_bytes(
        config_path,
        recorded_link(config_path, run, "reduced", "reduced", retrain),
        run_dir.parent,
        REPORT_NAME,
        "reduced directory",
        f"it changed since run {run_dir.name} was trained on it (reduced again?); train the head again on this reduced directory",
    )
    report_path = reduced_dir / REPORT_NAME
    report = parse_record(report_path, report_bytes, REDUCED_FORMAT, "reduce again")  # the bytes whose sha256 the run recorded
    if not (reduced_dir / TRANSFORM_NAME).is_file():
        raise PipelineError(f"{reduced_dir} has no {TRANSFORM_NAME}, so it is not a complete reduced directory; reduce again")
    rereduce = "rerun the `pipeline reduce` command that made it with --overwrite, then train again"
    # An extract update since reduce changes the manifest but not the extraction the transform and head expect.
    recorded_extraction = report["inputs"].get("extraction_sha256") if isinstance(report.get("inputs"), dict) else None
    features_dir, manifest_bytes = follow_link_bytes(
        report_path,
        recorded_link(report_path, report, "inputs", "features", rereduce),
        reduced_dir,
        MANIFEST_NAME,
        "features directory",
        "the features changed since reduce, so reduce and train again",
        still_serves=_same_extraction(recorded_extraction),
    )
    manifest = parse_record(features_dir / MANIFEST_NAME, manifest_bytes, FEATURES_FORMAT, "extract again")
    return Lineage(run_dir, reduced_dir, report, features_dir, manifest, run)
