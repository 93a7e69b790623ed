"""Stage two (b): heads, runs, sweeps, the baseline and the leaderboard."""

import csv
import json

import h5py
import keras
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from pipeline import leaderboard as leaderboard_module
from pipeline import train as train_module
from pipeline.config import HeadConfig, ReduceConfig
from pipeline.errors import PipelineError
from pipeline.leaderboard import leaderboard as leaderboard_rows
from pipeline.leaderboard import sort_rows
from pipeline.reduce import reduce_features
from pipeline.reduced import load_reduced
from pipeline.scoring import evaluate
from pipeline.train import sweep_configs, train

QUICK = dict(hidden=(16,), epochs=4, batch_size=32)


@pytest.fixture
def reduced_dir(features_dir, tmp_path):
    """Factory: reduce a fresh synthetic features dir; keyword arguments go to ReduceConfig."""

    def make(name="reduced", features=None, **settings):
        features = features or features_dir(n=150, name=f"features-{name}")
        reduce_features(features, tmp_path / name, ReduceConfig(**{"components": 8, **settings}))
        return tmp_path / name

    return make


def leaderboard(runs):
    with open(runs / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


def comparable(metrics):
    """metrics.json without the wall-clock time."""
    return {key: value for key, value in metrics.items() if key != "seconds"}


# --- sweeps


def write_sweep(tmp_path, text):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def test_sweep_is_every_grid_combination_on_top_of_base_and_flags(tmp_path):
    path = write_sweep(
        tmp_path,
        """
[base]
epochs = 7
dropout = 0.1
lr = 1
[grid]
hidden = [[256], [512, 128]]
seed = [0, 1, 2]
""",
    )
    configs = sweep_configs(path, overrides={"dropout": 0.4})
    assert len(configs) == 6
    assert {(c.hidden, c.seed) for c in configs} == {(h, s) for h in [(256,), (512, 128)] for s in (0, 1, 2)}
    assert {(c.epochs, c.dropout, c.lr) for c in configs} == {(7, 0.4, 1.0)}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[grid]\ndropuot = [0.1]\n", "key 'dropuot' in \\[grid\\] is not a head option; valid: hidden, dropout"),
        ("[base]\nwidth = 3\n", "key 'width' in \\[base\\] is not a head option"),
        ("[grid]\ndropout = 0.1\n", "\\[grid\\] dropout must be a non-empty list"),
        ("[grid]\ndropout = [0.1, 1.5]\n", "dropout 1.5 must be in \\[0, 1\\)"),
        ("[grid]\nlr = ['fast']\n", "lr 'fast' must be a number"),
        ("[search]\nlr = [1]\n", "unknown key\\(s\\) search"),
    ],
)
def test_bad_sweep_files_are_one_clear_error(tmp_path, text, message):
    with pytest.raises(PipelineError, match=message):
        sweep_configs(write_sweep(tmp_path, text))


def test_a_flag_cannot_also_be_a_grid_key(tmp_path):
    with pytest.raises(PipelineError, match="--dropout is given on the command line and is also a \\[grid\\] key"):
        sweep_configs(write_sweep(tmp_path, "[grid]\ndropout = [0.1]\n"), overrides={"dropout": 0.2})


# --- runs


