"""Stage two (b) under faults: concurrent sweeps, damaged runs and leaderboards, full or read-only disks,
degenerate data, signals."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

from helpers import QUICK_HEAD, tree_bytes
from pipeline import leaderboard as leaderboard_module
from pipeline import train as train_module
from pipeline.config import HeadConfig
from pipeline.errors import PipelineError
from pipeline.files import leftover_temps, locked
from pipeline.reduced import load_reduced
from pipeline.train import train


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_output_is_one_sentence_for_every_command(reduced, tmp_path, run_cli, failing_writes, code):
    features, out = reduced
    run_cli("train", out, "--runs", tmp_path / "runs", *QUICK_HEAD)
    before = tree_bytes(tmp_path)
    reason = {errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied"}[code]
    with failing_writes(tmp_path, code):
        reduced_again = run_cli("reduce", features, "--out", tmp_path / "new", "--components", 4, code=1)
        trained = run_cli("train", out, "--runs", tmp_path / "runs", "--hidden", 4, "--epochs", 1, code=1)
        (tmp_path / "runs" / "leaderboard.csv").unlink()  # unlink is not a write here: a stale leaderboard to rebuild
        table = run_cli("runs", tmp_path / "runs")
    for result in (reduced_again, trained):
        assert result.output.count("Error: ") == 1 and "Traceback" not in result.output
        assert f"({reason})" in result.output and "needs a writable directory" in result.output
    assert "baseline-logreg-" in table.output and "rebuilding it failed" in table.output
    assert {k: v for k, v in tree_bytes(tmp_path).items() if k != "runs/leaderboard.csv"} == {
        k: v for k, v in before.items() if k != "runs/leaderboard.csv"
    }


def test_a_read_only_output_is_one_sentence_with_permissions(reduced, tmp_path, run_cli):
    if os.geteuid() == 0:
        pytest.skip("root writes through read-only permissions")
    features, out = reduced
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        reduced_again = run_cli("reduce", features, "--out", tmp_path / "ro" / "reduced", code=1)
        trained = run_cli("train", out, "--runs", tmp_path / "ro" / "runs", *QUICK_HEAD, code=1)
    finally:
        (tmp_path / "ro").chmod(0o700)
    for result in (reduced_again, trained):
        assert "Permission denied" in result.output and "Traceback" not in result.output


def test_one_class_in_train_is_refused_naming_it(features_dir, tmp_path, run_cli):
    """Regression: scikit-learn's LogisticRegression raised its own traceback."""
    features = features_dir(n=40, classes=("only",), shard_size=40)
    run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", 3)
    result = run_cli("train", tmp_path / "reduced", "--runs", tmp_path / "runs", *QUICK_HEAD, code=1)
    assert "holds one class only ('only'); a classifier needs at least two" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_class_with_one_image_trains_into_train_only(features_dir, tmp_path, run_cli):
    features = features_dir(n=61, classes=("a", "b", "c"), shard_size=61)
    with h5py.File(features / "shard-00000.h5", "r+") as f:  # one 'c' left: every other c becomes a
        labels = f["labels"][:]
        labels[np.flatnonzero(labels == 2)[1:]] = 0
        f["labels"][:] = labels
    run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", 3)
    data = load_reduced(tmp_path / "reduced")
    assert data.splits[data.labels == 2].tolist() == ["train"]  # 10% of one image rounds to none for val and test
    run_cli("train", tmp_path / "reduced", "--runs", tmp_path / "runs", *QUICK_HEAD)
    [run] = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("h8")]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["per_class"]["c"]["support"] == 0 and len(metrics["val"]["confusion"]) == 3


def test_all_unlabeled_rows_reduce_but_do_not_train(features_dir, tmp_path, run_cli):
    features = features_dir(n=40, shard_size=40)
    with h5py.File(features / "shard-00000.h5", "r+") as f:
        f["labels"][:] = -1
    reduced = run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", 3)
    assert "train" in reduced.output
    result = run_cli("train", tmp_path / "reduced", "--runs", tmp_path / "runs", *QUICK_HEAD, code=1)
    assert "has 40 unlabeled row(s)" in result.output


def test_an_empty_test_split_trains_with_blank_test_metrics(features_dir, tmp_path, run_cli):
    run_cli("reduce", features_dir(n=60), "--out", tmp_path / "reduced", "--components", 3, "--test-fraction", 0)
    trained = run_cli("train", tmp_path / "reduced", "--runs", tmp_path / "runs", *QUICK_HEAD)
    assert "test accuracy -" in trained.output
    rows = leaderboard_module.leaderboard(tmp_path / "runs")[0]
    assert {row["test_accuracy"] for row in rows} == {""} and all(row["val_accuracy"] for row in rows)


