"""Per-tap linear probes: which taps carry the class signal, alone, per backbone and all together.

Every group gets what `reduce` + `train`'s baseline would give it: the taps scaled as reduce
scales them (fitted on train rows), PCA, then the logistic-regression probe, on the same split.
The features are read twice, whatever the number of groups: once for the train rows (held in
memory when there are fewer of them than features, else streamed into the covariance of all
taps, of which each group's PCA takes its block), and once to project the labelled rows onto
every group's components.
"""

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.config import ReduceConfig, tap_backbone
from pipeline.engines.pool import cores, worker_threads
from pipeline.errors import PipelineError
from pipeline.estimators import RANDOMIZED_SEED, CovariancePCA, Moments, TapTransform, gram_sums
from pipeline.features import Features, open_features
from pipeline.files import atomic_path, lock_beside, output_guard, write_json
from pipeline.lineage import MANIFEST_NAME, REPORT_NAME, follow_link, link, recorded_link
from pipeline.reduce import NonFinite, choose_solver, masked_chunks, resolve_taps
from pipeline.reduced import REDUCED_NAME, load_reduced
from pipeline.scoring import PROBE_MODEL, class_probabilities, evaluate, fit_linear_probe
from pipeline.splits import SPLIT_RULE, SPLITS, assign_splits, rule_of, split_sha256, split_source

PROBE_FORMAT = "pipeline-probe/1"
PROBE_NAME = "probe.json"
CHART_NAME = "probe.png"
SPLIT_OPTIONS = ("val_fraction", "test_fraction", "split_seed")
SCORES = ("rows", "accuracy", "macro_f1", "log_loss")  # of scoring.evaluate's metrics, kept per split


@dataclass(frozen=True)
class Group:
    """Taps probed together: one tap, one backbone's taps, or all of them."""

    name: str
    kind: str  # tap, backbone or all
    taps: tuple[str, ...]


def plan_groups(taps: Sequence[str]) -> list[Group]:
    """Every tap alone, every backbone with more than one tap (unless that is all taps), then all taps."""
    groups = [Group(tap, "tap", (tap,)) for tap in taps]
    for backbone in dict.fromkeys(tap_backbone(t) for t in taps):
        mine = tuple(t for t in taps if tap_backbone(t) == backbone)
        if 1 < len(mine) < len(taps):
            groups.append(Group(backbone, "backbone", mine))
    if len(taps) > 1:
        groups.append(Group("all", "all", tuple(taps)))
    return groups


@dataclass(frozen=True)
class _Input:
    """What a probe reads: the features, the resolved settings and the split of every row."""

    path: Path  # as given: a features or a reduced dir
    live: Features  # the live rows of the features dir
    config: ReduceConfig  # taps in manifest order; components an integer
    labels: np.ndarray
    splits: np.ndarray  # train/val/test of every row
    split_record: dict  # source, rule and sha256, as reduce.json records them
    inputs: dict  # how probe.json names what it read

    @property
    def labelled(self):
        return self.labels >= 0

    @property
    def features_dir(self):
        return self.live.path

    @property
    def manifest(self):
        return self.live.manifest


@dataclass(frozen=True)
class ProbeResult:
    out: Path
    report: dict  # the contents of probe.json


def probe(path: Path | str, out_dir: Path | str, jobs: int | None = None, **options) -> ProbeResult:
    """Fit the probe of every tap group of a features or reduced dir; write probe.json and probe.png to `out_dir`.

    `options` are ReduceConfig fields (taps, scaling, components as an integer, whiten,
    batch_rows, and for a features dir val_fraction, test_fraction, split_seed). Unset ones take
    the reduced dir's settings, or ReduceConfig's defaults for a features dir. `jobs` groups are
    fitted at once (default: one per core), on threads, with BLAS capped so that jobs x threads <= cores.
    One probe at a time writes `out_dir` (a lock file beside it); a second one is refused.
    """
    started = time.perf_counter()
    jobs = jobs or cores()
    path, out_dir = Path(path), Path(out_dir)
    source = _open(path, out_dir, options)
    _check_probeable(source)
    with output_guard(out_dir, f"probe directory {out_dir}", into=True, lock_file=lock_beside(out_dir)):
        return _probe(source, out_dir, jobs, started)


