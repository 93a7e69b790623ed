"""Stage two (a): fixed splits, per-tap scaling and PCA fitted on train rows, written as reduced/."""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import joblib
import numpy as np
from matplotlib.figure import Figure

from pipeline import shards
from pipeline.config import ReduceConfig
# CovariancePCA is imported too because transform.joblib files written before estimators.py existed
# name both classes under pipeline.reduce; unpickling them looks them up here.
from pipeline.estimators import CovariancePCA, TapTransform  # noqa: F401
from pipeline.errors import PipelineError
from pipeline.files import read_json, write_json
from pipeline.lineage import MANIFEST_NAME, REDUCED_FORMAT, REPORT_NAME, TRANSFORM_NAME, Link, link, read_record, sha256_file

REDUCED_NAME = "reduced.h5"
PLOT_NAME = "explained_variance.png"
OUTPUT_NAMES = (REDUCED_NAME, TRANSFORM_NAME, PLOT_NAME, REPORT_NAME)
SPLITS = ("train", "val", "test")
# auto keeps the train rows in memory up to this share of RAM: a full SVD holds about three copies.
IN_MEMORY_SHARE = 0.25
_STR = h5py.string_dtype("utf-8")


def _id_hash(seed, row_id):
    """A stable 64-bit integer from the split seed and an id."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "big")


def assign_splits(ids, labels, given, val_fraction, test_fraction, seed):
    """train/val/test for every row: the source's split where it gave one, else a stable stratified hash.

    Within each class, rows without a given split are ordered by sha256(f"{seed}:{id}"); the first
    round(n * test_fraction) go to test, the next round(n * val_fraction) to val, the rest to train.
    Unlabeled rows (label -1) are placed by their own hash alone.
    """
    splits = np.array(given, dtype=object)
    unknown = sorted(set(splits.tolist()) - set(SPLITS) - {""})
    if unknown:
        raise PipelineError(f"the features hold split name(s) {unknown}; only {', '.join(SPLITS)} or none are allowed")
    labels = np.asarray(labels)
    todo = splits == ""
    for label in np.unique(labels[todo]):
        rows = np.flatnonzero(todo & (labels == label))
        hashes = np.array([_id_hash(seed, ids[r]) for r in rows], dtype=np.uint64)
        if label < 0:
            unit = hashes / 2.0**64
            splits[rows] = np.where(unit < test_fraction, "test", np.where(unit < test_fraction + val_fraction, "val", "train"))
            continue
        ordered = rows[np.argsort(hashes, kind="stable")]
        n_test = int(len(rows) * test_fraction + 0.5)
        n_val = int(len(rows) * val_fraction + 0.5)
        splits[ordered[:n_test]] = "test"
        splits[ordered[n_test:n_test + n_val]] = "val"
        splits[ordered[n_test + n_val:]] = "train"
    return splits


def split_sha256(ids, labels, splits):
    """Fingerprint of who is in which split, so runs can refuse to compare different splits."""
    h = hashlib.sha256()
    for row_id, label, split in zip(ids, labels, splits):
        h.update(f"{row_id}\t{label}\t{split}\n".encode())
    return h.hexdigest()


def physical_memory():
    """Bytes of RAM, or 8 GiB where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 * 2**30


def choose_solver(config, n_train, dim, memory_bytes):
    """The PCA solver: the requested one, or for auto one that suits the size of the train matrix."""
    share = isinstance(config.components, float)
    solver = config.solver
    if solver == "auto":
        smaller = min(n_train, dim)
        if n_train * dim * 4 > IN_MEMORY_SHARE * memory_bytes:
            solver = "incremental"
        elif not share and smaller > 500 and config.components < 0.8 * smaller:
            solver = "randomized"
        else:
            solver = "full"
    if share and solver != "full":
        why = f"the {n_train} x {dim} train matrix is too big for memory here" if config.solver == "auto" else f"--solver {solver} was asked for"
        raise PipelineError(
            f"--components {config.components} (a variance share) needs the full solver, but {why}; "
            "give a number of components instead"
        )
    return solver


def check_components(components, n_train, dim):
    """Fail with the maximum when an integer `components` is more than the data allows."""
    limits = {"train rows": n_train, "features": dim}
    most = min(limits.values())
    if isinstance(components, int) and components > most:
        parts = ", ".join(f"{value} {name}" for name, value in limits.items())
        raise PipelineError(f"--components {components} is more than the maximum of {most} here (the least of {parts})")


@dataclass(frozen=True)
class ReduceResult:
    out: Path
    report: dict  # the contents of reduce.json
    up_to_date: bool  # the out dir already held this reduction, so nothing was done


