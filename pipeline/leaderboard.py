"""The runs dir's leaderboard: its columns, what a run dir holds (RunState), reading run dirs, writing and sorting leaderboard.csv."""

import csv
import io
from pathlib import Path
from typing import NamedTuple

from pipeline.errors import PipelineError, first_line
from pipeline.files import atomic_path, leftover_temps, locked, read_json, remove, storage_errors
from pipeline.lineage import HEAD_NAME, sha256_file
from pipeline.lineage import RUN_CONFIG_NAME as CONFIG_NAME

METRICS_NAME = "metrics.json"
LEADERBOARD_NAME = "leaderboard.csv"
METRIC_COLUMNS = ("val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1", "val_log_loss", "test_log_loss")
HEAD_COLUMNS = ("hidden", "dropout", "l2", "lr", "batch_size", "label_smoothing", "class_weight", "seed")
LEADERBOARD_COLUMNS = ("run_id", "kind", *METRIC_COLUMNS, "epochs", "seconds", *HEAD_COLUMNS, "reduced")
LOCKS_DIR = ".locks"  # in the runs dir: one lock file per run being trained, and LEADERBOARD_LOCK
LEADERBOARD_LOCK = "leaderboard.lock"  # held briefly to publish a run and rebuild the leaderboard
HIGHER_IS_BETTER = frozenset({"val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1"})


class RunState(NamedTuple):
    """What a run dir holds: config and metrics when it is intact, else what is wrong with it (None: no run there)."""

    config: dict | None = None
    metrics: dict | None = None
    problem: str | None = None

    @property
    def done(self):
        return self.metrics is not None


def run_state(run_dir: Path, check_model: bool = False) -> RunState:
    """The RunState of `run_dir`: both records readable and complete, and with `check_model` its model intact.

    A head run records its model.keras sha256 (runs from before that are trusted as they are).
    """
    state = _records_state(run_dir)
    if check_model and state.done and state.config["kind"] == "head":
        model = run_dir / HEAD_NAME
        recorded = state.config.get("model_sha256")
        if not model.is_file() or (recorded is not None and sha256_file(model) != recorded):
            return RunState(
                state.config,
                problem=f"run dir {run_dir} is damaged ({HEAD_NAME} is {'changed' if model.is_file() else 'missing'})",
            )
    return state


_parsed = {}  # run dir -> (_signature of its records, their RunState): publishing a run re-reads only the run dirs that changed


def _records_state(run_dir):
    """The RunState of `run_dir`'s records, parsed again only when one of them was replaced or changed since it was last read."""
    signature = _signature(run_dir)
    if signature == (None, None):
        return RunState()
    cached = _parsed.get(run_dir)
    if cached is not None and cached[0] == signature:
        return cached[1]
    state = _read_records(run_dir)
    _parsed[run_dir] = (signature, state)
    return state


def _signature(run_dir):
    """(inode, size, mtime) of config.json and of metrics.json, None for one that is not there.

    Runs are published by renaming a new dir into place, so a rewritten record is a new inode.
    """
    signature = []
    for name in (CONFIG_NAME, METRICS_NAME):
        try:
            stat = (run_dir / name).stat()
        except OSError:
            signature.append(None)
        else:
            signature.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def _read_records(run_dir):
    try:
        config, metrics = read_json(run_dir / CONFIG_NAME), read_json(run_dir / METRICS_NAME)
        _leaderboard_row(run_dir.name, config, metrics)  # every field the leaderboard needs is there
        config["reduced"]["split_sha256"]  # and the split check
    except (OSError, ValueError) as e:
        return RunState(problem=f"run dir {run_dir} is damaged ({first_line(e)})")
    except (KeyError, TypeError, IndexError) as e:
        return RunState(problem=f"run dir {run_dir} is damaged (its records lack {e})")
    return RunState(config, metrics)


def read_runs(runs_dir: Path) -> tuple[list, list[str]]:
    """([(run_id, config, metrics)] of every intact run dir by name, [what is wrong with each damaged one])."""
    if not runs_dir.is_dir():
        return [], []
    runs, problems = [], []
    for run_dir in sorted(runs_dir.iterdir()):
        if run_dir.name.startswith("."):
            continue
        state = run_state(run_dir)
        if state.done:
            runs.append((run_dir.name, state.config, state.metrics))
        elif state.problem:
            problems.append(state.problem)
    return runs, problems


def _leaderboard_text(runs):
    """leaderboard.csv's text for (run_id, config, metrics) runs, best val accuracy first."""
    out = io.StringIO()
    writer = csv.DictWriter(out, LEADERBOARD_COLUMNS)
    writer.writeheader()
    writer.writerows(sort_rows([_leaderboard_row(*run) for run in runs], "val_accuracy"))
    return out.getvalue()


def write_leaderboard(runs_dir: Path) -> None:
    """Rebuild runs_dir/leaderboard.csv from every intact run, best val accuracy first, atomically.

    Callers hold the runs dir's lock, so temp files of that name are a killed writer's.
    """
    for leftover in leftover_temps(runs_dir, LEADERBOARD_NAME):
        remove(leftover)
    text = _leaderboard_text(read_runs(runs_dir)[0])
    with atomic_path(runs_dir / LEADERBOARD_NAME) as tmp:
        tmp.write_bytes(text.encode())


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


def leaderboard(runs_dir: Path | str) -> tuple[list[dict], list[str]]:
    """(rows best val accuracy first, warnings) of every intact run of `runs_dir`, for `pipeline runs`.

    The rows come from the run dirs themselves: a damaged one is left out with a warning, and a
    leaderboard.csv that does not say what they say (damaged, or edited) is rebuilt from them.
    """
    runs_dir = Path(runs_dir)
    path = runs_dir / LEADERBOARD_NAME
    runs, problems = read_runs(runs_dir)
    if not runs and not path.is_file():
        raise PipelineError(
            f"{runs_dir} has no {LEADERBOARD_NAME}; train into it first with `pipeline train REDUCED --runs {runs_dir}`"
        )
    warnings_ = [f"{problem}; left out of the table" for problem in problems]
    text = _leaderboard_text(runs)
    try:
        current = path.read_bytes().decode()
    except (OSError, UnicodeDecodeError):
        current = None
    if current != text:
        try:
            with locked(runs_dir / LOCKS_DIR / LEADERBOARD_LOCK, f"runs directory {runs_dir}", wait=True):
                with storage_errors(path, "the table is built from the run dirs all the same"):
                    write_leaderboard(runs_dir)
            warnings_.append(f"{path} did not match the run dirs (damaged or out of date), so it was rebuilt from them")
        except PipelineError as e:
            warnings_.append(f"{path} does not match the run dirs, and rebuilding it failed: {e}")
    return list(csv.DictReader(io.StringIO(text))), warnings_  # as leaderboard.csv reads: every cell a string


def sort_rows(rows: list[dict], column: str) -> list[dict]:
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
