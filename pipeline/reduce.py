"""Stage two (a): fixed splits, per-tap scaling and PCA fitted on train rows, written as reduced/ (the format: reduced.py)."""

import dataclasses
import itertools
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
from matplotlib.figure import Figure

from pipeline import shards
from pipeline.config import ReduceConfig
from pipeline.errors import PipelineError

# transform.joblib files written before estimators.py existed name TapTransform and CovariancePCA
# under pipeline.reduce; unpickling them looks them up here.
from pipeline.estimators import (
    CovariancePCA,  # noqa: F401
    GramSums,
    Moments,
    TapTransform,
    gram_sums,
    moment_sums,
)
from pipeline.features import ShardPart, open_features, read_part
from pipeline.files import atomic_dir, check_space, output_guard, read_json, storage_errors, write_json
from pipeline.lineage import (
    MANIFEST_NAME,
    REDUCED_FORMAT,
    REPORT_NAME,
    TRANSFORM_NAME,
    Link,
    extraction_sha256,
    link,
    sha256_file,
)
from pipeline.reduced import CHECKED_OUTPUTS, PLOT_NAME, REDUCED_NAME, SPLITS, output_damage, write_reduced
from pipeline.splits import SPLIT_RULE, assign_splits, empty_splits, rule_of, split_sha256, split_source

# auto keeps the train rows in memory up to this share of RAM: a full SVD holds about three copies.
IN_MEMORY_SHARE = 0.25
_ROW_OVERHEAD = 256  # bytes of reduced.h5 per row besides X: id, label, split and HDF5 bookkeeping
_SPACE_MARGIN = 1.1  # free disk space wanted beyond the estimated size of the outputs