def reduce_features(features_dir, out_dir, config=ReduceConfig(), overwrite=False):
    """Split, scale and PCA-reduce a features dir into `out_dir`; an identical finished one is a cache hit.

    Everything is validated before any output is written, and the outputs appear together (see
    _staged_dir), so an error or a crash never leaves a half-written reduced dir.
    """
    started = time.perf_counter()
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    manifest = shards.read_manifest(features_dir)
    features = link(features_dir, MANIFEST_NAME, out_dir)
    config = resolve_taps(config, manifest)
    check_shards(features_dir, manifest)
    if _is_up_to_date(out_dir, features.sha256, config, overwrite):
        return ReduceResult(out_dir, read_json(out_dir / REPORT_NAME), True)

    ids, labels, given = read_rows(features_dir, manifest)
    splits = assign_splits(ids, labels, given, config.val_fraction, config.test_fraction, config.split_seed)
    is_train = splits == "train"
    n_train = int(is_train.sum())
    if n_train < 2:
        raise PipelineError(f"only {n_train} of {len(ids)} rows are in train; PCA needs at least 2")
    dims = {t["key"]: t["dim"] for t in manifest["taps"]}
    tap_dims = tuple(dims[t] for t in config.taps)
    dim = sum(tap_dims)
    solver = choose_solver(config, n_train, dim, physical_memory())
    check_components(config.components, n_train, dim)

    transform = TapTransform(tap_dims, config.scaling, config.components, config.whiten, solver)

    def train_chunks():
        return masked_chunks(features_dir, manifest, config.taps, is_train, config.batch_rows)

    if solver == "incremental":
        transform.fit_batches(train_chunks)
    else:
        transform.fit(_stack(train_chunks(), n_train, dim))

    with _staged_dir(out_dir) as staging:
        _write_reduced(staging / REDUCED_NAME, features_dir, manifest, config, transform, ids, labels, splits)
        joblib.dump(transform, staging / TRANSFORM_NAME)
        ratios = transform.pca_.explained_variance_ratio_.astype(float)
        _plot_explained_variance(ratios, staging / PLOT_NAME)
        report = {
            "format": REDUCED_FORMAT,
            "inputs": features.to_json("features"),
            "config": config.to_dict(),
            "config_sha256": config.sha256(),
            "classes": manifest["classes"],
            "taps": [
                {"key": key, "dim": d, "input_share": float(shares[0]), "kept_share": float(shares[1])}
                for key, d, shares in zip(config.taps, tap_dims, transform.tap_shares())
            ],
            "features": dim,
            "solver": {"requested": config.solver, "chosen": solver},
            "components": int(transform.pca_.n_components_),
            "explained_variance_ratio": ratios.tolist(),
            "kept_variance": float(ratios.sum()),
            "rows": len(ids),
            "splits": {
                "source": split_source(given),
                "rows": {name: int((splits == name).sum()) for name in SPLITS},
                "unlabeled": int((np.asarray(labels) < 0).sum()),
                "sha256": split_sha256(ids, labels, splits),
            },
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json(staging / REPORT_NAME, report)
    return ReduceResult(out_dir, report, False)


def resolve_taps(config, manifest):
    """The config with its taps checked against the manifest and put in manifest order (empty = all)."""
    available = [t["key"] for t in manifest["taps"]]
    unknown = [t for t in config.taps if t not in available]
    if unknown:
        raise PipelineError(f"tap {unknown[0]} is not in the features manifest; it has {', '.join(available)}")
    chosen = [t for t in available if t in config.taps] if config.taps else available
    return dataclasses.replace(config, taps=tuple(chosen))


def check_shards(features_dir, manifest):
    """Every listed shard exists and was written by the extraction the manifest describes."""
    for entry in manifest["shards"]:
        path = features_dir / entry["file"]
        attrs = shards.read_shard_attrs(path)
        if attrs is None:
            raise PipelineError(f"{path} is listed in the manifest but is missing or not a features shard; rerun `pipeline extract`")
        if attrs["config_sha256"] != manifest["config_sha256"]:
            raise PipelineError(
                f"{path} was written by another extraction (config {attrs['config_sha256'][:12]}) than its "
                f"manifest describes ({manifest['config_sha256'][:12]}); the directory mixes two manifests, "
                "so extract again into a fresh --out"
            )


def _is_up_to_date(out_dir, manifest_sha256, config, overwrite):
    """True when `out_dir` already holds this reduction; raise when it holds something we may not replace."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise PipelineError(f"--out {out_dir} is a file; give a directory")
    report_path = out_dir / REPORT_NAME
    if not report_path.is_file():
        if any(out_dir.iterdir()):
            raise PipelineError(f"--out {out_dir} is neither empty nor a reduced directory (no {REPORT_NAME}); give a new or empty directory")
        return False
    try:
        previous = read_json(report_path)
        changes = _changes(previous, manifest_sha256, config)
    except (OSError, ValueError, KeyError, TypeError):
        changes = [f"its {REPORT_NAME} is unreadable"]
    if not changes:
        return all((out_dir / name).is_file() for name in OUTPUT_NAMES)
    if not overwrite:
        raise PipelineError(
            f"{out_dir} already holds a different reduction ({'; '.join(changes)}); give another --out or add --overwrite"
        )
    return False


def _changes(previous, manifest_sha256, config):
    """Human-readable differences between a previous reduce.json and this run."""
    changes = []
    made_from = Link.from_json(previous["inputs"], "features").sha256
    if made_from != manifest_sha256:
        changes.append(f"made from another features manifest ({made_from[:12]}, now {manifest_sha256[:12]})")
    for key, value in config.to_dict().items():
        if previous["config"].get(key) != value:
            changes.append(f"{key} {previous['config'].get(key)!r}, now {value!r}")
    return changes


def read_rows(features_dir, manifest):
    """ids, labels and given splits of all rows in order, without reading any features."""
    ids, labels, given = [], [], []
    for entry in manifest["shards"]:
        part = shards.read_shard(features_dir / entry["file"], taps=[])
        ids += part.ids
        labels.append(np.asarray(part.labels, dtype=np.int32))
        given += part.splits
    return ids, np.concatenate(labels) if labels else np.zeros(0, np.int32), given


def split_source(given):
    """Where the splits came from: "source" (every row gave one), "hash" (none did) or "source+hash"."""
    provided = sum(1 for s in given if s)
    return "source" if provided == len(given) else "hash" if provided == 0 else "source+hash"


def masked_chunks(features_dir, manifest, taps, mask, chunk_rows):
    """The rows where `mask` is true, read `chunk_rows` rows at a time, in order (float32, `taps` concatenated)."""
    start = 0
    for _, _, _, X in shards.iter_feature_chunks(features_dir, manifest, list(taps), chunk_rows):
        keep = mask[start:start + len(X)]
        start += len(X)
        if keep.any():
            yield X[keep]


def _stack(chunks, rows, dim):
    """Copy chunks into one preallocated (rows, dim) float32 matrix."""
    X = np.empty((rows, dim), dtype=np.float32)
    at = 0
    for chunk in chunks:
        X[at:at + len(chunk)] = chunk
        at += len(chunk)
    return X


def _write_reduced(path, features_dir, manifest, config, transform, ids, labels, splits):
    """reduced.h5: ids, labels, splits and X, transformed chunk by chunk."""
    with h5py.File(path, "w") as f:
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=_STR)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
        f.create_dataset("splits", data=np.asarray(splits, dtype=object), dtype=_STR)
        X = f.create_dataset("X", shape=(len(ids), transform.pca_.n_components_), dtype=np.float32)
        start = 0
        for _, _, _, chunk in shards.iter_feature_chunks(features_dir, manifest, list(config.taps), config.batch_rows):
            X[start:start + len(chunk)] = transform.transform(chunk)
            start += len(chunk)
        f.attrs["format"] = REDUCED_FORMAT
        f.attrs["config_sha256"] = config.sha256()


def _plot_explained_variance(ratios, path):
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    cumulative = np.cumsum(ratios)
    ax.plot(np.arange(1, len(ratios) + 1), cumulative, marker=".")
    ax.set(
        xlabel="components", ylabel="cumulative share of scaled variance", ylim=(0, 1.02),
        title=f"{len(ratios)} components keep {cumulative[-1]:.1%} of the variance",
    )
    ax.grid(alpha=0.3)
    figure.savefig(path, dpi=100, bbox_inches="tight")


@contextlib.contextmanager
def _staged_dir(out_dir):
    """Yield an empty sibling directory that replaces `out_dir` only when the block succeeds.

    The old dir is renamed aside before the new one is renamed in, so a crash leaves the old
    reduction, the new one, or no dir at all (which a rerun recomputes), never a mix.
    """
    out_dir = out_dir.resolve()
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)


@dataclass(frozen=True)
class Reduced:
    """A reduced dir loaded into memory for training."""

    path: Path
    report: dict
    report_sha256: str  # of reduce.json's bytes
    ids: list
    labels: np.ndarray
    splits: np.ndarray
    X: np.ndarray

    @property
    def classes(self):
        return self.report["classes"]


def load_reduced(reduced_dir):
    """Read reduced.h5 and reduce.json, failing with one sentence if this is not a finished reduced dir."""
    reduced_dir = Path(reduced_dir)
    report_path = reduced_dir / REPORT_NAME
    if not report_path.is_file() or not (reduced_dir / REDUCED_NAME).is_file():
        raise PipelineError(f"{reduced_dir} is not a reduced directory (it needs {REPORT_NAME} and {REDUCED_NAME}); run `pipeline reduce` first")
    report = read_record(report_path, REDUCED_FORMAT, "reduce again with --overwrite")
    with h5py.File(reduced_dir / REDUCED_NAME, "r") as f:
        return Reduced(
            path=reduced_dir,
            report=report,
            report_sha256=sha256_file(report_path),
            ids=f["ids"].asstr()[:].tolist(),
            labels=f["labels"][:],
            splits=f["splits"].asstr()[:],
            X=f["X"][:],
        )
