"""The reduced/ format, as shards.py is for features/: its file names, writing reduced.h5, loading it, damage checks."""

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline import shards
from pipeline.errors import PipelineError
from pipeline.files import LockBusy, lock_beside, locked
from pipeline.lineage import REDUCED_FORMAT, REPORT_NAME, TRANSFORM_NAME, check_sha256, parse_record, read_hashed, sha256_file
from pipeline.splits import SPLITS  # noqa: F401 (reduced.h5 holds one of these for every row)

REDUCED_NAME = "reduced.h5"
PLOT_NAME = "explained_variance.png"
OUTPUT_NAMES = (REDUCED_NAME, TRANSFORM_NAME, PLOT_NAME, REPORT_NAME)
CHECKED_OUTPUTS = (REDUCED_NAME, TRANSFORM_NAME)  # what later stages load: reduce.json records their sha256


def write_reduced(
    path: Path,
    ids: list[str],
    labels: np.ndarray,
    splits: np.ndarray,
    components: int,
    chunks: Iterable[np.ndarray],
    config_sha256: str,
) -> None:
    """reduced.h5: ids, labels, splits and X from `chunks` of reduced rows in order; no timestamps, so reruns give the same bytes."""
    with shards.create_h5(path) as f:
        shards.create_dataset(f, "ids", np.asarray(ids, dtype=object))
        shards.create_dataset(f, "labels", np.asarray(labels, dtype=np.int32))
        shards.create_dataset(f, "splits", np.asarray(splits, dtype=object))
        X = f.create_dataset("X", shape=(len(ids), components), dtype=np.float32, track_times=False, fletcher32=True, chunks=True)
        start = 0
        for chunk in chunks:
            X[start : start + len(chunk)] = chunk
            start += len(chunk)
        f.attrs["format"] = REDUCED_FORMAT
        f.attrs["config_sha256"] = config_sha256


def output_damage(reduced_dir: Path, report: dict) -> str | None:
    """What is missing or changed among a reduced dir's outputs (a sentence's start), or None when they are intact.

    A reduced dir written before reduce.json recorded its outputs' sha256 only needs a reduced.h5 that opens.
    """
    missing = [name for name in OUTPUT_NAMES if not (reduced_dir / name).is_file()]
    if missing:
        return f"{reduced_dir} lacks {', '.join(missing)}"
    if "outputs" not in report:
        try:
            with h5py.File(reduced_dir / REDUCED_NAME, "r") as f:
                f["X"].shape  # noqa: B018 (opening the dataset is the check)
        except (OSError, KeyError) as e:
            return f"{reduced_dir / REDUCED_NAME} cannot be read ({str(e).splitlines()[0]})"
    for name, recorded in report.get("outputs", {}).items():
        actual = sha256_file(reduced_dir / name)
        if actual != recorded:
            return f"{reduced_dir / name} is damaged (sha256 {actual[:12]}, but {REPORT_NAME} recorded {recorded[:12]})"
    return None


@dataclass(frozen=True)
class Reduced:
    """A reduced dir loaded into memory for training."""

    path: Path
    report: dict
    report_sha256: str  # of reduce.json's bytes
    ids: list[str]
    labels: np.ndarray
    splits: np.ndarray
    X: np.ndarray

    @property
    def classes(self):
        return self.report["classes"]

    def split_rows(self, split):
        """(X, labels) of the rows in `split`."""
        mask = self.splits == split
        return self.X[mask], self.labels[mask]


def load_reduced(reduced_dir: Path | str) -> Reduced:
    """Read reduced.h5 and reduce.json, failing with one sentence if this is not a finished, intact reduced dir.

    reduce.json is read once, and its sha256 is of the bytes parsed; the whole load holds a shared
    lock beside the dir (reduce's lock), so a reduce cannot replace the dir between the reads.
    """
    reduced_dir = Path(reduced_dir)
    report_path = reduced_dir / REPORT_NAME
    if not report_path.is_file() or not (reduced_dir / REDUCED_NAME).is_file():
        raise PipelineError(
            f"{reduced_dir} is not a reduced directory (it needs {REPORT_NAME} and {REDUCED_NAME}); run `pipeline reduce` first"
        )
    rerun = "rerun the same `pipeline reduce` command to rebuild it"
    with _reading(reduced_dir):
        try:
            report_bytes, report_sha256 = read_hashed(report_path)
        except OSError as e:
            raise PipelineError(f"{report_path} is not readable ({e.strerror}); {rerun} (with --overwrite)") from None
        report = parse_record(report_path, report_bytes, REDUCED_FORMAT, f"{rerun} (with --overwrite)")
        check_sha256(reduced_dir / REDUCED_NAME, report.get("outputs", {}).get(REDUCED_NAME), REPORT_NAME, rerun)
        try:
            with h5py.File(reduced_dir / REDUCED_NAME, "r") as f:
                data = Reduced(
                    path=reduced_dir,
                    report=report,
                    report_sha256=report_sha256,
                    ids=f["ids"].asstr()[:].tolist(),
                    labels=f["labels"][:],
                    splits=f["splits"].asstr()[:],
                    X=f["X"][:],
                )
        except (OSError, KeyError) as e:  # a reduced dir from before the sha256 was recorded
            raise PipelineError(
                f"cannot read {reduced_dir / REDUCED_NAME} ({str(e).splitlines()[0]}); {rerun} with --overwrite"
            ) from None
    return data


@contextlib.contextmanager
def _reading(reduced_dir):
    """A shared lock on reduce's lock file beside `reduced_dir` for the block; a reduce writing it is one sentence.

    Where the lock file cannot be made (a read-only parent), no reduce can replace the dir either,
    so it is read without the lock.
    """
    lock = lock_beside(reduced_dir)
    try:
        with open(lock, "ab"):
            pass
    except OSError:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(lock, f"reduced directory {reduced_dir}", shared=True))
        except LockBusy as e:  # a plain PipelineError: train reads LockBusy as "this run is busy"
            raise PipelineError(str(e)) from None
        yield
