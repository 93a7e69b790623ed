"""`train` with stacks: heads of one shape train as one program, and each still lands as an ordinary run."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import train as train_module
from pipeline.config import HeadConfig, ReduceConfig
from pipeline.reduce import reduce_features
from pipeline.train import train

FILES = {"config.json", "metrics.json", "history.csv", "model.keras", "curves.png", "confusion.png", "tensorboard"}


@pytest.fixture
def reduced(features_dir, tmp_path):
    reduce_features(features_dir(n=150), tmp_path / "reduced", ReduceConfig(components=8))
    return tmp_path / "reduced"


def write_sweep(tmp_path, text):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def without_seconds(metrics):
    return {key: value for key, value in metrics.items() if key != "seconds"}


def head_lines(output):
    return [line for line in output.splitlines() if "heads]" in line]


def test_stacked_runs_equal_no_stack_runs_without_dropout_and_are_the_same_runs(reduced, tmp_path, run_cli):
    """Four heads that differ in all a stack allows: with dropout 0, --stack and --no-stack train the same weights."""
    sweep = write_sweep(
        tmp_path,
        (
            "[base]\nhidden = [16, 8]\ndropout = 0.0\nepochs = 3\npatience = 10\nbatch_size = 32\n"
            "[grid]\nlr = [0.001, 0.01]\nseed = [0, 1]\n"
        ),
    )
    stacked = run_cli(
        "train",
        reduced,
        "--runs",
        tmp_path / "stacked",
        "--sweep",
        sweep,
        "--label-smoothing",
        "0.1",
        "--class-weight",
        "balanced",
    )
    run_cli(
        "train",
        reduced,
        "--runs",
        tmp_path / "solo",
        "--sweep",
        sweep,
        "--label-smoothing",
        "0.1",
        "--class-weight",
        "balanced",
        "--no-stack",
    )
    assert [line.endswith(f"[{i}/4 heads]") for i, line in enumerate(head_lines(stacked.output), 1)] == [True] * 4
    ids = sorted(p.name for p in (tmp_path / "stacked").iterdir() if not p.name.startswith((".", "baseline", "leader")))
    assert ids == sorted(p.name for p in (tmp_path / "solo").iterdir() if not p.name.startswith((".", "baseline", "leader")))
    assert len(ids) == 4
    for run_id in ids:
        ours, theirs = tmp_path / "stacked" / run_id, tmp_path / "solo" / run_id
        assert FILES <= {p.name for p in ours.iterdir()}
        assert (
            {p.name for p in (ours / "tensorboard").iterdir()}
            == {p.name for p in (theirs / "tensorboard").iterdir()}
            == {"train", "validation"}
        )
        config, solo_config = (json.loads((run / "config.json").read_text()) for run in (ours, theirs))
        assert (config["stack"], solo_config["stack"]) == (4, None)
        assert {k: v for k, v in config.items() if k not in ("stack", "model_sha256")} == {
            k: v for k, v in solo_config.items() if k not in ("stack", "model_sha256")
        }
        for a, b in zip(*(keras.models.load_model(run / "model.keras").get_weights() for run in (theirs, ours)), strict=True):
            assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
        metrics, solo_metrics = (json.loads((run / "metrics.json").read_text()) for run in (ours, theirs))
        assert (metrics["epochs"], metrics["best_epoch"]) == (solo_metrics["epochs"], solo_metrics["best_epoch"])
        assert metrics["val"]["log_loss"] == pytest.approx(solo_metrics["val"]["log_loss"], rel=1e-5)
    # a run is a run: the other mode finds them done, and `runs` lists them alike
    again = run_cli(
        "train",
        reduced,
        "--runs",
        tmp_path / "stacked",
        "--sweep",
        sweep,
        "--label-smoothing",
        "0.1",
        "--class-weight",
        "balanced",
        "--no-stack",
    )
    assert all("already done" in line for line in again.output.splitlines()[:5])
    table = run_cli("runs", tmp_path / "stacked").output
    assert all(run_id in table for run_id in ids)


def test_a_stack_with_dropout_gives_the_same_metrics_on_every_rerun(reduced, tmp_path):
    configs = [HeadConfig(hidden=(16,), dropout=0.3, epochs=4, batch_size=16, seed=seed) for seed in (0, 1)]
    first, second = (list(train(reduced, tmp_path / f"runs{i}", configs))[1:] for i in range(2))
    assert [o.run_id for o in first] == [o.run_id for o in second]
    assert [without_seconds(o.metrics) for o in first] == [without_seconds(o.metrics) for o in second]
    for outcome in first:
        histories = [(tmp_path / f"runs{i}" / outcome.run_id / "history.csv").read_text() for i in range(2)]
        assert histories[0] == histories[1]


def test_heads_group_by_shape_into_stacks_of_at_most_max_stack(reduced, tmp_path):
    configs = [
        HeadConfig(hidden=hidden, batch_size=batch, epochs=1, seed=seed)
        for hidden in ((8,), (8, 4))
        for batch in (16, 32)
        for seed in range(3)
    ]
    outcomes = list(train(reduced, tmp_path / "runs", configs, max_stack=2))
    stacks = [json.loads((tmp_path / "runs" / o.run_id / "config.json").read_text())["stack"] for o in outcomes[1:]]
    assert sorted(stacks) == [1] * 4 + [2] * 8  # 4 shapes of 3 heads: a stack of 2 and one of 1 each


def test_stacks_split_so_that_every_job_has_one():
    heads = [train_module._PlannedRun("head", f"h{i}", HeadConfig(hidden=(8,), seed=i)) for i in range(6)]
    groups = train_module._groups(heads, None, True, 64, workers=4)
    assert sorted(len(g) for g in groups) == [2, 2, 2]  # ceil(6 / 4) heads a stack
    assert sorted(len(g) for g in train_module._groups(heads, None, False, 64, workers=1)) == [1] * 6
    assert train_module.default_max_stack(HeadConfig(), 256, 10, available=1 << 40) == train_module.MAX_STACK
    assert train_module.default_max_stack(HeadConfig(), 256, 10, available=0) == 1


def test_max_stack_must_be_positive(reduced, tmp_path, run_cli):
    result = run_cli("train", reduced, "--runs", tmp_path / "runs", "--max-stack", "0", code=2)
    assert "Invalid value for '--max-stack'" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stack", ["--stack", "--no-stack"])
def test_a_full_disk_under_the_tensorboard_writer_is_one_sentence(reduced, tmp_path, run_cli, monkeypatch, stack):
    """TensorFlow's summary writer reports ENOSPC as ResourceExhaustedError from CreateSummaryFileWriter."""

    def full(logdir, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(
            None,
            None,
            f"{{{{function_node CreateSummaryFileWriter}}}} {logdir}: No space left on device [Op:CreateSummaryFileWriter]",
        )

    import tensorflow.summary as keras_summary  # how keras.callbacks.TensorBoard reaches it, which need not be tf.summary

    for module in {id(tf.summary): tf.summary, id(keras_summary): keras_summary}.values():
        monkeypatch.setattr(module, "create_file_writer", full)
    result = run_cli("train", reduced, "--runs", tmp_path / "runs", "--hidden", "8", "--epochs", "1", stack, code=1)
    assert "no space left on device" in result.output and "free space" in result.output
    assert "Traceback" not in result.output and "ResourceExhausted" not in result.output
    assert len(result.output.strip().splitlines()) == 2  # the baseline's line, then the sentence
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(("baseline", "."))) == [
        "leaderboard.csv"
    ]
