"""The per-tap probe report: groups, the split it uses, agreement with the baseline, outputs, bad input."""

import hashlib
import json
import os
import re
import subprocess

import h5py
import numpy as np
import pytest

from pipeline import features as features_module
from pipeline.config import ReduceConfig
from pipeline.errors import PipelineError
from pipeline.files import leftover_temps, lock_beside, locked, temp_sibling
from pipeline.probe import Group, plan_groups, probe
from pipeline.reduce import reduce_features
from pipeline.train import train

SIGNAL = "resnet50/conv4_block6_out"
NOISE = ("resnet50/conv5_block3_out", "vgg16/block5_conv3")
# One tap carries the classes, two are pure noise: the probe has to tell them apart.
MIXED = {SIGNAL: 12, NOISE[0]: 20, NOISE[1]: 16}


@pytest.fixture
def mixed_features(features_dir):
    return features_dir(n=600, taps=MIXED, signal=dict.fromkeys(NOISE, 0.0), classes=("a", "b", "c"), shard_size=128)


def by_name(report):
    return {entry["name"]: entry for entry in report["groups"]}


def test_groups_are_each_tap_each_multi_tap_backbone_and_all():
    taps = ("resnet50/a", "resnet50/b", "vgg16/c")
    assert plan_groups(taps) == [
        Group("resnet50/a", "tap", ("resnet50/a",)),
        Group("resnet50/b", "tap", ("resnet50/b",)),
        Group("vgg16/c", "tap", ("vgg16/c",)),
        Group("resnet50", "backbone", ("resnet50/a", "resnet50/b")),
        Group("all", "all", taps),
    ]
    assert [g.kind for g in plan_groups(("resnet50/a", "resnet50/b"))] == ["tap", "tap", "all"]  # the backbone is all
    assert plan_groups(("vgg16/c",)) == [Group("vgg16/c", "tap", ("vgg16/c",))]


def test_the_informative_tap_wins_and_noise_taps_are_near_chance(mixed_features, tmp_path, run_cli):
    result = run_cli("probe", mixed_features, "--out", tmp_path / "probe", "--components", "8")
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    groups = by_name(report)
    assert groups[SIGNAL]["val"]["accuracy"] > 0.9 and groups[SIGNAL]["test"]["accuracy"] > 0.9
    for noise in NOISE:
        for split in ("val", "test"):  # 60 rows each, 3 balanced classes: chance is 1/3
            assert groups[noise][split]["accuracy"] < 0.5, (noise, split)
    assert "vgg16" not in groups  # one vgg16 tap: no backbone row
    assert groups["resnet50"]["val"]["accuracy"] > 0.9 and groups["all"]["val"]["accuracy"] > 0.9

    table = result.output.splitlines()
    assert table[1].split()[:5] == ["group", "kind", "dims", "pca", "val"]
    ranked_names = [line.split()[0] for line in table[2 : 2 + len(groups)]]
    assert ranked_names.index(SIGNAL) < min(ranked_names.index(noise) for noise in NOISE)
    val_accuracies = [float(line.split()[4]) for line in table[2 : 2 + len(groups)]]
    assert val_accuracies == sorted(val_accuracies, reverse=True)
    assert table[-1].startswith(f"wrote {tmp_path / 'probe' / 'probe.json'} and {tmp_path / 'probe' / 'probe.png'}")