def _probe(source, out_dir, jobs, started):
    labels, splits = source.labels[source.labelled], source.splits[source.labelled]
    report = {
        "format": PROBE_FORMAT,
        "inputs": source.inputs,
        "settings": {
            **{key: value for key, value in source.config.to_dict().items() if key != "solver"},
            "model": PROBE_MODEL,
        },
        "classes": source.manifest["classes"],
        "rows": len(source.labels),
        "splits": {
            **source.split_record,
            "rows": {split: int((splits == split).sum()) for split in SPLITS},  # labelled rows the probes use
            "pca_train_rows": int((source.splits == "train").sum()),  # labelled or not, as reduce fits its transform
            "unlabeled": int((~source.labelled).sum()),
        },
        "groups": _probe_groups(source, plan_groups(source.config.taps), labels, splits, jobs),
        "jobs": jobs,
    }
    report["seconds"] = round(time.perf_counter() - started, 3)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(report, out_dir / CHART_NAME)
    write_json(out_dir / PROBE_NAME, report)  # last, so a probe.json always has its chart
    return ProbeResult(out_dir, report)


def ranked(entries: list[dict]) -> list[dict]:
    """Group entries best first: highest val accuracy, then lowest val log loss, then name."""
    return sorted(entries, key=lambda e: (-e["val"]["accuracy"], e["val"]["log_loss"], e["name"]))


def _open(path, out_dir, options):
    if (path / REPORT_NAME).is_file():
        return _open_reduced(path, out_dir, options)
    if (path / MANIFEST_NAME).is_file():
        return _open_features(path, out_dir, options)
    raise PipelineError(
        f"{path} is neither a features directory (no {MANIFEST_NAME}) nor a reduced directory (no {REPORT_NAME}); "
        "give the --out of `pipeline extract` or of `pipeline reduce`"
    )


def _open_features(path, out_dir, options):
    """A features dir: reduce's split (assign_splits) with the given or default fractions and seed."""
    live = open_features(path)
    config = resolve_taps(ReduceConfig(**options), live.manifest)
    ids, labels, given = live.ids.tolist(), live.labels, live.splits.tolist()
    splits = assign_splits(ids, labels, given, config.val_fraction, config.test_fraction, config.split_seed)
    return _Input(
        path,
        live,
        config,
        labels,
        splits,
        split_record={"source": split_source(given), "rule": SPLIT_RULE, "sha256": split_sha256(ids, labels, splits)},
        inputs={"kind": "features", **link(path, MANIFEST_NAME, out_dir).to_json("features")},
    )


def _open_reduced(path, out_dir, options):
    """A reduced dir: exactly its split, its settings unless overridden, and the features it links to."""
    fixed = [name for name in SPLIT_OPTIONS if name in options]
    if fixed:
        raise PipelineError(
            f"--{fixed[0].replace('_', '-')} cannot change the split of reduced directory {path}; "
            "probe its features directory to choose another split"
        )
    reduced = load_reduced(path)
    report = reduced.report
    report_path = path / REPORT_NAME
    again = "reduce again with --overwrite (or probe the features directory)"
    features_dir = follow_link(
        report_path,
        recorded_link(report_path, report, "inputs", "features", again),
        path,
        MANIFEST_NAME,
        "features directory",
        "the features changed since reduce, so reduce again (or probe the features directory)",
    )
    live = open_features(features_dir)
    config = resolve_taps(_recorded_config(report_path, report, options), live.manifest)
    if live.ids.tolist() != reduced.ids:
        raise PipelineError(f"{path / REDUCED_NAME} holds other rows than {features_dir}; reduce again")
    return _Input(
        path,
        live,
        config,
        reduced.labels,
        reduced.splits,
        split_record={
            "source": report["splits"]["source"],
            "rule": rule_of(report["splits"]),
            "sha256": report["splits"]["sha256"],
        },
        inputs={
            "kind": "reduced",
            "reduced": link(path, REPORT_NAME, out_dir).to_json("reduced"),
            **link(features_dir, MANIFEST_NAME, out_dir).to_json("features"),
        },
    )


def _recorded_config(report_path, report, options):
    """The ReduceConfig reduce.json records, with the variance share resolved to its count and `options` applied."""
    try:
        recorded = {**report["config"], "components": report["components"]}
    except (KeyError, TypeError) as e:
        missing = f"lacks {e}" if isinstance(e, KeyError) else "is not a mapping"
        raise PipelineError(
            f"{report_path} has no complete record of its settings (it {missing}); reduce again with --overwrite"
        ) from None
    return ReduceConfig.from_record(
        recorded, str(report_path), remedy="use the pipeline version that made it, or probe the features directory", **options
    )


def _check_probeable(source):
    """Refuse data the probes cannot be fitted or ranked on."""
    path, splits, labelled = source.path, source.splits, source.labelled
    if not labelled.any():
        raise PipelineError(f"{path} has no labelled rows; a probe is scored against labels, so it needs them")
    if not (labelled & (splits == "val")).any():
        remedy = "give a --val-fraction above 0"
        if source.inputs["kind"] == "reduced":
            remedy = "reduce again with a --val-fraction above 0"
        raise PipelineError(f"{path} has no labelled val rows, which rank the probes; {remedy}")
    present = np.unique(source.labels[labelled & (splits == "train")])
    if len(present) < 2:
        held = f"only class {source.manifest['classes'][present[0]]!r}" if len(present) else "no labelled rows"
        raise PipelineError(f"the train rows of {path} hold {held}; a probe needs at least two classes in train")


