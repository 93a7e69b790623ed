"""Stage two (b): head runs and sweeps on a reduced dir, the linear-probe baseline, metrics, plots, leaderboard."""

import contextlib
import csv
import itertools
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, log_loss

from pipeline.config import HeadConfig, load_toml, normalize_keys, sha256_json
from pipeline.errors import PipelineError
from pipeline.files import atomic_path, read_json, write_json
from pipeline.lineage import HEAD_NAME, REPORT_NAME, RUN_CONFIG_NAME as CONFIG_NAME, link
from pipeline.reduce import load_reduced

METRICS_NAME = "metrics.json"
LEADERBOARD_NAME = "leaderboard.csv"
BASELINE_MAX_ITER = 1000  # lbfgs iterations for the logistic-regression probe
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
METRIC_COLUMNS = ("val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1", "val_log_loss", "test_log_loss")
HEAD_COLUMNS = ("hidden", "dropout", "l2", "lr", "batch_size", "label_smoothing", "class_weight", "seed")
LEADERBOARD_COLUMNS = ("run_id", "kind", *METRIC_COLUMNS, "epochs", "seconds", *HEAD_COLUMNS, "reduced")
HIGHER_IS_BETTER = frozenset({"val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1"})


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    kind: str  # "head" or "baseline"
    metrics: dict  # the run's metrics.json
    done_before: bool  # the run was already finished in the runs dir, so nothing was trained


def sweep_configs(path, overrides=None):
    """Every HeadConfig of a sweep file: its [base] table, then each combination of its [grid] lists.

    Precedence, lowest first: HeadConfig defaults, [base], `overrides` (options given on the
    command line). An override may not also be a [grid] key.
    """
    overrides = overrides or {}
    sweep = load_toml(path, {"base", "grid"})
    options = HeadConfig.option_names()
    tables = {}
    for table in ("base", "grid"):
        value = sweep.get(table, {})
        if not isinstance(value, dict):
            raise PipelineError(f"sweep file {path}: [{table}] must be a table of head options")
        tables[table] = normalize_keys(value, f"sweep file {path}: [{table}]")
        unknown = sorted(set(tables[table]) - set(options))
        if unknown:
            raise PipelineError(
                f"sweep file {path}: key {unknown[0]!r} in [{table}] is not a head option; valid: {', '.join(options)}"
            )
    grid = tables["grid"]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise PipelineError(f"sweep file {path}: [grid] {key} must be a non-empty list of values, got {values!r}")
    clashes = sorted(set(overrides) & set(grid))
    if clashes:
        raise PipelineError(f"--{clashes[0].replace('_', '-')} is given on the command line and is also a [grid] key in {path}; drop one")
    configs = []
    for combination in itertools.product(*grid.values()):
        try:
            configs.append(HeadConfig(**{**tables["base"], **overrides, **dict(zip(grid, combination))}))
        except PipelineError as e:
            raise PipelineError(f"sweep file {path}: {e}") from None
    return configs


def train(reduced_dir, runs_dir, configs, name=None):
    """Check everything, then return an iterator that trains the baseline and each head, yielding RunOutcomes.

    The logistic-regression baseline is recorded once per reduced dir, a finished run is not
    redone, every run appears in `runs_dir` complete or not at all, and leaderboard.csv is
    rewritten after every new run.
    """
    data = load_reduced(reduced_dir)
    runs_dir = Path(runs_dir)
    _check_trainable(data)
    _check_same_split(runs_dir, data)
    plan = _plan(runs_dir, data, configs, name)
    return _run_all(runs_dir, data, plan)


def _check_trainable(data):
    unlabeled = np.flatnonzero(data.labels < 0)
    if unlabeled.size:
        raise PipelineError(
            f"{data.path} has {unlabeled.size} unlabeled row(s), e.g. {data.ids[unlabeled[0]]!r}; "
            "train needs a label on every row, so label them or leave them out of the source"
        )
    if not (data.splits == "val").any():
        raise PipelineError(f"{data.path} has no val rows, which early stopping needs; reduce again with a --val-fraction above 0")


def _check_same_split(runs_dir, data):
    """A leaderboard compares runs on one split: refuse a reduced dir whose split differs from the existing runs'."""
    ours = data.report["splits"]["sha256"]
    for run_id, config, _ in _finished_runs(runs_dir):
        if config["reduced"]["split_sha256"] != ours:
            raise PipelineError(
                f"{runs_dir} holds runs on another split of the data (e.g. {run_id}, from features with other ids "
                f"or split settings than {data.path}); its leaderboard would mix them, so give another --runs"
            )