def test_a_run_writes_every_output_and_is_not_redone(reduced_dir, tmp_path):
    reduced, runs = reduced_dir(), tmp_path / "runs"
    outcomes = list(train(reduced, runs, [HeadConfig(**QUICK)]))
    assert [(o.kind, o.done_before) for o in outcomes] == [("baseline", False), ("head", False)]
    run = runs / outcomes[1].run_id
    assert outcomes[1].run_id.startswith("h16_d0.3_")
    assert {"config.json", "metrics.json", "history.csv", "model.keras", "curves.png", "confusion.png", "tensorboard"} <= {
        p.name for p in run.iterdir()
    }
    assert list((run / "tensorboard" / "validation").glob("events.out.tfevents.*"))

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rows"] == {"train": 121, "val": 18, "test": 11}
    for split in ("val", "test"):
        assert {"accuracy", "macro_f1", "log_loss", "per_class", "confusion"} <= set(metrics[split])
        assert np.sum(metrics[split]["confusion"]) == metrics["rows"][split]
    assert set(metrics["val"]["per_class"]) >= {"a", "b", "c", "macro avg"}
    with open(run / "history.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == metrics["epochs"] == 4

    config = json.loads((run / "config.json").read_text())
    assert config["head"]["hidden"] == [16]
    assert config["reduced"]["path"] == "../reduced"
    data = load_reduced(reduced)
    assert config["reduced"]["reduce_json_sha256"] == data.report_sha256

    model = keras.models.load_model(run / "model.keras")
    test = data.X[data.splits == "test"]
    accuracy = np.mean(model.predict(test, verbose=0).argmax(axis=1) == data.labels[data.splits == "test"])
    assert accuracy == pytest.approx(metrics["test"]["accuracy"])

    again = list(train(reduced, runs, [HeadConfig(**QUICK)]))
    assert [o.done_before for o in again] == [True, True]
    assert sorted(p.name for p in runs.iterdir()) == sorted([".locks", outcomes[0].run_id, outcomes[1].run_id, "leaderboard.csv"])


def test_a_rerun_with_the_same_seed_gives_the_same_metrics(reduced_dir, tmp_path):
    reduced = reduced_dir()
    config = HeadConfig(hidden=(32, 8), dropout=0.2, epochs=6, batch_size=16, class_weight="balanced", label_smoothing=0.1)
    runs = [list(train(reduced, tmp_path / f"runs{i}", [config]))[1] for i in range(2)]
    assert runs[0].run_id == runs[1].run_id
    assert comparable(runs[0].metrics) == comparable(runs[1].metrics)
    histories = [(tmp_path / f"runs{i}" / runs[i].run_id / "history.csv").read_text() for i in range(2)]
    assert histories[0] == histories[1]
    other_seed = list(train(reduced, tmp_path / "runs2", [HeadConfig(**{**config.to_dict(), "seed": 1})]))[1]
    assert other_seed.metrics["val"]["log_loss"] != runs[0].metrics["val"]["log_loss"]


def test_early_stopping_keeps_the_best_epoch(features_dir, reduced_dir, tmp_path):
    # Six classes seen through one component overlap, so a big step size overfits within a few epochs.
    overlapping = reduced_dir(features=features_dir(n=300, classes=tuple("abcdef")), components=1)
    config = HeadConfig(hidden=(64,), dropout=0.0, l2=0.0, lr=0.05, epochs=40, patience=3, batch_size=16)
    head_run = list(train(overlapping, tmp_path / "runs", [config]))[1]
    metrics = head_run.metrics
    with open(tmp_path / "runs" / head_run.run_id / "history.csv", newline="") as f:
        val_loss = [float(row["val_loss"]) for row in csv.DictReader(f)]
    assert metrics["epochs"] < 40
    assert metrics["best_epoch"] == int(np.argmin(val_loss)) + 1 < metrics["epochs"]
    assert metrics["val"]["log_loss"] == pytest.approx(min(val_loss), rel=1e-3)


def test_baseline_is_a_logistic_regression_recorded_once_per_reduced_dir(reduced_dir, tmp_path):
    reduced, runs = reduced_dir(), tmp_path / "runs"
    list(train(reduced, runs, []))
    list(train(reduced, runs, [HeadConfig(**QUICK)]))
    rows = leaderboard(runs)
    baselines = [row for row in rows if row["kind"] == "baseline"]
    assert len(rows) == 2 and len(baselines) == 1

    data = load_reduced(reduced)
    probe = LogisticRegression(max_iter=1000).fit(data.X[data.splits == "train"], data.labels[data.splits == "train"])
    val = data.splits == "val"
    assert float(baselines[0]["val_accuracy"]) == pytest.approx(probe.score(data.X[val], data.labels[val]), abs=1e-6)

    fewer_components = reduced_dir(name="reduced4", features=tmp_path / "features-reduced", components=4)
    list(train(fewer_components, runs, []))
    assert sum(row["kind"] == "baseline" for row in leaderboard(runs)) == 2


def test_a_named_run_is_skipped_when_done_and_refused_when_different(reduced_dir, tmp_path):
    reduced, runs = reduced_dir(), tmp_path / "runs"
    first = list(train(reduced, runs, [HeadConfig(**QUICK)], name="mine"))[1]
    assert first.run_id == "mine"
    assert list(train(reduced, runs, [HeadConfig(**QUICK)], name="mine"))[1].done_before
    with pytest.raises(PipelineError, match="run mine already exists .* choose another --name"):
        train(reduced, runs, [HeadConfig(**{**QUICK, "dropout": 0.0})], name="mine")
    for reserved in ("baseline-x", "leaderboard.csv"):
        with pytest.raises(PipelineError, match=f"--name '{reserved}' must be .* not be leaderboard.csv"):
            train(reduced, runs, [HeadConfig(**QUICK)], name=reserved)


@pytest.mark.parametrize("stacked", [True, False])
def test_a_failed_run_leaves_no_trace(reduced_dir, tmp_path, monkeypatch, stacked):
    from pipeline import head, stack

    def broken_fit(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(*(stack, "fit_stack") if stacked else (head, "fit_head"), broken_fit)
    runs = tmp_path / "runs"
    outcomes = train(reduced_dir(), runs, [HeadConfig(**QUICK), HeadConfig(**{**QUICK, "seed": 1})], stack=stacked)
    baseline = next(outcomes)
    with pytest.raises(RuntimeError, match="out of memory"):
        next(outcomes)
    assert sorted(p.name for p in runs.iterdir()) == sorted([".locks", baseline.run_id, "leaderboard.csv"])


def test_unlabeled_rows_are_refused_by_train_but_reduced(features_dir, reduced_dir, tmp_path):
    features = features_dir(n=150)
    with h5py.File(features / "shard-00000.h5", "r+") as f:
        f["labels"][3] = -1
    reduced = reduced_dir(features=features)
    assert (load_reduced(reduced).labels == -1).sum() == 1
    with pytest.raises(PipelineError, match="has 1 unlabeled row\\(s\\), e.g. 'img00003.png'; train needs a label"):
        train(reduced, tmp_path / "runs", [HeadConfig(**QUICK)])
    assert not (tmp_path / "runs").exists()


def test_runs_on_another_split_are_not_mixed_into_a_leaderboard(features_dir, reduced_dir, tmp_path):
    features = features_dir(n=150)
    runs = tmp_path / "runs"
    list(train(reduced_dir(features=features), runs, []))
    other_split = reduced_dir(name="seed1", features=features, split_seed=1)
    with pytest.raises(PipelineError, match="holds runs on another split of the data"):
        train(other_split, runs, [])


def test_no_val_rows_is_refused(reduced_dir, tmp_path):
    with pytest.raises(PipelineError, match="has no val rows"):
        train(reduced_dir(val_fraction=0.0), tmp_path / "runs", [])


# --- leaderboard


def test_leaderboard_sorts_best_first_with_ties_to_lower_loss_and_blanks_last():
    rows = [
        {"run_id": "a", "val_accuracy": "0.90", "val_log_loss": "0.30", "epochs": "5"},
        {"run_id": "b", "val_accuracy": "0.95", "val_log_loss": "0.20", "epochs": "9"},
        {"run_id": "c", "val_accuracy": "0.90", "val_log_loss": "0.25", "epochs": ""},
    ]
    assert [r["run_id"] for r in sort_rows(rows, "val_accuracy")] == ["b", "c", "a"]
    assert [r["run_id"] for r in sort_rows(rows, "val_log_loss")] == ["b", "c", "a"]
    assert [r["run_id"] for r in sort_rows(rows, "epochs")] == ["a", "b", "c"]
    with pytest.raises(PipelineError, match="--sort 'speed' is not a leaderboard column; choose one of run_id, kind"):
        sort_rows(rows, "speed")


def test_leaderboard_is_written_after_every_run(reduced_dir, tmp_path, monkeypatch):
    counts = []
    real_write = train_module.write_leaderboard

    def counting_write(runs_dir):
        real_write(runs_dir)
        counts.append(len(leaderboard(runs_dir)))

    monkeypatch.setattr(train_module, "write_leaderboard", counting_write)
    configs = [HeadConfig(**{**QUICK, "epochs": 2, "seed": seed}) for seed in (0, 1)]
    list(train(reduced_dir(), tmp_path / "runs", configs))
    assert counts == [1, 2, 3]
    assert [row["kind"] for row in leaderboard_rows(tmp_path / "runs")[0]].count("head") == 2


def test_publishing_a_run_reads_each_run_dir_once(reduced_dir, tmp_path, monkeypatch):
    """Regression: every publish read every run dir twice (the split check, then the leaderboard), O(N^2) reads per sweep."""
    reads = []
    real_read = leaderboard_module.read_json

    def counting_read(path):
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(leaderboard_module, "read_json", counting_read)
    configs = [HeadConfig(**{**QUICK, "epochs": 1, "seed": seed}) for seed in range(3)]
    outcomes = list(train(reduced_dir(), tmp_path / "runs", configs))
    assert len(outcomes) == 4 and len(leaderboard(tmp_path / "runs")) == 4
    assert sorted(reads) == sorted(
        tmp_path / "runs" / o.run_id / name for o in outcomes for name in ("config.json", "metrics.json")
    )
    (tmp_path / "runs" / outcomes[1].run_id / "metrics.json").write_text("{}")  # a changed record is read again
    assert leaderboard_module.run_state(tmp_path / "runs" / outcomes[1].run_id).problem is not None


def test_evaluate_leaves_the_callers_probabilities_as_they_were():
    """Regression: evaluate normalised float64 probabilities in the caller's array."""
    proba = np.array([[0.2, 0.2], [0.9, 0.3], [0.1, 0.5]])
    before = proba.copy()
    metrics = evaluate(np.array([0, 0, 1]), proba, ["a", "b"])
    np.testing.assert_array_equal(proba, before)
    assert metrics["accuracy"] == 1.0 and metrics["rows"] == 3


# --- command line


def test_cli_train_then_runs_prints_the_table(reduced_dir, tmp_path, run_cli):
    reduced, runs = reduced_dir(), tmp_path / "runs"
    sweep = write_sweep(tmp_path, "[base]\nepochs = 3\nbatch_size = 32\n[grid]\nhidden = [[8], [16, 8]]\n")
    trained = run_cli("train", reduced, "--runs", runs, "--sweep", sweep, "--dropout", "0.1", "--name", "demo")
    lines = trained.output.splitlines()
    assert lines[0].startswith("baseline-logreg-") and "(linear probe" in lines[0]
    assert lines[1].startswith("demo_h8_d0.1_") and "3 epochs" in lines[1]
    assert lines[2].startswith("demo_h16-8_d0.1_")

    table = run_cli("runs", runs, "--sort", "test_log_loss", "--top", "2")
    header, *body = table.output.splitlines()
    assert header.split()[:3] == ["run_id", "kind", "val_accuracy"] and header.split()[-1] == "test_log_loss"
    assert len(body) == 3 and body[-1] == "(1 more; raise --top to see them)"
    full = run_cli("runs", runs).output
    assert sum("*baseline*" in line for line in full.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--sort", "speed"], "--sort 'speed' is not a leaderboard column", 1),
        (["--top", "0"], "Invalid value for '--top'", 2),
    ],
)
def test_cli_runs_bad_options(reduced_dir, tmp_path, run_cli, args, message, code):
    list(train(reduced_dir(), tmp_path / "runs", []))
    assert message in run_cli("runs", tmp_path / "runs", *args, code=code).output


def test_cli_errors_are_one_sentence_and_write_nothing(tmp_path, reduced_dir, run_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no leaderboard.csv; train into it first" in run_cli("runs", empty, code=1).output
    assert "is not a reduced directory" in run_cli("train", empty, "--runs", tmp_path / "runs", code=1).output
    sweep = write_sweep(tmp_path, "[grid]\nwidth = [1, 2]\n")
    result = run_cli("train", reduced_dir(), "--runs", tmp_path / "runs", "--sweep", sweep, code=1)
    assert "key 'width' in [grid] is not a head option" in result.output
    result = run_cli("train", reduced_dir(name="r2"), "--runs", tmp_path / "runs", "--dropout", "1.2", code=2)
    assert "Invalid value for '--dropout'" in result.output
    assert not (tmp_path / "runs").exists()