def test_probe_json_records_inputs_settings_split_and_every_group(mixed_features, tmp_path):
    report = probe(mixed_features, tmp_path / "out", components=16).report
    assert report["format"] == "pipeline-probe/1"
    assert report["inputs"]["kind"] == "features" and report["inputs"]["features"] == "../features"
    manifest_bytes = (mixed_features / "manifest.json").read_bytes()
    assert report["inputs"]["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert report["settings"]["taps"] == list(MIXED)
    assert report["settings"]["scaling"] == ReduceConfig().scaling and report["settings"]["components"] == 16
    assert report["splits"]["rows"] == {"train": 480, "val": 67, "test": 53}
    assert report["splits"]["rule"] == "id-hash-threshold/2"
    groups = by_name(report)
    assert [(g["name"], g["kind"], g["input_dims"], g["components"]) for g in report["groups"]] == [
        (SIGNAL, "tap", 12, 12),
        (NOISE[0], "tap", 20, 16),
        (NOISE[1], "tap", 16, 16),
        ("resnet50", "backbone", 32, 16),
        ("all", "all", 48, 16),
    ]
    assert groups[SIGNAL]["kept_variance"] == pytest.approx(1.0)  # all 12 of 12 dims
    for entry in report["groups"]:
        assert set(entry["val"]) == {"rows", "accuracy", "macro_f1", "log_loss"} and entry["val"]["rows"] == 67
        assert entry["converged"] and entry["seconds"] >= 0 and entry["pca_solver"] == "covariance"
    png = (tmp_path / "out" / "probe.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["probe.json", "probe.png"]


def test_a_features_dir_gets_reduces_split(mixed_features, tmp_path):
    config = ReduceConfig(components=4, val_fraction=0.2, split_seed=3)
    reduced = reduce_features(mixed_features, tmp_path / "reduced", config)
    report = probe(mixed_features, tmp_path / "out", components=4, val_fraction=0.2, split_seed=3).report
    assert report["splits"]["sha256"] == reduced.report["splits"]["sha256"]
    assert report["splits"]["rows"] == reduced.report["splits"]["rows"]
    other = probe(mixed_features, tmp_path / "out2", components=4).report
    assert other["splits"]["sha256"] != reduced.report["splits"]["sha256"]


@pytest.mark.parametrize(
    "settings",
    [
        dict(components=6),
        dict(components=5, scaling="none", whiten=True),
        dict(components=30, scaling="standard"),
    ],
)
def test_all_taps_agree_with_the_baseline_when_the_covariance_is_used(features_dir, tmp_path, settings):
    """More train rows than features: the probe's PCA is exact from the covariance, reduce's a full SVD."""
    features = features_dir(n=300, seed=2)
    reduce_features(features, tmp_path / "reduced", ReduceConfig(**settings))
    baseline = next(iter(train(tmp_path / "reduced", tmp_path / "runs", []))).metrics
    report = probe(tmp_path / "reduced", tmp_path / "out").report
    assert report["inputs"]["kind"] == "reduced" and report["inputs"]["reduced"]["path"] == "../reduced"
    reduce_json = json.loads((tmp_path / "reduced" / "reduce.json").read_text())
    assert report["splits"]["sha256"] == reduce_json["splits"]["sha256"]
    everything = by_name(report)["all"]
    assert (everything["components"], everything["pca_solver"]) == (settings["components"], "covariance")
    for split in ("val", "test"):
        assert everything[split]["accuracy"] == baseline[split]["accuracy"]
        assert everything[split]["macro_f1"] == baseline[split]["macro_f1"]
        assert everything[split]["log_loss"] == pytest.approx(baseline[split]["log_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "rows, taps, solver",
    [
        (50, {"resnet50/conv5_block3_out": 24, "vgg16/block5_conv3": 30}, "full"),  # 40 train rows, 54 features
        (700, {"resnet50/conv5_block3_out": 400, "vgg16/block5_conv3": 300}, "randomized"),  # 560 train rows, 700 features
    ],
)
def test_all_taps_equal_the_baseline_when_the_train_rows_fit_in_memory(features_dir, tmp_path, rows, taps, solver):
    """Fewer train rows than features: the probe fits the PCA reduce fits, so the all row is the baseline row."""
    features = features_dir(n=rows, taps=taps, shard_size=64)
    reduce_features(features, tmp_path / "reduced", ReduceConfig(components=8))
    assert json.loads((tmp_path / "reduced" / "reduce.json").read_text())["solver"]["chosen"] == solver
    baseline = next(iter(train(tmp_path / "reduced", tmp_path / "runs", []))).metrics
    everything = by_name(probe(tmp_path / "reduced", tmp_path / "out").report)["all"]
    assert everything["pca_solver"] == solver
    for split in ("val", "test"):
        for metric in ("accuracy", "macro_f1"):
            assert everything[split][metric] == baseline[split][metric]
        assert everything[split]["log_loss"] == pytest.approx(baseline[split]["log_loss"], rel=1e-6)


def test_a_reduced_dir_lends_its_taps_and_settings_and_options_override_them(mixed_features, tmp_path):
    config = ReduceConfig(taps=(SIGNAL, NOISE[1]), scaling="standard", components=5)
    reduce_features(mixed_features, tmp_path / "reduced", config)
    default = probe(tmp_path / "reduced", tmp_path / "out").report
    assert default["settings"]["taps"] == [SIGNAL, NOISE[1]]
    assert (default["settings"]["scaling"], default["settings"]["components"]) == ("standard", 5)
    assert [g["name"] for g in default["groups"]] == [SIGNAL, NOISE[1], "all"]
    wider = probe(tmp_path / "reduced", tmp_path / "out", taps=list(MIXED), scaling="block", components=3).report
    assert len(wider["groups"]) == 5 and wider["settings"]["scaling"] == "block"
    assert {g["components"] for g in wider["groups"]} == {3}
    assert wider["splits"]["sha256"] == default["splits"]["sha256"]


def test_parallel_jobs_give_the_same_table_on_float16_shards(features_dir, tmp_path):
    features = features_dir(n=300, taps=MIXED, signal={NOISE[0]: 0.0}, storage_dtype="float16", shard_size=70)
    one, two = (probe(features, tmp_path / f"out{jobs}", jobs=jobs, components=6).report for jobs in (1, 2))
    assert (one["jobs"], two["jobs"]) == (1, 2)
    for a, b in zip(one["groups"], two["groups"]):
        assert a["name"] == b["name"]
        assert (a["val"]["accuracy"], a["test"]["accuracy"]) == (b["val"]["accuracy"], b["test"]["accuracy"])
        assert a["val"]["log_loss"] == pytest.approx(b["val"]["log_loss"], rel=1e-6)


def test_unlabeled_rows_shape_the_pca_but_not_the_scores(features_dir, tmp_path):
    features = features_dir(n=150)
    with h5py.File(features / "shard-00000.h5", "r+") as f:
        f["labels"][:10] = -1
    report = probe(features, tmp_path / "out", components=4).report
    splits = report["splits"]
    assert splits["unlabeled"] == 10 and sum(splits["rows"].values()) == 140
    assert splits["pca_train_rows"] > splits["rows"]["train"]  # reduce fits its transform on them too
    assert all(entry["val"]["rows"] == splits["rows"]["val"] for entry in report["groups"])


def test_cli_without_test_rows_shows_val_only(features_dir, tmp_path, run_cli):
    result = run_cli("probe", features_dir(n=60), "--out", tmp_path / "out", "--test-fraction", "0")
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert report["splits"]["rows"]["test"] == 0 and all(entry["test"] is None for entry in report["groups"])
    for line in result.output.splitlines()[2 : 2 + len(report["groups"])]:
        cells = line.split()
        assert (cells[5], cells[7]) == ("-", "-")  # test accuracy and test F1


@pytest.mark.parametrize("rows", [600, 50])  # train rows above and below the 48 features
def test_the_features_are_read_twice_whatever_the_number_of_groups(features_dir, tmp_path, monkeypatch, rows):
    features = features_dir(n=rows, taps=MIXED)
    passes = []
    real = features_module.Features.batches

    def counting(live, taps, batch_rows, dtype=None):  # every pass reads every shard's live rows once (test_features.py)
        passes.append((tuple(taps), batch_rows))
        yield from real(live, taps, batch_rows, dtype)

    monkeypatch.setattr(features_module.Features, "batches", counting)
    report = probe(features, tmp_path / "out", components=4, batch_rows=100).report
    assert len(report["groups"]) == 5
    assert passes == [(tuple(MIXED), 100)] * 2


def test_a_changed_manifest_is_refused(mixed_features, tmp_path):
    reduce_features(mixed_features, tmp_path / "reduced", ReduceConfig(components=4))
    manifest = json.loads((mixed_features / "manifest.json").read_text())
    manifest["timing"]["seconds"] = 1.0
    (mixed_features / "manifest.json").write_text(json.dumps(manifest))
    changed = "manifest.json has sha256 .* but .*reduce.json was made from .*; the features changed since reduce"
    with pytest.raises(PipelineError, match=changed):
        probe(tmp_path / "reduced", tmp_path / "out")


def relabel(features, label):
    """Set every label of a features dir to `label`."""
    for path in sorted(features.glob("shard-*.h5")):
        with h5py.File(path, "r+") as f:
            f["labels"][:] = label


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("not ours", [], r"is neither a features directory \(no manifest.json\) nor a reduced directory \(no reduce.json\)"),
        ("unlabeled", [], "has no labelled rows; a probe is scored against labels"),
        ("one class", [], "the train rows of .* hold only class 'a'; a probe needs at least two classes in train"),
        ("features", ["--val-fraction", "0"], "has no labelled val rows, which rank the probes; give a --val-fraction above 0"),
        (
            "features",
            ["--tap", "vgg16/block3_conv3"],
            "tap vgg16/block3_conv3 is not in the features manifest; it has resnet50/conv5_block3_out, vgg16/block5_conv3",
        ),
        ("features", ["--tap", "alexnet/fc7"], "tap 'alexnet/fc7' is not BACKBONE:LAYER"),
        ("features", ["--val-fraction", "0.6", "--test-fraction", "0.4"], "leaves no rows for train"),
        (
            "reduced",
            ["--split-seed", "4"],
            "--split-seed cannot change the split of reduced directory .*; probe its features directory",
        ),
    ],
)
def test_cli_bad_input_is_one_clear_error(features_dir, tmp_path, run_cli, case, args, message):
    path = features_dir(n=60)
    if case == "not ours":
        path = tmp_path / "images"
        path.mkdir()
    elif case == "unlabeled":
        relabel(path, -1)
    elif case == "one class":
        relabel(path, 0)
    elif case == "reduced":
        reduce_features(path, tmp_path / "reduced", ReduceConfig(components=2))
        path = tmp_path / "reduced"
    result = run_cli("probe", path, "--out", tmp_path / "out", *args, code=1)
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "out").exists()


