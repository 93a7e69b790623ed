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
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from pipeline import shards
from pipeline.config import ReduceConfig
from pipeline.errors import PipelineError
from pipeline.files import read_json, write_json

FORMAT = "pipeline-reduced/1"
REDUCED_NAME = "reduced.h5"
TRANSFORM_NAME = "transform.joblib"
REPORT_NAME = "reduce.json"
PLOT_NAME = "explained_variance.png"
OUTPUT_NAMES = (REDUCED_NAME, TRANSFORM_NAME, PLOT_NAME, REPORT_NAME)
SPLITS = ("train", "val", "test")
# auto keeps the train rows in memory up to this share of RAM: a full SVD holds about three copies.
IN_MEMORY_SHARE = 0.25
RANDOMIZED_SEED = 0  # the randomized SVD is seeded so that a rerun writes the same numbers
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


class TapTransform(TransformerMixin, BaseEstimator):
    """Standardize each feature, weight each tap, then PCA; meant to be fitted on train rows only.

    `tap_dims` are the widths of the concatenated taps in column order. Fitted state: `scaler_`
    (the StandardScaler of the train rows: mean_, var_, scale_), `tap_weights_` (factor per tap
    after standardizing: 1/sqrt(dim) for block, else 1), `multiplier_` (the resulting factor per
    feature; all ones for scaling="none") and `pca_` (mean_, components_, explained_variance_).
    A row x maps to pca_.transform((x - scaler_.mean_) * multiplier_).
    """

    def __init__(self, tap_dims=(), scaling="block", n_components=256, whiten=False, solver="full"):
        self.tap_dims = tap_dims
        self.scaling = scaling
        self.n_components = n_components
        self.whiten = whiten
        self.solver = solver

    def fit(self, X, y=None):
        """Fit on an in-memory matrix of train rows."""
        self._set_scaling(StandardScaler().fit(X))
        self.pca_ = PCA(self.n_components, whiten=self.whiten, svd_solver=self.solver, random_state=RANDOMIZED_SEED)
        self.pca_.fit(self.scale(X))
        return self

    def fit_batches(self, batches):
        """Fit from `batches()`, a callable returning a fresh iterator of train-row chunks.

        Two streaming passes (scaler statistics, then the covariance of the scaled rows), so
        memory is one chunk plus a features x features matrix, however many rows there are.
        """
        if self.solver != "incremental":
            raise ValueError(f"fit_batches needs solver='incremental', not {self.solver!r}")
        scaler = StandardScaler()
        for X in batches():
            scaler.partial_fit(X)
        self._set_scaling(scaler)
        self.pca_ = CovariancePCA(self.n_components, whiten=self.whiten).fit_batches(map(self.scale, batches()))
        return self

    def _set_scaling(self, scaler):
        dims = np.asarray(self.tap_dims, dtype=int)
        if dims.sum() != scaler.n_features_in_:
            raise ValueError(f"tap_dims add up to {dims.sum()} but X has {scaler.n_features_in_} columns")
        self.scaler_ = scaler
        self.tap_weights_ = 1 / np.sqrt(dims) if self.scaling == "block" else np.ones(len(dims))
        per_feature = np.ones(dims.sum()) if self.scaling == "none" else 1 / scaler.scale_
        self.multiplier_ = (per_feature * np.repeat(self.tap_weights_, dims)).astype(np.float32)

    def scale(self, X):
        """The standardized, tap-weighted rows the PCA sees, as float32."""
        return (np.asarray(X, dtype=np.float32) - self.scaler_.mean_.astype(np.float32)) * self.multiplier_

    def transform(self, X):
        return self.pca_.transform(self.scale(X)).astype(np.float32, copy=False)

    def tap_shares(self):
        """Per tap: (share of the scaled input variance, share of the variance the kept components hold).

        A component's variance is split among taps by its squared loadings, which sum to one.
        """
        edges = np.cumsum([0, *self.tap_dims])
        input_variance = self.scaler_.var_ * self.multiplier_.astype(np.float64) ** 2
        kept_variance = self.pca_.explained_variance_ @ self.pca_.components_.astype(np.float64) ** 2
        per_tap = [(input_variance[a:b].sum(), kept_variance[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]
        totals = np.sum(per_tap, axis=0)
        return [tuple(np.divide(pair, totals, out=np.zeros(2), where=totals > 0)) for pair in per_tap]


class CovariancePCA(TransformerMixin, BaseEstimator):
    """Exact PCA from the covariance matrix, accumulated one chunk of rows at a time.

    Each chunk adds its float32 Gram matrix into a float64 sum; one symmetric eigendecomposition
    at the end gives the components. The rows it sees are already centered by the scaler, so
    subtracting the mean afterwards loses no precision. Fitted attributes mirror scikit-learn's
    PCA (mean_, components_, explained_variance_, explained_variance_ratio_, n_components_),
    with the same sign convention.
    """

    def __init__(self, n_components, whiten=False):
        self.n_components = n_components
        self.whiten = whiten

    def fit_batches(self, batches):
        """Fit from an iterable of (rows, features) chunks."""
        rows, total, gram = 0, None, None
        for X in batches:
            X = np.asarray(X, dtype=np.float32)
            if gram is None:
                total, gram = np.zeros(X.shape[1]), np.zeros((X.shape[1], X.shape[1]))
            rows += len(X)
            total += X.sum(axis=0, dtype=np.float64)
            gram += X.T @ X  # added in place: no float64 copy of the product
        self.mean_ = total / rows
        covariance = (gram - rows * np.outer(self.mean_, self.mean_)) / (rows - 1)
        variances, vectors = np.linalg.eigh(covariance)  # ascending
        order = np.argsort(variances)[::-1][: self.n_components]
        components = vectors[:, order].T
        # scikit-learn's sign convention: each component's largest-magnitude loading is positive
        largest = components[np.arange(len(order)), np.abs(components).argmax(axis=1)]
        self.components_ = (components * np.sign(largest)[:, None]).astype(np.float32)
        self.explained_variance_ = np.clip(variances[order], 0.0, None)
        self.explained_variance_ratio_ = self.explained_variance_ / np.trace(covariance)
        self.n_components_ = len(order)
        self.n_features_in_ = covariance.shape[0]
        self.n_samples_ = rows
        return self

    def transform(self, X):
        projected = (np.asarray(X, dtype=np.float32) - self.mean_.astype(np.float32)) @ self.components_.T
        if self.whiten:  # as scikit-learn: divide by sqrt(variance), floored at eps
            projected /= np.maximum(np.sqrt(self.explained_variance_), np.finfo(np.float64).eps).astype(np.float32)
        return projected


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
    manifest_sha256 = hashlib.sha256((features_dir / shards.MANIFEST_NAME).read_bytes()).hexdigest()
    config = _resolve_taps(config, manifest)
    _check_shards(features_dir, manifest)
    if _is_up_to_date(out_dir, manifest_sha256, config, overwrite):
        return ReduceResult(out_dir, read_json(out_dir / REPORT_NAME), True)

    ids, labels, given = _read_rows(features_dir, manifest)
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
        return _train_chunks(features_dir, manifest, config.taps, is_train, config.batch_rows)

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
            "format": FORMAT,
            "inputs": {
                "features": Path(os.path.relpath(features_dir.absolute(), out_dir.absolute())).as_posix(),
                "features_absolute": str(features_dir.absolute()),
                "manifest_sha256": manifest_sha256,
            },
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
                "source": _split_source(given),
                "rows": {name: int((splits == name).sum()) for name in SPLITS},
                "unlabeled": int((np.asarray(labels) < 0).sum()),
                "sha256": split_sha256(ids, labels, splits),
            },
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json(staging / REPORT_NAME, report)
    return ReduceResult(out_dir, report, False)


def _resolve_taps(config, manifest):
    """The config with its taps checked against the manifest and put in manifest order (empty = all)."""
    available = [t["key"] for t in manifest["taps"]]
    unknown = [t for t in config.taps if t not in available]
    if unknown:
        raise PipelineError(f"tap {unknown[0]} is not in the features manifest; it has {', '.join(available)}")
    chosen = [t for t in available if t in config.taps] if config.taps else available
    return dataclasses.replace(config, taps=tuple(chosen))


def _check_shards(features_dir, manifest):
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
    if previous["inputs"]["manifest_sha256"] != manifest_sha256:
        changes.append(f"made from another features manifest ({previous['inputs']['manifest_sha256'][:12]}, now {manifest_sha256[:12]})")
    for key, value in config.to_dict().items():
        if previous["config"].get(key) != value:
            changes.append(f"{key} {previous['config'].get(key)!r}, now {value!r}")
    return changes


def _read_rows(features_dir, manifest):
    """ids, labels and given splits of all rows in order, without reading any features."""
    ids, labels, given = [], [], []
    for entry in manifest["shards"]:
        part = shards.read_shard(features_dir / entry["file"], taps=[])
        ids += part.ids
        labels.append(np.asarray(part.labels, dtype=np.int32))
        given += part.splits
    return ids, np.concatenate(labels) if labels else np.zeros(0, np.int32), given


def _split_source(given):
    provided = sum(1 for s in given if s)
    return "source" if provided == len(given) else "hash" if provided == 0 else "source+hash"


def _train_chunks(features_dir, manifest, taps, is_train, chunk_rows):
    """The train rows of each chunk of `chunk_rows` rows, in order."""
    start = 0
    for _, _, _, X in shards.iter_feature_chunks(features_dir, manifest, list(taps), chunk_rows):
        mask = is_train[start:start + len(X)]
        start += len(X)
        if mask.any():
            yield X[mask]


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
        f.attrs["format"] = FORMAT
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
    raw = report_path.read_bytes()
    try:
        report = json.loads(raw)
    except ValueError:
        raise PipelineError(f"{report_path} is not readable JSON; reduce again with --overwrite") from None
    if report.get("format") != FORMAT:
        raise PipelineError(f"{report_path} has format {report.get('format')!r}; expected {FORMAT!r}")
    with h5py.File(reduced_dir / REDUCED_NAME, "r") as f:
        return Reduced(
            path=reduced_dir,
            report=report,
            report_sha256=hashlib.sha256(raw).hexdigest(),
            ids=f["ids"].asstr()[:].tolist(),
            labels=f["labels"][:],
            splits=f["splits"].asstr()[:],
            X=f["X"][:],
        )
