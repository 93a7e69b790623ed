"""Stage two (b): head runs and sweeps on a reduced dir, the linear-probe baseline, their records and plots.

Scoring is in scoring.py, the leaderboard in leaderboard.py.
"""

import contextlib
import csv
import itertools
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.config import HeadConfig, ParallelConfig, load_toml, normalize_keys, sha256_json
from pipeline.engines.pool import exit_if_orphaned, task_runner
from pipeline.errors import PipelineError
from pipeline.files import (
    LockBusy,
    atomic_path,
    locked,
    make_dir,
    output_guard,
    remove,
    replace_dir,
    storage_errors,
    temp_sibling,
    write_json,
)
from pipeline.leaderboard import (
    LEADERBOARD_LOCK,
    LEADERBOARD_NAME,
    LOCKS_DIR,
    METRICS_NAME,
    read_runs,
    run_state,
    write_leaderboard,
)
from pipeline.lineage import HEAD_NAME, REPORT_NAME, link, reduced_notes, sha256_file
from pipeline.lineage import RUN_CONFIG_NAME as CONFIG_NAME
from pipeline.reduced import load_reduced
from pipeline.scoring import PROBE_MODEL, class_probabilities, fit_linear_probe, split_metrics

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_STACK = 64  # most heads in one stack: past this the step is arithmetic-bound and a stack gains little


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    kind: str  # "head" or "baseline"
    metrics: dict  # the run's metrics.json
    done_before: bool  # the run was already finished in the runs dir, so nothing was trained


def sweep_configs(path: Path | str, overrides: dict | None = None) -> list[HeadConfig]:
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
        raise PipelineError(
            f"--{clashes[0].replace('_', '-')} is given on the command line and is also a [grid] key in {path}; drop one"
        )
    configs = []
    for combination in itertools.product(*grid.values()):
        try:
            configs.append(HeadConfig(**{**tables["base"], **overrides, **dict(zip(grid, combination))}))
        except PipelineError as e:
            raise PipelineError(f"sweep file {path}: {e}") from None
    return configs


def train(
    reduced_dir: Path | str,
    runs_dir: Path | str,
    configs: list[HeadConfig],
    name: str | None = None,
    parallel: ParallelConfig = ParallelConfig(),
    on_warning: Callable[[str], None] | None = None,
    stack: bool = True,
    max_stack: int | None = None,
) -> Iterator[RunOutcome]:
    """Check everything, then return an iterator that trains the baseline and each head, yielding RunOutcomes.

    With `stack`, heads of one shape (hidden sizes, batch size) train together as one program
    (see stack.py), at most `max_stack` at a time (default: what memory allows, see
    default_max_stack); each still lands as its own run.

    The logistic-regression baseline is recorded once per reduced dir, a finished run is not
    redone (a damaged one is trained again), every run appears in `runs_dir` complete or not at
    all, and leaderboard.csv is rebuilt after every new run. `parallel` says where the runs train
    (see engines.pool); `on_warning(sentence)` hears about damaged run dirs and a reduced dir made by an old split rule
    or from features updated since.

    Other processes may train into the same runs dir at the same time: each run is claimed with
    its own lock while it trains, a run another process holds is left to it (and reported
    "already done" once it has finished), and publishing a run and rebuilding the leaderboard
    happen under one short lock.
    """
    on_warning = on_warning or (lambda sentence: None)
    data = load_reduced(Path(reduced_dir).absolute())  # absolute: workers may start elsewhere
    for note in reduced_notes(data.path, data.report):  # an old split rule, features updated since
        on_warning(note)
    runs_dir = Path(runs_dir).absolute()
    _check_trainable(data)
    finished, problems = read_runs(runs_dir)
    for problem in problems:
        on_warning(f"{problem}; it is left out of the leaderboard")
    _check_same_split(runs_dir, data, finished)
    plan = _plan(runs_dir, data, configs, name)
    if max_stack is not None and max_stack < 1:
        raise PipelineError(f"--max-stack {max_stack} must be a positive number of heads")
    return _run_all(runs_dir, data, plan, parallel, on_warning, stack, max_stack)