def _plan(runs_dir, data, configs, name):
    """[(run_id, config, run_sha256)]: readable ids, checked against runs already in `runs_dir`."""
    if name is not None and (not NAME_PATTERN.fullmatch(name) or name.startswith("baseline-") or name == LEADERBOARD_NAME):
        raise PipelineError(
            f"--name {name!r} must be letters, digits, '.', '_' or '-', not start with 'baseline-' and not be {LEADERBOARD_NAME}"
        )
    plan = []
    for config in configs:
        run_sha = sha256_json({"head": config.to_dict(), "reduce_json_sha256": data.report_sha256})
        auto_id = f"h{'-'.join(map(str, config.hidden)) or 0}_d{config.dropout:g}_{run_sha[:8]}"
        run_id = auto_id if name is None else name if len(configs) == 1 else f"{name}_{auto_id}"
        existing = runs_dir / run_id / CONFIG_NAME
        if existing.is_file() and read_json(existing).get("run_sha256") != run_sha:
            raise PipelineError(f"run {run_id} already exists in {runs_dir} with another config or reduced dir; choose another --name")
        plan.append((run_id, config, run_sha))
    return plan


def _run_all(runs_dir, data, plan):
    runs_dir.mkdir(parents=True, exist_ok=True)
    yield _baseline(runs_dir, data)
    for run_id, config, run_sha in plan:
        yield _head_run(runs_dir, data, run_id, config, run_sha)


def _rows(data, split):
    mask = data.splits == split
    return data.X[mask], data.labels[mask]


def _reduced_record(runs_dir, data):
    """How a run's config.json names its reduced dir: path relative to the runs dir, absolute, hashes."""
    reduced = link(data.path, REPORT_NAME, runs_dir)  # relative to the runs dir, as the leaderboard shows it
    return {**reduced.to_json("reduced"), "split_sha256": data.report["splits"]["sha256"]}


