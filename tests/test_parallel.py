"""Sweeps whose runs train in worker processes give the metrics of sequential ones."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

SWEEP = "[base]\nepochs = 3\nbatch_size = 16\ndropout = 0.2\n[grid]\nhidden = [[8], [16, 4]]\n"  # 2 heads + the baseline


def run_files(runs):
    """{run id: (metrics.json without seconds, history.csv)} of every run dir."""
    found = {}
    for run in sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")):
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.pop("seconds")
        history = (run / "history.csv").read_text() if (run / "history.csv").exists() else None
        found[run.name] = (metrics, history)
    return found


def leaderboard_without_seconds(runs):
    with open(runs / "leaderboard.csv", newline="") as f:
        return [{key: value for key, value in row.items() if key != "seconds"} for row in csv.DictReader(f)]


def test_a_parallel_sweep_gives_the_metrics_of_a_sequential_one(features_dir, tmp_path, run_cli):
    run_cli("reduce", features_dir(n=120), "--out", tmp_path / "reduced", "--components", 6)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(SWEEP)
    sequential = run_cli("train", tmp_path / "reduced", "--runs", tmp_path / "one", "--sweep", sweep)
    parallel = run_cli("train", tmp_path / "reduced", "--runs", tmp_path / "two", "--sweep", sweep, "--jobs", 2)
    assert sorted(line.split(":")[0] for line in parallel.output.splitlines()[:-1]) == sorted(
        line.split(":")[0] for line in sequential.output.splitlines()[:-1]
    )
    one, two = run_files(tmp_path / "one"), run_files(tmp_path / "two")
    assert len(one) == 3 and one == two
    assert leaderboard_without_seconds(tmp_path / "one") == leaderboard_without_seconds(tmp_path / "two")


def test_train_jobs_below_one_is_refused(tmp_path, run_cli):
    assert "Invalid value for '--jobs'" in run_cli("train", tmp_path, "--runs", tmp_path / "runs", "--jobs", 0, code=2).output


def test_config_imports_no_engine():
    """Regression: config imported the engine names from engines/, which imports config (an import circle)."""
    import subprocess
    import sys

    code = "import sys, pipeline.config; print(sorted(m for m in sys.modules if m.startswith('pipeline.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['pipeline.config', 'pipeline.errors']"


LONG_SWEEP = "[base]\nepochs = 400\npatience = 400\nbatch_size = 8\n[grid]\nhidden = [[8], [16], [24], [32], [8, 8], [16, 8]]\n"


def _children(pid):
    """PIDs of the live (not zombie) processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _published(runs):
    return sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")) if runs.exists() else []


def test_workers_die_with_a_killed_sweep_and_publish_nothing_after(features_dir, tmp_path, run_cli):
    run_cli("reduce", features_dir(n=120), "--out", tmp_path / "reduced", "--components", 6)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(LONG_SWEEP)
    runs = tmp_path / "runs"
    command = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            str(tmp_path / "reduced"),
            "--runs",
            str(runs),
            "--sweep",
            str(sweep),
            "--jobs",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(runs.glob(".locks/h*.lock")):  # a worker has claimed a head run
        assert command.poll() is None and time.monotonic() < deadline, "no worker started a head run"
        time.sleep(0.05)
    workers = _children(command.pid)
    assert workers
    command.kill()
    command.wait()
    published = _published(runs)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {[pid for pid in workers if _alive(pid)]} outlived the killed command"
        time.sleep(0.1)
    assert _published(runs) == published and len(published) < 7