def _check_trainable(data):
    unlabeled = np.flatnonzero(data.labels < 0)
    if unlabeled.size:
        raise PipelineError(
            f"{data.path} has {unlabeled.size} unlabeled row(s), e.g. {data.ids[unlabeled[0]]!r}; "
            "train needs a label on every row, so label them or leave them out of the source"
        )
    if not (data.splits == "val").any():
        raise PipelineError(
            f"{data.path} has no val rows, which early stopping needs; reduce again with a --val-fraction above 0"
        )
    present = np.unique(data.labels[data.splits == "train"])
    if len(present) < 2:
        names = ", ".join(repr(str(data.classes[c])) for c in present) or "none"
        raise PipelineError(
            f"the train split of {data.path} holds one class only ({names}); a classifier needs at least two, "
            "so add images of another class to the source and extract and reduce again"
        )


def _check_same_split(runs_dir, data, finished):
    """A leaderboard compares runs on one split: refuse a reduced dir whose split differs from the existing runs'."""
    ours = data.report["splits"]["sha256"]
    for run_id, config, _ in finished:
        if config["reduced"]["split_sha256"] != ours:
            raise PipelineError(
                f"{runs_dir} holds runs on another split of the data (e.g. {run_id}, from features with other ids "
                f"or split settings than {data.path}); its leaderboard would mix them, so give another --runs"
            )


@dataclass(frozen=True)
class _PlannedRun:
    """One run to train: the baseline (config None) or a head."""

    kind: str
    run_id: str
    config: HeadConfig | None = None
    run_sha: str | None = None


def _plan(runs_dir, data, configs, name):
    """The baseline's _PlannedRun, then one per head config: readable ids, checked against runs already in `runs_dir`."""
    if name is not None and (not NAME_PATTERN.fullmatch(name) or name.startswith("baseline-") or name == LEADERBOARD_NAME):
        raise PipelineError(
            f"--name {name!r} must be letters, digits, '.', '_' or '-', not start with 'baseline-' and not be {LEADERBOARD_NAME}"
        )
    plan = [_PlannedRun("baseline", f"baseline-logreg-{data.report_sha256[:8]}")]
    for config in configs:
        run_sha = sha256_json({"head": config.to_dict(), "reduce_json_sha256": data.report_sha256})
        auto_id = f"h{'-'.join(map(str, config.hidden)) or 0}_d{config.dropout:g}_{run_sha[:8]}"
        run_id = auto_id if name is None else name if len(configs) == 1 else f"{name}_{auto_id}"
        _check_name_free(runs_dir, run_id, run_sha)
        plan.append(_PlannedRun("head", run_id, config, run_sha))
    return plan


def _check_name_free(runs_dir, run_id, run_sha, state=None):
    """Refuse a run id that an intact run of another config or reduced dir already has (`state`: its RunState, if read)."""
    state = run_state(runs_dir / run_id) if state is None else state
    if state.config is not None and state.config.get("run_sha256") != run_sha:
        raise PipelineError(
            f"run {run_id} already exists in {runs_dir} with another config or reduced dir; choose another --name"
        )


def _finished(runs_dir, planned):
    """The RunState of `planned`'s run dir (its model checked), refusing one that another config finished under the same id.

    Called again under the run's lock: another process with the same --name and another config
    may have published the run since _plan checked the name.
    """
    state = run_state(runs_dir / planned.run_id, check_model=True)
    if planned.kind == "head":
        _check_name_free(runs_dir, planned.run_id, planned.run_sha, state)
    return state


