"""Stable splits: each id by its own hash against the fractions; the source's splits win; the rule is recorded."""

import json

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.lineage import reduced_notes
from pipeline.reduced import load_reduced
from pipeline.splits import SPLIT_RULE, assign_splits, id_unit


def test_adding_and_removing_images_leaves_every_other_image_s_split_unchanged():
    ids = [f"{c}/img{i:04d}.png" for c in "ab" for i in range(300)]
    labels = np.repeat([0, 1], 300)
    before = dict(zip(ids, assign_splits(ids, labels, [""] * 600, 0.1, 0.2, seed=0)))
    grown = ids[50:] + [f"{c}/new{i:04d}.png" for c in "abc" for i in range(200)]  # 50 removed, 600 added, a new class
    grown_labels = np.array([{"a": 0, "b": 1, "c": 2}[i[0]] for i in grown])
    after = dict(zip(grown, assign_splits(grown, grown_labels, [""] * len(grown), 0.1, 0.2, seed=0)))
    assert all(after[i] == before[i] for i in ids[50:])


def test_the_fractions_hold_on_average_and_the_seed_moves_rows():
    ids = [f"img{i:05d}" for i in range(20000)]
    splits = assign_splits(ids, np.arange(20000) % 3, [""] * 20000, 0.1, 0.2, seed=0)
    shares = [(splits == s).mean() for s in ("train", "val", "test")]
    assert np.allclose(shares, [0.7, 0.1, 0.2], atol=0.015)
    other_seed = assign_splits(ids, np.arange(20000) % 3, [""] * 20000, 0.1, 0.2, seed=1)
    assert (splits != other_seed).mean() > 0.3


def test_a_row_s_split_is_its_hash_against_the_fractions():
    ids = [f"img{i:04d}" for i in range(500)]
    splits = assign_splits(ids, np.zeros(500, int), [""] * 500, 0.25, 0.15, seed=3)
    units = np.array([id_unit(3, i) for i in ids])
    expected = np.where(units < 0.15, "test", np.where(units < 0.4, "val", "train"))
    assert splits.tolist() == expected.tolist()


def test_given_splits_are_kept_and_blank_rows_hashed():
    ids = [f"img{i:04d}" for i in range(100)]
    labels = np.arange(100) % 2
    given = ["test"] * 10 + ["val"] * 10 + [""] * 80
    splits = assign_splits(ids, labels, given, 0.25, 0.25, seed=0)
    assert splits[:20].tolist() == given[:20]
    assert splits[20:].tolist() == assign_splits(ids[20:], labels[20:], [""] * 80, 0.25, 0.25, seed=0).tolist()


def test_unknown_given_split_is_refused():
    with pytest.raises(PipelineError, match="split name"):
        assign_splits(["a"], np.array([0]), ["holdout"], 0.1, 0.1, seed=0)


def test_the_rule_is_recorded_and_an_old_reduce_json_says_it_used_the_first_rule(features_dir, tmp_path, run_cli):
    features = features_dir(n=90)
    run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", "4")
    report_path = tmp_path / "reduced" / "reduce.json"
    report = json.loads(report_path.read_text())
    assert report["splits"]["rule"] == SPLIT_RULE and reduced_notes(tmp_path / "reduced", report) == []
    del report["splits"]["rule"]  # as reduce wrote it before the rule was recorded
    report_path.write_text(json.dumps(report))
    assert load_reduced(tmp_path / "reduced").report["splits"]["sha256"] == report["splits"]["sha256"]  # it still loads
    (note,) = reduced_notes(tmp_path / "reduced", report)
    assert "was split by the first rule (id-hash-rank/1: ids ranked within each class)" in note
    output = run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", "4", code=1).output
    assert "split rule id-hash-rank/1, now id-hash-threshold/2" in output and "--overwrite" in output
    run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", "4", "--overwrite")
    assert json.loads(report_path.read_text())["splits"]["rule"] == SPLIT_RULE


def test_reduce_names_the_classes_a_small_set_leaves_without_val_rows(features_dir, tmp_path, run_cli):
    features = features_dir(n=15, classes=("a", "b", "c"))  # img00000.png ... labelled i % 3
    ids, labels = [f"img{i:05d}.png" for i in range(15)], np.arange(15) % 3

    def classes_without_val(seed):
        splits = assign_splits(ids, labels, [""] * 15, 0.2, 0.1, seed)
        return [name for index, name in enumerate("abc") if not ((labels == index) & (splits == "val")).any()]

    seed = next(seed for seed in range(100) if classes_without_val(seed) and len(classes_without_val(seed)) < 3)
    result = run_cli(
        "reduce", features, "--out", tmp_path / "reduced", "--components", "2", "--val-fraction", "0.2", "--split-seed", seed
    )
    assert f"warning: class(es) {', '.join(map(repr, classes_without_val(seed)))} have no val rows" in result.output