def _probe_groups(source, groups, labels, splits, jobs):
    """One probe.json entry per group: the PCA of its scaled train rows, then the probe on its components.

    `labels` and `splits` are those of the labelled rows, which the probes are fitted and scored on.
    """
    dims = {t["key"]: t["dim"] for t in source.manifest["taps"]}
    tap_dims = [dims[t] for t in source.config.taps]
    widths = [sum(dims[t] for t in group.taps) for group in groups]
    columns = [_columns(source.config.taps, tap_dims, group.taps) for group in groups]
    scaling, fitted = _fit_pcas(source, tap_dims, columns, widths, jobs)
    projected = _project(source, scaling, [(cols, pca) for cols, (pca, _, _) in zip(columns, fitted)])
    classes = source.manifest["classes"]
    tasks = [joblib.delayed(_fit_probe)(X, labels, splits, classes) for X in projected]
    scored = _parallel(jobs, tasks, costs=[X.shape[1] for X in projected])
    return [
        {
            "name": group.name,
            "kind": group.kind,
            "taps": list(group.taps),
            "input_dims": width,
            "components": int(pca.n_components_),
            "pca_solver": solver,
            "kept_variance": float(pca.explained_variance_ratio_.sum()),
            **scores,
            "seconds": round(pca_seconds + probe_seconds, 3),
        }
        for group, width, (pca, solver, pca_seconds), (scores, probe_seconds) in zip(groups, widths, fitted, scored)
    ]


def _fit_pcas(source, tap_dims, columns, widths, jobs):
    """The scaling fitted on the train rows, and per group (PCA of its scaled columns, solver, seconds).

    With fewer train rows than features, the train rows are held in memory (they take less than
    the covariance would) and each group gets the PCA reduce's auto solver fits on them: an SVD of
    the rows is then cheaper than an eigendecomposition of the covariance. Otherwise one streaming
    pass accumulates the covariance of all taps, and each group's PCA is exact from its block.
    """
    config = source.config
    is_train = source.splits == "train"
    n_train = int(is_train.sum())
    bad = NonFinite(config.taps, tap_dims)  # every row is read in this first pass: NaN or Inf stop it, as in reduce
    if n_train < sum(tap_dims):
        chunks = list(masked_chunks(source.live, config.taps, is_train, config.batch_rows, bad))
        bad.check(source.features_dir, len(source.labels))
        X = np.concatenate(chunks)
        scaling = TapTransform(tap_dims, config.scaling).set_scaling(StandardScaler().fit(X))
        scaled = scaling.scale(X)
        del X
        tasks = [joblib.delayed(_pca_of_rows)(scaled[:, cols], config.components, config.whiten) for cols in columns]
        costs = [n_train * width * min(n_train, width) for width in widths]  # an SVD's flops
    else:
        scaling, covariance = _train_covariance(source, tap_dims, is_train, bad)
        tasks = [
            joblib.delayed(_pca_of_covariance)(covariance[cols][:, cols], config.components, config.whiten, n_train)
            for cols in columns
        ]
        costs = [width**3 for width in widths]  # an eigendecomposition's flops
    return scaling, _parallel(jobs, tasks, costs)


def _train_covariance(source, tap_dims, is_train, bad=None):
    """The scaling fitted on the train rows and the covariance of the scaled train rows (all taps).

    One pass: the scaler's statistics and the covariance of the raw rows are accumulated together;
    scaling is a per-feature factor, so the scaled covariance is the raw one times both factors.
    """
    config = source.config
    moments = Moments(sum(tap_dims))

    def centered_chunks():
        shift = None
        for X in masked_chunks(source.live, config.taps, is_train, config.batch_rows, bad):
            moments.add_rows(X)
            if shift is None:
                shift = (moments.total / moments.count).astype(
                    np.float32
                )  # near the mean, so the float32 Gram products stay accurate
            yield X - shift

    sums = gram_sums(centered_chunks(), sum(tap_dims))
    if bad is not None:
        bad.check(source.features_dir, len(source.labels))  # before the sums of the clean rows alone are used
    _, covariance = sums.mean_and_covariance()
    scaling = TapTransform(tap_dims, config.scaling).fit_scaling(moments)
    multiplier = scaling.multiplier_.astype(np.float64)
    covariance *= multiplier[:, None]
    covariance *= multiplier[None, :]
    return scaling, covariance