def test_a_second_probe_into_one_out_is_refused_naming_the_process(features_dir, tmp_path, run_cli):
    """Regression: probe took no lock, so two probes into one --out could leave probe.json of one and probe.png of the other."""
    features, out = features_dir(n=60), tmp_path / "out"
    run_cli("probe", features, "--out", out, "--components", 2)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with locked(lock_beside(out), "another probe"):
        result = run_cli("probe", features, "--out", out, "--components", 3, code=1)
    assert f"probe directory {out} is in use by PID {os.getpid()} on " in result.output
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    run_cli("probe", features, "--out", out, "--components", 3)  # free again
    assert json.loads((out / "probe.json").read_text())["settings"]["components"] == 3


def test_a_killed_probe_s_temp_files_are_removed_by_the_next(features_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    ended = subprocess.Popen(["true"])
    ended.wait()
    killed = temp_sibling(out / "probe.json", pid=ended.pid)  # a writer that is provably dead
    killed.write_text("{half")
    run_cli("probe", features_dir(n=60), "--out", out, "--components", 2)
    assert not killed.exists() and not leftover_temps(out) and (out / "probe.json").is_file()


def test_cli_usage_errors_exit_2(features_dir, tmp_path, run_cli):
    assert "does not exist" in run_cli("probe", tmp_path / "missing", "--out", tmp_path / "out", code=2).output
    assert "x>=1" in run_cli("probe", features_dir(n=60), "--out", tmp_path / "out", "--components", "0", code=2).output


@pytest.mark.parametrize("rows, value", [(30, np.nan), (200, np.inf)])  # train rows held in memory; the covariance pass
def test_non_finite_features_name_the_tap_the_rows_and_the_first_id(features_dir, tmp_path, run_cli, rows, value):
    """Regression: NaN or Inf in the features were a scikit-learn ValueError traceback."""
    features = features_dir(n=rows, shard_size=10)
    with h5py.File(features / "shard-00001.h5", "r+") as f:
        f["features/vgg16/block5_conv3"][3, 2] = value
    result = run_cli("probe", features, "--out", tmp_path / "out", code=1)
    assert (
        f"the features in {features} hold NaN or Inf: tap vgg16/block5_conv3 in 1 of {rows} rows (first 'img00013.png')"
        in result.output
    )
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda r: r["config"].update(colour_jitter=True),
            "records settings this version does not know (colour_jitter); use the pipeline version",
        ),
        (
            lambda r: r.pop("inputs"),
            "has no 'inputs' record of what it was made from (it lacks 'inputs'); reduce again with --overwrite",
        ),
        (
            lambda r: r.pop("components"),
            "has no complete record of its settings (it lacks 'components'); reduce again with --overwrite",
        ),
    ],
)
def test_a_reduce_json_this_version_cannot_read_is_one_sentence(features_dir, tmp_path, run_cli, edit, message):
    """Regression: unknown settings were a TypeError from ReduceConfig(**recorded), a missing `inputs` a KeyError."""
    reduce_features(features_dir(n=60), tmp_path / "reduced", ReduceConfig(components=2))
    report = json.loads((tmp_path / "reduced" / "reduce.json").read_text())
    edit(report)
    (tmp_path / "reduced" / "reduce.json").write_text(json.dumps(report))
    result = run_cli("probe", tmp_path / "reduced", "--out", tmp_path / "out", code=1)
    assert f"{tmp_path / 'reduced' / 'reduce.json'} {message}" in result.output and "Traceback" not in result.output