def _run_all(runs_dir, data, plan, parallel, on_warning, stack, max_stack):
    make_dir(runs_dir, "--runs")
    make_dir(runs_dir / LOCKS_DIR, "--runs")
    pending = []
    for planned in plan:
        state = _finished(runs_dir, planned)
        if state.done:
            yield RunOutcome(planned.run_id, planned.kind, state.metrics, True)
            continue
        if state.problem:
            on_warning(f"{state.problem}; training it again")
        pending.append(planned)
    if not pending:
        return
    _remember(data)
    groups = _groups(pending, data, stack, max_stack, parallel.jobs)
    with task_runner(parallel) as run:
        busy = []
        for results in run(_run_group, [(runs_dir, data.path, data.report_sha256, group, False, stack) for group in groups]):
            for result in results:
                if isinstance(result, _PlannedRun):
                    busy.append(result)
                else:
                    yield result
        if busy:  # runs another process was training: wait for it, then they are done (or ours, if it failed)
            for results in run(_run_group, [(runs_dir, data.path, data.report_sha256, [job], True, stack) for job in busy]):
                yield from results


def default_max_stack(config, input_dim, n_classes, available=None):
    """Heads of `config`'s shape per stack: those whose weights, Adam state, best snapshot and batch activations
    fit in a quarter of the available memory, at most MAX_STACK."""
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(MAX_STACK, available // 4 // stack_bytes(config, input_dim, n_classes)))


def stack_shape(config):
    """Heads of one shape can train as one stack: the same hidden sizes and batch size."""
    return tuple(config.hidden), config.batch_size


def stack_bytes(config, input_dim, n_classes):
    """Memory one head adds to a stack (float32): weights, Adam's two moments, best snapshot, gradients; a batch's activations."""
    widths = [input_dim, *config.hidden, n_classes]
    parameters = sum(a * b + b for a, b in zip(widths, widths[1:]))
    return 4 * (5 * parameters + 4 * config.batch_size * sum(widths))


def _groups(pending, data, stack, max_stack, workers):
    """The tasks: the baseline alone; with `stack`, heads of one shape in stacks of near-equal size, enough for every worker."""
    groups = [[job] for job in pending if job.kind == "baseline" or not stack]
    heads = [job for job in pending if job.kind == "head"] if stack else []
    shapes = {}
    for job in heads:
        shapes.setdefault(stack_shape(job.config), []).append(job)
    for jobs in shapes.values():
        size = max_stack or default_max_stack(jobs[0].config, data.X.shape[1], len(data.classes))
        if workers > 1:  # several smaller stacks rather than idle workers
            size = min(size, -(-len(heads) // workers))
        count = -(-len(jobs) // size)
        groups.extend(jobs[len(jobs) * k // count : len(jobs) * (k + 1) // count] for k in range(count))
    return groups


_loaded = {}  # the reduced data this process last used, by (path, reduce.json sha256): workers reuse it across runs


def _remember(data):
    _loaded.clear()
    _loaded[str(data.path), data.report_sha256] = data


def _load(reduced_dir, report_sha256):
    key = (str(reduced_dir), report_sha256)
    if key not in _loaded:
        data = load_reduced(reduced_dir)
        if data.report_sha256 != report_sha256:
            raise PipelineError(
                f"{reduced_dir} was reduced again while this sweep ran; rerun the train command to train on the new reduction"
            )
        _remember(data)
    return _loaded[key]


def _run_group(runs_dir, reduced_dir, report_sha256, jobs, wait, stack):
    """The results of one task: a stack of heads, or one run trained alone."""
    if stack and jobs[0].kind == "head":
        return _run_stack(runs_dir, reduced_dir, report_sha256, jobs, wait)
    return [_train_planned(runs_dir, reduced_dir, report_sha256, job, wait) for job in jobs]


def _run_stack(runs_dir, reduced_dir, report_sha256, jobs, wait):
    """Train the heads of `jobs` as one stack and publish each as its own run; runs held elsewhere come back as their _PlannedRun.

    Each head's files are written when it stops (its plots on a thread, off the training path)
    and it is published when they are complete.
    """
    from pipeline import head, stack

    results, mine = [], []
    with contextlib.ExitStack() as held:
        for job in jobs:
            try:
                lock = runs_dir / LOCKS_DIR / f"{job.run_id}.lock"
                held.enter_context(
                    output_guard(runs_dir / job.run_id, f"run {job.run_id} in {runs_dir}", lock_file=lock, wait=wait)
                )
            except LockBusy:
                results.append(job)
                continue
            state = _finished(runs_dir, job)
            if state.done:
                results.append(RunOutcome(job.run_id, job.kind, state.metrics, True))
                continue
            mine.append(job)
        if not mine:
            return results
        data = _load(reduced_dir, report_sha256)
        names = (
            f"runs {mine[0].run_id} … {mine[-1].run_id} in {runs_dir}" if len(mine) > 1 else f"run {mine[0].run_id} in {runs_dir}"
        )
        with storage_errors(
            names, "the runs finished so far are kept; free space (or fix the rights) and rerun the same command"
        ):
            stagings = [held.enter_context(_staging(runs_dir / job.run_id)) for job in mine]
            written = []
            started = time.perf_counter()
            with ThreadPoolExecutor(1) as plotter:  # plots and TensorBoard files, one at a time, beside the training

                def finished(index, fit):
                    job, staging = mine[index], stagings[index]
                    model = head.build_head(data.X.shape[1], len(data.classes), job.config, compile=False)
                    model.set_weights(fit.weights)
                    seconds = (time.perf_counter() - started) / len(mine)  # its share of the stack's time so far
                    plots = [plotter.submit(head.write_tensorboard, fit.history, staging / "tensorboard")]
                    metrics = _write_head(
                        runs_dir, data, job, staging, model, fit.history, fit.best_epoch, seconds, len(mine), plotter, plots
                    )
                    written.append((job, staging, metrics, plots))

                stack.fit_stack(
                    [job.config for job in mine], *data.split_rows("train"), *data.split_rows("val"), len(data.classes), finished
                )
            for job, staging, metrics, plots in written:
                for plot in plots:
                    plot.result()  # raises what drawing it raised
                _publish(runs_dir, data, staging, job.run_id)
                results.append(RunOutcome(job.run_id, job.kind, metrics, False))
    return results


def _train_planned(runs_dir, reduced_dir, report_sha256, planned, wait):
    """Train and publish one run, in whichever process runs it; a run another process holds comes back as its _PlannedRun.

    Without `wait`, a run whose lock is held is left to its holder. Under the run's lock, temp
    dirs left by a killed earlier attempt are abandoned, so they are removed.
    """
    try:
        lock = runs_dir / LOCKS_DIR / f"{planned.run_id}.lock"
        with output_guard(runs_dir / planned.run_id, f"run {planned.run_id} in {runs_dir}", lock_file=lock, wait=wait):
            state = _finished(runs_dir, planned)
            if state.done:
                return RunOutcome(planned.run_id, planned.kind, state.metrics, True)
            data = _load(reduced_dir, report_sha256)
            with storage_errors(
                f"run {planned.run_id} in {runs_dir}",
                "the runs finished so far are kept; free space (or fix the rights) and rerun the same command",
            ):
                with _staging(runs_dir / planned.run_id) as staging:
                    if planned.kind == "baseline":
                        metrics = _fit_baseline(runs_dir, data, planned, staging)
                    else:
                        metrics = _fit_head(runs_dir, data, planned, staging)
                    _publish(runs_dir, data, staging, planned.run_id)
    except LockBusy:
        return planned
    return RunOutcome(planned.run_id, planned.kind, metrics, False)


@contextlib.contextmanager
def _staging(run_dir):
    """A new uniquely named hidden dir beside `run_dir` for its files; removed afterwards unless it was published."""
    staging = temp_sibling(run_dir)
    staging.mkdir()
    try:
        yield staging
    finally:
        remove(staging)


def _publish(runs_dir, data, staging, run_id):
    """Rename a finished run into place and rebuild the leaderboard, under the runs dir's short lock.

    The split is checked again because another process may have published runs on another split
    since this one was planned. A damaged run dir of the same id is replaced.
    """
    with locked(runs_dir / LOCKS_DIR / LEADERBOARD_LOCK, f"runs directory {runs_dir}", wait=True):
        _check_same_split(runs_dir, data, read_runs(runs_dir)[0])
        exit_if_orphaned()  # a worker whose command was killed publishes nothing
        replace_dir(staging, runs_dir / run_id)
        # The run is in place now: a failure from here on must not say it was lost.
        with storage_errors(
            runs_dir / LEADERBOARD_NAME,
            f"run {run_id} is kept; free space (or fix the rights), then `pipeline runs {runs_dir}` rebuilds the leaderboard",
        ):
            write_leaderboard(runs_dir)


def _reduced_record(runs_dir, data):
    """How a run's config.json names its reduced dir: path relative to the runs dir, absolute, hashes."""
    reduced = link(data.path, REPORT_NAME, runs_dir)  # relative to the runs dir, as the leaderboard shows it
    return {**reduced.to_json("reduced"), "split_sha256": data.report["splits"]["sha256"]}


def _fit_baseline(runs_dir, data, planned, staging):
    """The linear probe (scoring.fit_linear_probe) on the same split, once per reduced dir."""
    started = time.perf_counter()
    probe, fit = fit_linear_probe(*data.split_rows("train"))
    metrics = split_metrics(data, lambda X: class_probabilities(probe, X, len(data.classes)))
    metrics.update(**fit, seconds=round(time.perf_counter() - started, 3))
    config = {
        "run_id": planned.run_id,
        "kind": "baseline",
        "model": PROBE_MODEL,
        "reduced": _reduced_record(runs_dir, data),
    }
    write_json(staging / CONFIG_NAME, config)
    write_json(staging / METRICS_NAME, metrics)
    _plot_confusion(metrics, data.classes, staging / "confusion.png")
    return metrics


def _fit_head(runs_dir, data, job, staging):
    """Fit one head alone (Keras's fit) and write its files."""
    from pipeline import head  # TensorFlow loads only here, so that `pipeline runs` stays quick

    started = time.perf_counter()
    fitted = head.fit_head(
        job.config, *data.split_rows("train"), *data.split_rows("val"), len(data.classes), staging / "tensorboard"
    )
    return _write_head(
        runs_dir, data, job, staging, fitted.model, fitted.history, fitted.best_epoch, time.perf_counter() - started
    )


def _write_head(runs_dir, data, job, staging, model, history, best_epoch, seconds, stack=None, plotter=None, plots=None):
    """A fitted head's files: config (with the model's sha256 and the stack it trained in), metrics, history, model, plots.

    With `plotter` (an executor) the plots are drawn there and their futures appended to `plots`:
    the caller waits for them before publishing.
    """
    from pipeline import head

    started = time.perf_counter()
    try:
        metrics = split_metrics(data, lambda X: head.predict_proba(model, X))
    except PipelineError as e:
        raise PipelineError(f"run {job.run_id}: {e}; the runs finished so far are kept") from None
    model.save(staging / HEAD_NAME)
    metrics.update(epochs=len(history["loss"]), best_epoch=best_epoch, seconds=round(seconds + time.perf_counter() - started, 3))
    write_json(
        staging / CONFIG_NAME,
        {
            "run_id": job.run_id,
            "kind": "head",
            "run_sha256": job.run_sha,
            "head": job.config.to_dict(),
            "reduced": _reduced_record(runs_dir, data),
            "model_sha256": sha256_file(staging / HEAD_NAME),
            "stack": stack,  # heads trained with it as one program (stack.py); None: alone, with Keras's fit
        },
    )
    write_json(staging / METRICS_NAME, metrics)
    _write_history(history, staging / "history.csv")
    drawings = [
        (_plot_curves, history, best_epoch, staging / "curves.png"),
        (_plot_confusion, metrics, data.classes, staging / "confusion.png"),
    ]
    for plot, *args in drawings:
        if plotter is None:
            plot(*args)
        else:
            plots.append(plotter.submit(plot, *args))
    return metrics


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