def physical_memory():
    """Bytes of RAM, or 8 GiB where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 * 2**30


def choose_solver(config, n_train, dim, memory_bytes, engine="local"):
    """The PCA solver: the requested one, or for auto one that suits the size of the train matrix.

    On Ray only the incremental solver's passes are distributed, so `engine="ray"` needs it.
    """
    share = isinstance(config.components, float)
    solver = config.solver
    if engine == "ray":
        if solver not in ("auto", "incremental"):
            raise PipelineError(
                f"--engine ray runs the incremental solver's passes as Ray tasks, but --solver {solver} runs in this "
                "process; use --solver incremental (or auto), or leave out --engine ray"
            )
        solver = "incremental"
    elif solver == "auto":
        smaller = min(n_train, dim)
        if n_train * dim * 4 > IN_MEMORY_SHARE * memory_bytes:
            solver = "incremental"
        elif not share and smaller > 500 and config.components < 0.8 * smaller:
            solver = "randomized"
        else:
            solver = "full"
    if share and solver != "full":
        why = (
            "--engine ray was asked for"
            if engine == "ray"
            else f"the {n_train} x {dim} train matrix is too big for memory here"
            if config.solver == "auto"
            else f"--solver {solver} was asked for"
        )
        raise PipelineError(
            f"--components {config.components} (a variance share) needs the full solver, but {why}; "
            "give a number of components instead"
        )
    return solver


def check_components(components, n_train, dim):
    """Fail with the maximum when an integer `components` is more than the data allows.

    Centred on their mean, n train rows span at most n - 1 directions: a component beyond them
    has zero variance, and whitening would divide it by (nearly) zero.
    """
    most = min(n_train - 1, dim)
    if isinstance(components, int) and components > most:
        raise PipelineError(
            f"--components {components} is more than the maximum of {most} here (the least of {n_train} train rows "
            f"minus one, since centred rows span one direction fewer, and {dim} features)"
        )


@dataclass(frozen=True)
class ReduceResult:
    out: Path
    report: dict  # the contents of reduce.json
    up_to_date: bool  # the out dir already held this reduction, so nothing was done
    warnings: list = field(default_factory=list)


def reduce_features(
    features_dir: Path | str,
    out_dir: Path | str,
    config: ReduceConfig = ReduceConfig(),
    overwrite: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
) -> ReduceResult:
    """Split, scale and PCA-reduce a features dir into `out_dir`; an identical finished one is a cache hit.

    Everything is validated before any output is written, and the outputs appear together
    (files.atomic_dir), so an error or a crash never leaves a half-written reduced dir. One
    process at a time writes `out_dir` (a lock file beside it). With `engine="ray"` the
    incremental solver's per-shard sums run as Ray tasks (at `ray_address`, or a new local Ray).
    """
    started = time.perf_counter()
    features_dir, out_dir = Path(features_dir), Path(out_dir).absolute()
    live = open_features(features_dir)  # the manifest checked against its shards; live rows only
    features = link(features_dir, MANIFEST_NAME, out_dir)
    config = resolve_taps(config, live.manifest)
    with output_guard(out_dir, f"reduced directory {out_dir}"):
        previous, damage = _previous(out_dir, features.sha256, config, overwrite, live.manifest)
        if previous is not None and damage is None:
            return ReduceResult(out_dir, previous, True)
        report, warnings = _reduce(live, features, out_dir, config, engine, ray_address, started, previous)
    return ReduceResult(out_dir, report, False, ([f"{damage}, so it was reduced again"] if damage else []) + warnings)


def _reduce(live, features, out_dir, config, engine, ray_address, started, damaged=None):
    """Compute and write the reduction of features.Features `live`; `damaged` is the intact reduce.json of a damaged copy of it.

    Returns (reduce.json's contents, warnings).
    """
    features_dir, manifest = live.path, live.manifest
    ids, labels, given = live.ids, live.labels, live.splits
    splits = assign_splits(ids, labels, given, config.val_fraction, config.test_fraction, config.split_seed)
    is_train = splits == "train"
    n_train = int(is_train.sum())
    if n_train < 2:
        raise PipelineError(f"only {n_train} of {len(ids)} rows are in train; PCA needs at least 2")
    dims = {t["key"]: t["dim"] for t in manifest["taps"]}
    tap_dims = tuple(dims[t] for t in config.taps)
    dim = sum(tap_dims)
    solver = choose_solver(config, n_train, dim, physical_memory(), engine)
    check_components(config.components, n_train, dim)

    _check_space(out_dir, len(ids), dim, config.components if isinstance(config.components, int) else min(n_train, dim))

    transform = TapTransform(tap_dims, config.scaling, config.components, config.whiten, solver)
    if solver == "incremental":
        tasks = _shard_sums_tasks(live, config, is_train)
        if engine == "ray":
            from pipeline.engines.ray_reduce import ray_map

            with ray_map(ray_address) as run:
                fit_incremental(transform, tasks, run)
        else:
            fit_incremental(transform, tasks, map)
    else:
        bad = NonFinite(config.taps, tap_dims)
        X = _stack(_train_rows(_chunks(live, config.taps, config.batch_rows), is_train, bad), n_train, dim)
        bad.check(features_dir, len(ids))
        transform.fit(X)

    previous = "the previous reduction in it is unchanged" if out_dir.exists() else "nothing was written"
    with storage_errors(f"reduced directory {out_dir}", f"{previous}; free space (or fix the rights) and rerun the same command"):
        with atomic_dir(out_dir) as staging:
            reduced_rows = (transform.transform(chunk) for _, chunk in _chunks(live, config.taps, config.batch_rows))
            write_reduced(
                staging / REDUCED_NAME, ids, labels, splits, transform.pca_.n_components_, reduced_rows, config.sha256()
            )
            joblib.dump(transform, staging / TRANSFORM_NAME)
            ratios = transform.pca_.explained_variance_ratio_.astype(float)
            _plot_explained_variance(ratios, staging / PLOT_NAME)
            report = {
                "format": REDUCED_FORMAT,
                "inputs": {
                    **features.to_json("features"),
                    "generation": manifest.get("generation", 0),
                    "extraction_sha256": extraction_sha256(manifest),
                },
                "config": config.to_dict(),
                "config_sha256": config.sha256(),
                "classes": manifest["classes"],
                "taps": [
                    {"key": key, "dim": d, "input_share": float(shares[0]), "kept_share": float(shares[1])}
                    for key, d, shares in zip(config.taps, tap_dims, transform.tap_shares())
                ],
                "features": dim,
                "solver": {"requested": config.solver, "chosen": solver, "engine": engine},
                "components": int(transform.pca_.n_components_),
                "explained_variance_ratio": ratios.tolist(),
                "kept_variance": float(ratios.sum()),
                "rows": len(ids),
                "splits": {
                    "source": split_source(given),
                    "rule": SPLIT_RULE,
                    "rows": {name: int((splits == name).sum()) for name in SPLITS},
                    "unlabeled": int((np.asarray(labels) < 0).sum()),
                    "sha256": split_sha256(ids, labels, splits),
                },
                "outputs": {name: sha256_file(staging / name) for name in CHECKED_OUTPUTS},
                "seconds": round(time.perf_counter() - started, 3),
            }
            if damaged is not None and damaged.get("outputs") == report["outputs"]:
                # The repair gave the very bytes the old record describes: keeping that record keeps runs trained on it valid.
                report = damaged
                shutil.copyfile(out_dir / REPORT_NAME, staging / REPORT_NAME)
            else:
                write_json(staging / REPORT_NAME, report)
    return report, empty_splits(labels, splits, manifest["classes"], config.val_fraction, config.test_fraction)


def resolve_taps(config: ReduceConfig, manifest: shards.Manifest) -> ReduceConfig:
    """The config with its taps checked against the manifest and put in manifest order (empty = all)."""
    available = [t["key"] for t in manifest["taps"]]
    unknown = [t for t in config.taps if t not in available]
    if unknown:
        raise PipelineError(f"tap {unknown[0]} is not in the features manifest; it has {', '.join(available)}")
    chosen = [t for t in available if t in config.taps] if config.taps else available
    return dataclasses.replace(config, taps=tuple(chosen))


def _previous(out_dir, manifest_sha256, config, overwrite, manifest):
    """(reduce.json, None) when `out_dir` holds this reduction intact, (reduce.json, what is damaged) when it holds
    it damaged, else (None, None): nothing, or something --overwrite allows us to replace. Raises otherwise.
    """
    if not out_dir.exists():
        return None, None
    if not out_dir.is_dir():
        raise PipelineError(f"--out {out_dir} is a file; give a directory")
    report_path = out_dir / REPORT_NAME
    if not report_path.is_file():
        if any(out_dir.iterdir()):
            raise PipelineError(
                f"--out {out_dir} is neither empty nor a reduced directory (no {REPORT_NAME}); give a new or empty directory"
            )
        return None, None
    try:
        previous = read_json(report_path)
        changes = _changes(previous, manifest_sha256, config, manifest)
    except (OSError, ValueError, KeyError, TypeError):
        if overwrite:
            return None, None
        raise PipelineError(
            f"{report_path} is not a readable reduce record, so what {out_dir} holds is unknown; add --overwrite to replace it"
        ) from None
    if changes:
        if not overwrite:
            raise PipelineError(
                f"{out_dir} already holds a different reduction ({'; '.join(changes)}); give another --out or add --overwrite"
            )
        return None, None
    return previous, output_damage(out_dir, previous)


def _changes(previous, manifest_sha256, config, manifest):
    """Human-readable differences between a previous reduce.json and this run (on features `manifest`)."""
    changes = []
    made_from = Link.from_json(previous["inputs"], "features").sha256
    then, now = previous["inputs"].get("generation", 0), manifest.get("generation", 0)
    if then != now:
        changes.append(f"made from the features before extract updated them (generation {then}, now {now})")
    elif made_from != manifest_sha256:
        changes.append(f"made from another features manifest ({made_from[:12]}, now {manifest_sha256[:12]})")
    for key, value in config.to_dict().items():
        if previous["config"].get(key) != value:
            changes.append(f"{key} {previous['config'].get(key)!r}, now {value!r}")
    rule = rule_of(previous["splits"])
    if rule != SPLIT_RULE:
        changes.append(f"split rule {rule}, now {SPLIT_RULE}")
    return changes


def _chunks(live, taps, chunk_rows):
    """(ids, X float32 with `taps` side by side) of every live row in sorted-id order, `chunk_rows` at a time."""
    for batch in live.batches(taps, chunk_rows, np.float32):
        yield batch.ids, batch.matrix()


class NonFinite:
    """Rows holding NaN or Inf, counted per tap over every row read, so the error can say how many."""

    def __init__(self, taps, tap_dims):
        self.taps = tuple(taps)
        self.edges = np.cumsum([0, *tap_dims])
        self.rows = dict.fromkeys(self.taps, 0)
        self.first = {}  # tap -> id of its first bad row

    def clean(self, ids, X):
        """Count the bad rows of a chunk; True when it has none."""
        finite = np.isfinite(X)
        if finite.all():
            return True
        for tap, a, b in zip(self.taps, self.edges[:-1], self.edges[1:]):
            bad = np.flatnonzero(~finite[:, a:b].all(axis=1))
            if bad.size:
                self.rows[tap] += int(bad.size)
                self.first.setdefault(tap, ids[bad[0]])
        return False

    def __iadd__(self, other):
        for tap in self.taps:
            self.rows[tap] += other.rows[tap]
            if tap in other.first:
                self.first.setdefault(tap, other.first[tap])
        return self

    def check(self, features_dir, total):
        """Raise naming every tap with bad rows, how many, and the first one."""
        bad = [
            f"tap {tap} in {self.rows[tap]} of {total} rows (first {self.first[tap]!r})" for tap in self.taps if self.rows[tap]
        ]
        if bad:
            raise PipelineError(
                f"the features in {features_dir} hold NaN or Inf: {'; '.join(bad)}; PCA cannot use them, so extract "
                "those images again (with --precision float32 if a reduced precision overflowed)"
            )


def masked_chunks(live, taps, mask, chunk_rows, bad=None):
    """The live rows of features.Features `live` where `mask` is true, `chunk_rows` rows read at a time, in order
    (float32, `taps` concatenated).

    With a NonFinite `bad`, every row read is checked and a chunk holding NaN or Inf is only counted.
    """
    return _train_rows(_chunks(live, taps, chunk_rows), mask, bad)


def _train_rows(chunks, is_train, bad=None):
    """The train rows of each (ids, X) chunk, in order; chunks with NaN or Inf are only counted in `bad`."""
    start = 0
    for ids, X in chunks:
        mask = is_train[start : start + len(X)]
        start += len(X)
        if (bad is None or bad.clean(ids, X)) and mask.any():
            yield X[mask]


@dataclass(frozen=True)
class ShardSumsTask:
    """One shard's part of the incremental solver's passes: its live rows, which of them are train, and how to read it."""

    features_dir: Path
    part: ShardPart  # the shard's live rows
    ids: np.ndarray  # of its live rows, in file order
    taps: tuple
    tap_dims: tuple
    is_train: np.ndarray  # of its live rows, in file order
    batch_rows: int

    def chunks(self):
        """(ids, X float32) of the shard's live rows, `batch_rows` at a time."""
        taps = dict(zip(self.taps, self.tap_dims))
        for batch in read_part(self.part, taps, (self.ids, None, None), self.batch_rows, np.float32, self.features_dir):
            yield batch.ids, batch.matrix()


def _shard_sums_tasks(live, config, is_train):
    tap_dims = tuple(live.taps[t] for t in config.taps)
    return [
        ShardSumsTask(
            live.path, part, live.ids[part.positions], config.taps, tap_dims, is_train[part.positions], config.batch_rows
        )
        for part in live.parts
    ]


def shard_moments(task):
    """First pass over one shard: (Moments of its train rows, NonFinite count of all its live rows)."""
    bad = NonFinite(task.taps, task.tap_dims)
    return moment_sums(_train_rows(task.chunks(), task.is_train, bad), sum(task.tap_dims)), bad


def shard_grams(task, transform):
    """Second pass over one shard: GramSums of its train rows as `transform` scales them."""
    return gram_sums(map(transform.scale, _train_rows(task.chunks(), task.is_train)), sum(task.tap_dims))


def fit_incremental(transform, tasks, run):
    """Fit `transform` from per-shard sums; `run(function, items)` maps a function over items (here or on Ray).

    The sums of each shard are added in shard order as `run` yields them. Locally (`map`) only one
    shard's sums exist at a time; on Ray (engines.ray_reduce.ray_map) at most its bound of tasks
    (2 per cluster CPU) are running or waiting to be fetched, each holding one shard's sums.
    """
    dim = int(np.sum(transform.tap_dims))
    moments, bad = Moments(dim), NonFinite(tasks[0].taps, tasks[0].tap_dims)
    for shard, shard_bad in run(shard_moments, tasks):
        moments += shard
        bad += shard_bad
    bad.check(tasks[0].features_dir, sum(len(task.ids) for task in tasks))
    transform.fit_scaling(moments)
    grams = GramSums(dim)
    for part in run(shard_grams, tasks, itertools.repeat(transform)):
        grams += part
    return transform.fit_covariance(grams)


def _stack(chunks, rows, dim):
    """Copy chunks into one preallocated (rows, dim) float32 matrix."""
    X = np.empty((rows, dim), dtype=np.float32)
    at = 0
    for chunk in chunks:
        X[at : at + len(chunk)] = chunk
        at += len(chunk)
    return X


def _check_space(out_dir, rows, dim, components):
    """Fail before computing when the reduced dir would not fit."""
    needed = int((rows * (components * 4 + _ROW_OVERHEAD) + dim * (components * 4 + 64) + 2**20) * _SPACE_MARGIN)
    check_space(out_dir, needed, "the reduced directory needs")


def _plot_explained_variance(ratios, path):
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    cumulative = np.cumsum(ratios)
    ax.plot(np.arange(1, len(ratios) + 1), cumulative, marker=".")
    ax.set(
        xlabel="components",
        ylabel="cumulative share of scaled variance",
        ylim=(0, 1.02),
        title=f"{len(ratios)} components keep {cumulative[-1]:.1%} of the variance",
    )
    ax.grid(alpha=0.3)
    figure.savefig(path, dpi=100, bbox_inches="tight")