def _baseline(runs_dir, data):
    """The scikit-learn logistic-regression linear probe on the same split, once per reduced dir."""
    run_id = f"baseline-logreg-{data.report_sha256[:8]}"
    if (runs_dir / run_id / METRICS_NAME).is_file():
        return RunOutcome(run_id, "baseline", read_json(runs_dir / run_id / METRICS_NAME), True)
    started = time.perf_counter()
    X_train, y_train = _rows(data, "train")
    probe = LogisticRegression(max_iter=BASELINE_MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded as "converged" instead
        probe.fit(X_train, y_train)

    def proba(X):
        full = np.zeros((len(X), len(data.classes)))
        full[:, probe.classes_] = probe.predict_proba(X)
        return full

    metrics = _split_metrics(data, proba)
    metrics.update(
        iterations=int(np.max(probe.n_iter_)),
        converged=bool(np.max(probe.n_iter_) < BASELINE_MAX_ITER),
        seconds=round(time.perf_counter() - started, 3),
    )
    config = {
        "run_id": run_id,
        "kind": "baseline",
        "model": {"class": "sklearn.linear_model.LogisticRegression", "max_iter": BASELINE_MAX_ITER},
        "reduced": _reduced_record(runs_dir, data),
    }
    with _new_run_dir(runs_dir, run_id) as staging:
        write_json(staging / CONFIG_NAME, config)
        write_json(staging / METRICS_NAME, metrics)
        _plot_confusion(metrics, data.classes, staging / "confusion.png")
    write_leaderboard(runs_dir)
    return RunOutcome(run_id, "baseline", metrics, False)


def _head_run(runs_dir, data, run_id, config, run_sha):
    """Fit one head and write its run dir: config, metrics, history, model, plots, TensorBoard logs."""
    if (runs_dir / run_id / METRICS_NAME).is_file():
        return RunOutcome(run_id, "head", read_json(runs_dir / run_id / METRICS_NAME), True)
    from pipeline import head  # TensorFlow loads only here, so that `pipeline runs` stays quick

    started = time.perf_counter()
    with _new_run_dir(runs_dir, run_id) as staging:
        fitted = head.fit_head(config, *_rows(data, "train"), *_rows(data, "val"), len(data.classes), staging / "tensorboard")
        metrics = _split_metrics(data, lambda X: head.predict_proba(fitted.model, X))
        metrics.update(epochs=len(fitted.history["loss"]), best_epoch=fitted.best_epoch, seconds=round(time.perf_counter() - started, 3))
        write_json(staging / CONFIG_NAME, {
            "run_id": run_id,
            "kind": "head",
            "run_sha256": run_sha,
            "head": config.to_dict(),
            "reduced": _reduced_record(runs_dir, data),
        })
        write_json(staging / METRICS_NAME, metrics)
        _write_history(fitted.history, staging / "history.csv")
        fitted.model.save(staging / HEAD_NAME)
        _plot_curves(fitted.history, fitted.best_epoch, staging / "curves.png")
        _plot_confusion(metrics, data.classes, staging / "confusion.png")
    write_leaderboard(runs_dir)
    return RunOutcome(run_id, "head", metrics, False)


def _split_metrics(data, proba):
    """Metrics on val and test (None when there are no test rows), with row counts per split."""
    metrics = {"rows": {split: int((data.splits == split).sum()) for split in ("train", "val", "test")}}
    for split in ("val", "test"):
        X, y = _rows(data, split)
        metrics[split] = evaluate(y, proba(X), data.classes) if len(y) else None
    return metrics


def evaluate(labels, proba, classes):
    """Accuracy, macro-F1, log loss, per-class report and confusion matrix of predicted probabilities."""
    proba = np.asarray(proba, dtype=np.float64)
    proba /= proba.sum(axis=1, keepdims=True)  # float32 softmax rows drift from summing to exactly 1
    predicted = proba.argmax(axis=1)
    everyone = list(range(len(classes)))
    return {
        "rows": len(labels),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "log_loss": float(log_loss(labels, proba, labels=everyone)),
        "per_class": classification_report(
            labels, predicted, labels=everyone, target_names=[str(c) for c in classes], output_dict=True, zero_division=0
        ),
        "confusion": confusion_matrix(labels, predicted, labels=everyone).tolist(),
    }


@contextlib.contextmanager
def _new_run_dir(runs_dir, run_id):
    """Yield an empty hidden dir that is renamed to runs_dir/run_id only when the block succeeds."""
    staging = runs_dir / f".{run_id}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(runs_dir / run_id)


def _finished_runs(runs_dir):
    """(run_id, config, metrics) of every complete run dir, by name."""
    if not runs_dir.is_dir():
        return []
    runs = []
    for run_dir in sorted(runs_dir.iterdir()):
        if not run_dir.name.startswith(".") and (run_dir / METRICS_NAME).is_file() and (run_dir / CONFIG_NAME).is_file():
            runs.append((run_dir.name, read_json(run_dir / CONFIG_NAME), read_json(run_dir / METRICS_NAME)))
    return runs


def write_leaderboard(runs_dir):
    """Rebuild runs_dir/leaderboard.csv from every finished run, best val accuracy first, atomically."""
    rows = sort_rows([_leaderboard_row(*run) for run in _finished_runs(runs_dir)], "val_accuracy")
    with atomic_path(runs_dir / LEADERBOARD_NAME) as tmp:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, LEADERBOARD_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def _leaderboard_row(run_id, config, metrics):
    row = dict.fromkeys(LEADERBOARD_COLUMNS, "")
    row.update(run_id=run_id, kind=config["kind"], seconds=f"{metrics['seconds']:.1f}", reduced=config["reduced"]["path"])
    for column in METRIC_COLUMNS:
        split, _, name = column.partition("_")
        if metrics[split] is not None:
            row[column] = f"{metrics[split][name]:.6f}"
    if config["kind"] == "head":
        row["epochs"] = metrics["epochs"]
        row.update({key: config["head"][key] for key in HEAD_COLUMNS})
        row["hidden"] = "-".join(map(str, config["head"]["hidden"])) or "none"
    return row


def read_leaderboard(runs_dir):
    path = Path(runs_dir) / LEADERBOARD_NAME
    if not path.is_file():
        raise PipelineError(f"{runs_dir} has no {LEADERBOARD_NAME}; train into it first with `pipeline train REDUCED --runs {runs_dir}`")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def sort_rows(rows, column):
    """Rows best first by `column` (higher first for accuracy and F1, lower first otherwise; blanks last).

    Ties go to the lower val log loss, then to the run id.
    """
    if column not in LEADERBOARD_COLUMNS:
        raise PipelineError(f"--sort {column!r} is not a leaderboard column; choose one of {', '.join(LEADERBOARD_COLUMNS)}")
    return sorted(rows, key=lambda row: (_rank(row, column), _rank(row, "val_log_loss"), row["run_id"]))


def _rank(row, column):
    """Sort key of one cell: numbers (negated where higher is better), then text, then blanks."""
    value = row[column]
    if value == "":
        return (2, 0)
    try:
        number = float(value)
    except ValueError:
        return (1, value)
    return (0, -number if column in HIGHER_IS_BETTER else number)


def _write_history(history, path):
    names = list(history)
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", *names])
            for epoch, values in enumerate(zip(*(history[n] for n in names)), start=1):
                writer.writerow([epoch, *(f"{float(v):.6g}" for v in values)])


def _plot_curves(history, best_epoch, path):
    figure = Figure(figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
        ax.plot(epochs, history[metric], label="train")
        ax.plot(epochs, history[f"val_{metric}"], label="val")
        ax.axvline(best_epoch, color="gray", linestyle="--", label=f"best epoch ({best_epoch})")
        ax.set(xlabel="epoch", title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")


def _plot_confusion(metrics, classes, path):
    """The test confusion matrix (val when there are no test rows), counts in each cell."""
    split = "test" if metrics["test"] is not None else "val"
    matrix = np.asarray(metrics[split]["confusion"])
    side = 2 + 0.45 * len(classes)
    figure = Figure(figsize=(side + 1, side))
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=ax)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, count, ha="center", va="center", fontsize=8, color="white" if count > matrix.max() / 2 else "black")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, [str(c) for c in classes], rotation=90)
    ax.set_yticks(ticks, [str(c) for c in classes])
    ax.set(xlabel="predicted", ylabel="true", title=f"{split} confusion, accuracy {metrics[split]['accuracy']:.3f}")
    figure.savefig(path, dpi=100, bbox_inches="tight")