def test_a_run_another_process_holds_is_left_to_it_then_reported_done(reduced, tmp_path):
    """Regression: two sweeps into one runs dir deleted each other's .partial dirs, and one crashed."""
    _, out = reduced
    config = HeadConfig(hidden=(4,), epochs=1)
    first = list(train(out, tmp_path / "elsewhere", [config]))
    run_id = first[1].run_id
    runs = tmp_path / "runs"
    (runs / ".locks").mkdir(parents=True)
    theirs = runs / f".{run_id}.424242.0badc0de.tmp"  # the other process's half-written run
    theirs.mkdir()
    outcomes = []
    with locked(runs / ".locks" / f"{run_id}.lock", "the other process"):
        worker = threading.Thread(target=lambda: outcomes.extend(train(out, runs, [config])))
        worker.start()
        deadline = time.monotonic() + 120
        while not list(runs.glob("baseline-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert worker.is_alive() and theirs.is_dir()  # waiting for the lock, without touching its files
        shutil.copytree(tmp_path / "elsewhere" / run_id, runs / run_id)  # the other process publishes
    worker.join(timeout=120)
    assert [(o.run_id, o.done_before) for o in outcomes] == [(first[0].run_id, False), (run_id, True)]
    assert {row["run_id"] for row in leaderboard_module.leaderboard(runs)[0]} == {first[0].run_id, run_id}


def test_a_name_another_process_publishes_with_another_config_is_refused_not_reported_done(reduced, tmp_path):
    """Regression: both trains passed the name check, and the one that waited printed the other's metrics as "already done"."""
    _, out = reduced
    theirs, ours = HeadConfig(hidden=(4,), epochs=1), HeadConfig(hidden=(6,), epochs=1)
    list(train(out, tmp_path / "elsewhere", [theirs], name="shared"))
    runs = tmp_path / "runs"
    (runs / ".locks").mkdir(parents=True)
    outcomes, errors = [], []

    def ours_train():
        try:
            outcomes.extend(train(out, runs, [ours], name="shared"))
        except PipelineError as e:
            errors.append(str(e))

    with locked(runs / ".locks" / "shared.lock", "the other process"):
        worker = threading.Thread(target=ours_train)
        worker.start()
        deadline = time.monotonic() + 120
        while not list(runs.glob("baseline-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert worker.is_alive()  # waiting for the run's lock
        shutil.copytree(tmp_path / "elsewhere" / "shared", runs / "shared")  # the other process publishes its config
    worker.join(timeout=120)
    assert errors == [f"run shared already exists in {runs} with another config or reduced dir; choose another --name"]
    assert [o.run_id for o in outcomes] == [o.run_id for o in outcomes if o.kind == "baseline"]
    assert json.loads((runs / "shared" / "config.json").read_text())["head"]["hidden"] == [4]


@pytest.mark.slow  # two TensorFlow processes; test_a_run_another_process_holds_... checks the same logic in-process
def test_two_sweeps_into_one_runs_dir_both_finish_and_train_each_run_once(reduced, tmp_path):
    _, out = reduced
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("[base]\nepochs = 2\nbatch_size = 32\n[grid]\nhidden = [[4], [8]]\nseed = [0, 1]\n")
    argv = [sys.executable, "-m", "pipeline", "train", str(out), "--runs", str(tmp_path / "runs"), "--sweep", str(sweep)]
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    trained = [line.split(":")[0] for stdout, _ in outputs for line in stdout.splitlines() if "val accuracy" in line]
    rows = leaderboard_module.leaderboard(tmp_path / "runs")[0]
    assert len(rows) == 5 and sorted(trained) == sorted(row["run_id"] for row in rows)  # each trained by one of them
    assert not leftover_temps(tmp_path / "runs")


def test_damaged_runs_are_skipped_by_runs_and_trained_again_by_train(reduced, tmp_path, run_cli):
    _, out = reduced
    runs = tmp_path / "runs"
    run_cli("train", out, "--runs", runs, *QUICK_HEAD)
    [head] = [p for p in runs.iterdir() if p.name.startswith("h8")]
    [baseline] = [p for p in runs.iterdir() if p.name.startswith("baseline")]
    (baseline / "metrics.json").write_text('{"val": ')
    table = run_cli("runs", runs)
    assert f"run dir {baseline} is damaged (" in table.output and "left out of the table" in table.output
    assert [line.split()[0] for line in table.output.splitlines() if not line.startswith(("warning", "run_id"))] == [head.name]
    model = (head / "model.keras").read_bytes()
    (head / "model.keras").write_bytes(model[:1000])  # regression: a truncated model was "file not found"
    again = run_cli("train", out, "--runs", runs, *QUICK_HEAD)
    assert (
        f"run dir {baseline} is damaged" in again.output and f"run dir {head} is damaged (model.keras is changed)" in again.output
    )
    assert "already done" not in again.output
    assert {row["run_id"] for row in leaderboard_module.leaderboard(runs)[0]} == {head.name, baseline.name}


def test_a_corrupt_leaderboard_is_rebuilt_from_the_run_dirs(reduced, tmp_path, run_cli):
    _, out = reduced
    runs = tmp_path / "runs"
    run_cli("train", out, "--runs", runs, *QUICK_HEAD)
    intact = (runs / "leaderboard.csv").read_bytes()
    (runs / "leaderboard.csv").write_bytes(b"\x00\xffnot,a\ncsv")
    table = run_cli("runs", runs)
    assert "leaderboard.csv did not match the run dirs (damaged or out of date), so it was rebuilt from them" in table.output
    assert (runs / "leaderboard.csv").read_bytes() == intact and "*baseline*" in table.output
    assert "warning" not in run_cli("runs", runs).output


def test_disk_full_in_train_keeps_the_finished_runs_and_a_rerun_completes(reduced, tmp_path, run_cli, monkeypatch):
    _, out = reduced
    runs = tmp_path / "runs"
    real = train_module._write_history

    def full(history, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(train_module, "_write_history", full)
    result = run_cli("train", out, "--runs", runs, *QUICK_HEAD, code=1)
    assert (
        "cannot write run h8_d0.3_" in result.output
        and "no space left on device; the runs finished so far are kept" in result.output
    )
    assert "Traceback" not in result.output
    assert not leftover_temps(runs) and len(leaderboard_module.leaderboard(runs)[0]) == 1
    monkeypatch.setattr(train_module, "_write_history", real)
    rerun = run_cli("train", out, "--runs", runs, *QUICK_HEAD)
    assert "already done" in rerun.output and len(leaderboard_module.leaderboard(runs)[0]) == 2


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_runs_on_a_full_disk_prints_the_table_with_a_warning(reduced, tmp_path, run_cli, monkeypatch, code):
    """Regression: a stale leaderboard that could not be rewritten was a traceback."""
    _, out = reduced
    runs = tmp_path / "runs"
    run_cli("train", out, "--runs", runs, *QUICK_HEAD)
    (runs / "leaderboard.csv").write_text("stale\n")

    def full(runs_dir):
        raise OSError(code, os.strerror(code), str(runs_dir / "leaderboard.csv"))

    monkeypatch.setattr(leaderboard_module, "write_leaderboard", full)
    table = run_cli("runs", runs)
    assert "*baseline*" in table.output and "Traceback" not in table.output
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}[code]
    assert (
        f"does not match the run dirs, and rebuilding it failed: cannot write {runs / 'leaderboard.csv'}: {reason}"
        in table.output
    )


def test_a_leaderboard_that_cannot_be_written_after_publishing_says_the_run_is_kept(reduced, tmp_path, run_cli, monkeypatch):
    """Regression: the sentence said the failed run was not kept, though it had been renamed into place."""
    _, out = reduced
    runs = tmp_path / "runs"
    real = train_module.write_leaderboard

    def full(runs_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(runs_dir / "leaderboard.csv"))

    monkeypatch.setattr(train_module, "write_leaderboard", full)
    result = run_cli("train", out, "--runs", runs, *QUICK_HEAD, code=1)
    [baseline] = [p.name for p in runs.iterdir() if p.name.startswith("baseline-")]
    assert result.output.count("Error: ") == 1 and "Traceback" not in result.output
    assert f"cannot write {runs / 'leaderboard.csv'}: no space left on device; run {baseline} is kept;" in result.output
    assert "finished so far" not in result.output and leaderboard_module.run_state(runs / baseline).done
    monkeypatch.setattr(train_module, "write_leaderboard", real)
    assert "rebuilt from them" in run_cli("runs", runs).output
    rerun = run_cli("train", out, "--runs", runs, *QUICK_HEAD)
    assert f"{baseline}: already done" in rerun.output and len(leaderboard_module.leaderboard(runs)[0]) == 2


def test_a_head_whose_probabilities_are_not_finite_is_one_sentence_naming_the_run(reduced, tmp_path, run_cli, monkeypatch):
    """Regression: NaN probabilities (a diverged head) made log_loss raise a ValueError traceback."""
    from pipeline import head

    _, out = reduced
    runs = tmp_path / "runs"
    monkeypatch.setattr(head, "predict_proba", lambda model, X: np.full((len(X), 3), np.nan, np.float32))
    result = run_cli("train", out, "--runs", runs, *QUICK_HEAD, code=1)
    assert result.output.count("Error: ") == 1 and "Traceback" not in result.output
    assert re.search(r"run h8_d0\.3_[0-9a-f]{8}: the predicted probabilities of \d+ of \d+ rows are NaN or Inf", result.output)
    assert "try a lower --lr" in result.output and not leftover_temps(runs)
    assert [row["kind"] for row in leaderboard_module.leaderboard(runs)[0]] == ["baseline"]


def test_sigterm_mid_sweep_then_a_rerun_completes_the_leaderboard(reduced, tmp_path):
    _, out = reduced
    runs = tmp_path / "runs"
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("[base]\nepochs = 10\nbatch_size = 8\n[grid]\nhidden = [[4], [8], [16]]\n")
    argv = [sys.executable, "-m", "pipeline", "train", str(out), "--runs", str(runs), "--sweep", str(sweep)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(runs.glob(".h*.tmp")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # a head is being written
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted; rerun the same command to resume" and "Traceback" not in stderr
    assert not leftover_temps(runs)  # the interrupted run's staging dir went with it
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert len(leaderboard_module.leaderboard(runs)[0]) == 4 and "already done" in finished.stdout