def _columns(taps, tap_dims, group_taps):
    """The group's columns among the concatenated `taps`: a slice when contiguous (a view, not a copy)."""
    starts = dict(zip(taps, np.cumsum([0, *tap_dims]).tolist()))
    widths = dict(zip(taps, tap_dims))
    index = np.concatenate([np.arange(starts[t], starts[t] + widths[t]) for t in group_taps])
    return slice(int(index[0]), int(index[-1]) + 1) if (np.diff(index) == 1).all() else index


def _pca_of_rows(scaled, components, whiten):
    """(PCA, solver, seconds) of one group's scaled train rows, with the solver reduce's auto would choose."""
    started = time.perf_counter()
    n_components = min(components, len(scaled) - 1, scaled.shape[1])  # centred rows span one direction fewer (reduce's cap)
    # These rows are in memory already, so reduce's rule can only pick full or randomized.
    solver = choose_solver(ReduceConfig(components=n_components), *scaled.shape, memory_bytes=math.inf)
    pca = PCA(n_components, whiten=whiten, svd_solver=solver, random_state=RANDOMIZED_SEED).fit(scaled)
    return pca, solver, time.perf_counter() - started


def _pca_of_covariance(covariance, components, whiten, rows):
    """(PCA, solver, seconds) of one group from its block of the covariance of `rows` scaled train rows."""
    started = time.perf_counter()
    n_components = min(components, len(covariance), rows - 1)  # this path has at least as many rows as features
    # The scaled train rows have mean zero: the scaler subtracted their own mean.
    pca = CovariancePCA(n_components, whiten=whiten).fit_covariance(np.zeros(len(covariance)), covariance, rows)
    return pca, "covariance", time.perf_counter() - started


def _project(source, scaling, fitted):
    """Each group's components of every labelled row, in row order: one pass over the features for all groups."""
    outputs = [np.empty((int(source.labelled.sum()), pca.n_components_), dtype=np.float32) for _, pca in fitted]
    at = 0
    for X in masked_chunks(source.live, source.config.taps, source.labelled, source.config.batch_rows):
        scaled = scaling.scale(X)
        for out, (cols, pca) in zip(outputs, fitted):
            out[at : at + len(X)] = pca.transform(scaled[:, cols])
        at += len(X)
    return outputs


def _fit_probe(X, labels, splits, classes):
    """({val, test, iterations, converged}, seconds) of the linear probe (train's baseline) on one group's components."""
    started = time.perf_counter()
    train = splits == "train"
    model, fit = fit_linear_probe(X[train], labels[train])
    scores = {}
    for split in ("val", "test"):
        rows = splits == split
        if not rows.any():
            scores[split] = None
            continue
        metrics = evaluate(labels[rows], class_probabilities(model, X[rows], len(classes)), classes)
        scores[split] = {key: metrics[key] for key in SCORES}
    scores.update(fit)
    return scores, time.perf_counter() - started


def _parallel(jobs, tasks, costs):
    """The results of joblib `tasks`, in order, run on `jobs` threads costliest first.

    BLAS and OpenMP pools are capped so that jobs x threads <= cores. Threads, not processes:
    LAPACK, BLAS and lbfgs's loss release the GIL, and the groups share the covariance and the
    projected rows without copies. Costliest first, so that the longest task does not start last.
    """
    jobs = min(jobs, len(tasks))
    order = sorted(range(len(tasks)), key=lambda i: -costs[i])
    with threadpool_limits(worker_threads(jobs, cores())):
        done = joblib.Parallel(n_jobs=jobs, prefer="threads")(tasks[i] for i in order)
    results = [None] * len(tasks)
    for i, result in zip(order, done):
        results[i] = result
    return results


def _plot(report, path):
    """Horizontal bars of val and test accuracy per group, best val accuracy at the top."""
    entries = ranked(report["groups"])[::-1]  # barh draws the first entry at the bottom
    figure = Figure(figsize=(8, 1.2 + 0.45 * len(entries)))
    ax = figure.subplots()
    rows = np.arange(len(entries))
    height = 0.4
    ax.barh(rows + height / 2, [e["val"]["accuracy"] for e in entries], height, label="val")
    if report["splits"]["rows"]["test"]:
        ax.barh(rows - height / 2, [e["test"]["accuracy"] for e in entries], height, label="test")
    ax.set_yticks(rows, [f"{e['name']} ({e['input_dims']} -> {e['components']})" for e in entries])
    chance = 1 / len(report["classes"])
    ax.axvline(chance, color="gray", linestyle="--", label=f"chance (1/{len(report['classes'])})")
    ax.set(xlabel="accuracy", xlim=(0, 1), title="logistic-regression probe per tap group (dims -> PCA components)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # outside the axes: bars may reach 1.0
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
