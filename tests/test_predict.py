"""`pipeline predict`: lineage from a run back to its features, the CSV, errors and the accuracy line."""

import csv
import json
import os
import re
import shutil

import pytest

from helpers import sha256
from pipeline import backbones
from pipeline.config import WeightSource
from pipeline.errors import PipelineError
from pipeline.lineage import load_lineage


def copy_lineage(head_run, tmp_path):
    """A copy of the whole lineage tree (images, weights file, features, reduced, runs); returns its run dir."""
    root = tmp_path / "copy"
    shutil.copytree(head_run.root, root)
    return root / "runs" / head_run.run.name


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def reseal(run):
    """After a deliberate edit upstream, record the new hashes downstream so only the edit itself matters."""
    reduced, manifest = run.parent.parent / "reduced", run.parent.parent / "features" / "manifest.json"
    edit_json(reduced / "reduce.json", lambda r: r["inputs"].update(manifest_sha256=sha256(manifest)))
    edit_json(run / "config.json", lambda c: c["reduced"].update(reduce_json_sha256=sha256(reduced / "reduce.json")))


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# --- lineage


def test_a_moved_tree_is_found_through_its_relative_paths(head_run, tmp_path):
    run = copy_lineage(head_run, tmp_path)
    lineage = load_lineage(run)
    assert (lineage.reduced_dir, lineage.features_dir) == (tmp_path / "copy" / "reduced", tmp_path / "copy" / "features")
    assert lineage.taps == ("resnet50/conv2_block1_out", "vgg16/block1_pool")
    assert lineage.classes == ["a", "b", "c"]
    config = lineage.extract_config()
    assert (config.image_size, config.pooling, config.resize, config.seed) == (32, "avg", "squash", 0)
    assert config.weights == f"resnet50=random,vgg16={head_run.root / 'vgg16.weights.h5'}"


def test_a_run_moved_alone_falls_back_to_the_absolute_paths(head_run, tmp_path):
    run = tmp_path / "elsewhere" / "runs" / head_run.run.name
    shutil.copytree(head_run.run, run)
    assert load_lineage(run).reduced_dir == head_run.root / "reduced"


def test_a_missing_reduced_dir_names_the_file_that_points_to_it(head_run, tmp_path):
    run = copy_lineage(head_run, tmp_path)
    shutil.rmtree(tmp_path / "copy" / "reduced")
    edit_json(run / "config.json", lambda c: c["reduced"].update(absolute=str(tmp_path / "gone")))
    pointer, gone = re.escape(str(run / "config.json")), re.escape(str(tmp_path / "gone"))
    with pytest.raises(PipelineError, match=rf"reduced directory that {pointer} points to: no reduce.json in .* nor in {gone}"):
        load_lineage(run)


def test_a_missing_features_dir_names_the_file_that_points_to_it(head_run, tmp_path):
    run = copy_lineage(head_run, tmp_path)
    reduced = tmp_path / "copy" / "reduced"
    shutil.rmtree(tmp_path / "copy" / "features")
    edit_json(reduced / "reduce.json", lambda r: r["inputs"].update(features_absolute=str(tmp_path / "gone")))
    edit_json(run / "config.json", lambda c: c["reduced"].update(reduce_json_sha256=sha256(reduced / "reduce.json")))
    with pytest.raises(
        PipelineError, match=r"features directory that .*reduce.json points to: no manifest.json in .*features nor in .*gone"
    ):
        load_lineage(run)


def test_features_changed_since_reduce_are_refused(head_run, tmp_path):
    run = copy_lineage(head_run, tmp_path)
    edit_json(tmp_path / "copy" / "features" / "manifest.json", lambda m: m["config"].update(pooling="max"))
    with pytest.raises(
        PipelineError,
        match=r"manifest.json has sha256 [0-9a-f]{12} but .*reduce.json was made from [0-9a-f]{12}; the features changed since reduce, so reduce and train again",
    ):
        load_lineage(run)


def test_features_updated_by_extract_since_reduce_still_serve_the_run(head_run, tmp_path):
    run = copy_lineage(head_run, tmp_path)

    def update(manifest):  # what an extract update changes: the images (source hash, rows, retired rows), not the extraction
        manifest["config"].update(source_sha256="0" * 64)
        manifest["shards"][0].update(retired=[0], live=manifest["shards"][0]["rows"] - 1, generation=0)
        manifest.update(rows=manifest["rows"] - 1, generation=1)

    edit_json(tmp_path / "copy" / "features" / "manifest.json", update)
    assert load_lineage(run).manifest["generation"] == 1
    edit_json(tmp_path / "copy" / "features" / "manifest.json", lambda m: m["config"].update(pooling="max"))
    with pytest.raises(PipelineError, match="the features changed since reduce, so reduce and train again"):
        load_lineage(run)


def test_a_reduced_dir_changed_since_training_is_refused(head_run, tmp_path):
    run = copy_lineage(head_run, tmp_path)
    edit_json(tmp_path / "copy" / "reduced" / "reduce.json", lambda r: r.update(components=5))
    with pytest.raises(
        PipelineError,
        match=rf"reduce.json has sha256 [0-9a-f]{{12}} but .*config.json was made from [0-9a-f]{{12}}; it changed since run {run.name} was trained on it",
    ):
        load_lineage(run)


def test_settings_missing_from_an_older_manifest_take_their_defaults(head_run, tmp_path):
    run = copy_lineage(head_run, tmp_path)
    edit_json(tmp_path / "copy" / "features" / "manifest.json", lambda m: m["config"].pop("fast_decode"))
    reseal(run)
    config = load_lineage(run).extract_config()
    assert config.fast_decode is False and config.image_size == head_run.config.image_size


def test_settings_this_version_does_not_know_are_refused(head_run, tmp_path):
    run = copy_lineage(head_run, tmp_path)
    edit_json(tmp_path / "copy" / "features" / "manifest.json", lambda m: m["config"].update(colour_jitter=True))
    reseal(run)
    with pytest.raises(PipelineError, match=r"records extraction settings this version does not know \(colour_jitter\)"):
        load_lineage(run).extract_config()


def test_the_lineage_parses_the_very_records_whose_sha256_it_checked(head_run, tmp_path, monkeypatch):
    """Regression: reduce.json was hashed, then read again to parse; a reduce --overwrite in between went unnoticed."""
    import builtins
    import io

    run = copy_lineage(head_run, tmp_path)
    report = tmp_path / "copy" / "reduced" / "reduce.json"
    original = report.read_bytes()
    real_open, opened = builtins.open, []

    def rewritten_after_the_first_read(file, *args, **kwargs):
        if not isinstance(file, int) and os.path.abspath(os.fspath(file)) == str(report):
            opened.append(file)
            if len(opened) == 2:  # another reduction lands between the reads
                with real_open(report, "wb") as f:
                    f.write(original.replace(b"{", b'{"other": 1, ', 1))
        return real_open(file, *args, **kwargs)

    for module in (builtins, io):
        monkeypatch.setattr(module, "open", rewritten_after_the_first_read)
    lineage = load_lineage(run)
    monkeypatch.undo()
    assert "other" not in lineage.report and len(opened) == 1


@pytest.mark.parametrize(
    "record, key, remedy",
    [
        ("runs/{run}/config.json", "reduced", "rerun the `pipeline train` command that made the run"),
        ("reduced/reduce.json", "inputs", "rerun the `pipeline reduce` command that made it with --overwrite"),
    ],
)
def test_a_record_without_its_link_is_one_sentence(head_run, tmp_path, record, key, remedy):
    """Regression: a readable config.json without `reduced` (or reduce.json without `inputs`) was a KeyError."""
    run = copy_lineage(head_run, tmp_path)
    path = tmp_path / "copy" / record.format(run=run.name)
    edit_json(path, lambda r: r.pop(key))
    if key == "inputs":
        reseal_run_only = json.loads((run / "config.json").read_text())
        reseal_run_only["reduced"]["reduce_json_sha256"] = sha256(path)
        (run / "config.json").write_text(json.dumps(reseal_run_only))
    with pytest.raises(PipelineError, match=re.escape(f"{path} has no {key!r} record of what it was made from")) as caught:
        load_lineage(run)
    assert remedy in str(caught.value)


def test_only_head_runs_can_predict(head_run, tmp_path):
    with pytest.raises(PipelineError, match=rf"run {head_run.baseline.name} is a baseline run without a Keras head"):
        load_lineage(head_run.baseline)
    with pytest.raises(PipelineError, match=r"is not a run directory: it has no config.json"):
        load_lineage(tmp_path)


def test_a_moved_weights_file_is_named_and_can_be_given_again(head_run, tmp_path, image_tree, run_cli):
    run = copy_lineage(head_run, tmp_path)
    moved = tmp_path / "copy" / "vgg16.weights.h5"
    manifest = tmp_path / "copy" / "features" / "manifest.json"
    edit_json(
        manifest,
        lambda m: m["weights"]["vgg16"].update(source={"kind": "file", "path": str(tmp_path / "old" / "vgg16.weights.h5")}),
    )
    reseal(run)
    source = image_tree(classes=("a",), per_class=2)
    refused = run_cli("predict", run, source, "--out", tmp_path / "p.csv", code=1)
    assert f"vgg16 weights file {tmp_path / 'old' / 'vgg16.weights.h5'} (recorded in {manifest}) does not exist" in refused.output
    assert "--weights vgg16=PATH" in refused.output
    run_cli("predict", run, source, "--out", tmp_path / "p.csv", "--weights", f"resnet50=random,vgg16={moved}")
    assert len(read_csv(tmp_path / "p.csv")[1]) == 2


def test_weights_with_another_fingerprint_are_refused_before_any_image_runs(head_run, tmp_path, image_tree, run_cli, monkeypatch):
    other = backbones.build_backbone("vgg16", 32)
    backbones.load_weights(other, "vgg16", WeightSource("random", seed=6))
    other.save_weights(tmp_path / "other.weights.h5")
    monkeypatch.setattr("pipeline.engines.worker.ShardWorker.run", lambda *a, **k: pytest.fail("an image was run"))
    recorded = json.loads((head_run.root / "features" / "manifest.json").read_text())["weights"]["vgg16"]["sha256"]
    result = run_cli(
        "predict",
        head_run.run,
        image_tree(),
        "--out",
        tmp_path / "p.csv",
        "--weights",
        f"resnet50=random,vgg16={tmp_path / 'other.weights.h5'}",
        code=1,
    )
    assert re.search(
        rf"vgg16 weights from .*other.weights.h5 have sha256 (?!{recorded[:12]})[0-9a-f]{{12}}, "
        rf"but the features were extracted with sha256 {recorded[:12]}",
        result.output,
    )
    assert not (tmp_path / "p.csv").exists()


# --- the CSV


def test_every_listed_image_is_a_row_with_top_k_or_an_error(head_run, tmp_path, image_tree, run_cli):
    source = image_tree(classes=("a", "b", "zebra"), per_class=2, size=40, name="new")
    (source / "a" / "broken.png").write_text("not a png")
    result = run_cli("predict", head_run.run, source, "--out", tmp_path / "out" / "p.csv", "--top-k", 5, "--batch-size", 3)
    columns, rows = read_csv(tmp_path / "out" / "p.csv")
    assert columns == [
        "id",
        "path",
        "predicted",
        "probability",
        "top1_class",
        "top1_prob",
        "top2_class",
        "top2_prob",
        "top3_class",
        "top3_prob",
        "error",
    ]
    assert [r["id"] for r in rows] == [
        "a/000.png",
        "a/001.png",
        "a/broken.png",
        "b/000.png",
        "b/001.png",
        "zebra/000.png",
        "zebra/001.png",
    ]
    assert all(r["path"] == str(source / r["id"]) for r in rows)

    broken = rows[2]
    assert broken["error"] and all(broken[c] == "" for c in columns[2:-1])
    for row in rows[:2] + rows[3:]:
        probs = [float(row[f"top{k}_prob"]) for k in (1, 2, 3)]
        assert row["error"] == ""
        assert (row["predicted"], row["probability"]) == (row["top1_class"], row["top1_prob"])
        assert {row[f"top{k}_class"] for k in (1, 2, 3)} == {"a", "b", "c"}
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)

    assert "predicted 6 images, 1 errors" in result.output and "error: a/broken.png: " in result.output
    assert "labels the run does not know, left out of the accuracy: zebra (2)" in result.output
    known = [r for r in rows if r["id"][0] in "ab" and not r["error"]]
    accuracy = sum(r["predicted"] == r["id"][0] for r in known) / len(known)
    assert result.output.rstrip().endswith(f"accuracy: {accuracy:.3f} on 4 labelled images")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".p.csv.lock", "p.csv"]  # no scratch features left


def test_an_unlabelled_csv_source_gets_no_accuracy_line(head_run, tmp_path, image_tree, run_cli):
    images = image_tree(classes=("x",), per_class=2)
    listing = tmp_path / "list.csv"
    listing.write_text("id,path\nfirst,images/x/000.png\nsecond,images/x/001.png\n")
    result = run_cli("predict", head_run.run, listing, "--out", tmp_path / "p.csv", "--top-k", 1)
    columns, rows = read_csv(tmp_path / "p.csv")
    assert columns == ["id", "path", "predicted", "probability", "top1_class", "top1_prob", "error"]
    assert [(r["id"], r["path"]) for r in rows] == [("first", str(images / "x/000.png")), ("second", str(images / "x/001.png"))]
    assert "accuracy" not in result.output


# --- faults


def test_a_killed_predict_s_scratch_is_removed_and_a_second_predict_is_refused_naming_the_first(
    head_run, tmp_path, image_tree, run_cli
):
    """Regression: a killed predict left a hidden .predict-* features dir that nothing ever removed."""
    from pipeline.files import lock_beside, locked

    source, out = image_tree(classes=("a",), per_class=2), tmp_path / "out" / "p.csv"
    out.parent.mkdir()
    import subprocess

    from pipeline.files import temp_sibling

    killed = subprocess.Popen(["true"])
    killed.wait()
    scratch = temp_sibling(out, pid=killed.pid)  # what a predict killed mid-extraction leaves
    (scratch / "features").mkdir(parents=True)
    (scratch / "features" / "shard-00000.h5").write_bytes(b"half a shard")
    with locked(lock_beside(out), "test"):
        busy = run_cli("predict", head_run.run, source, "--out", out, code=1)
    assert f"predictions file {out} is in use by PID {os.getpid()}" in busy.output and scratch.exists()
    run_cli("predict", head_run.run, source, "--out", out)
    assert sorted(p.name for p in out.parent.iterdir()) == [".p.csv.lock", "p.csv"]


def test_disk_full_or_read_only_in_predict_is_one_sentence_and_keeps_the_old_csv(
    head_run, tmp_path, image_tree, run_cli, monkeypatch, failing_writes
):
    import errno

    from pipeline import predict as predict_module

    source, out = image_tree(classes=("a",), per_class=2), tmp_path / "out" / "p.csv"
    run_cli("predict", head_run.run, source, "--out", out)
    before = out.read_bytes()

    def full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(predict_module, "_write_csv", full)
        result = run_cli("predict", head_run.run, source, "--out", out, code=1)
    assert (
        f"cannot write {out} (or the scratch features beside it): no space left on device; the previous p.csv is unchanged"
        in result.output
    )
    assert out.read_bytes() == before and sorted(p.name for p in out.parent.iterdir()) == [".p.csv.lock", "p.csv"]
    with failing_writes(out.parent, errno.EROFS):
        read_only = run_cli("predict", head_run.run, source, "--out", out, code=1)
    assert "(Read-only file system)" in read_only.output and "Traceback" not in read_only.output


@pytest.mark.parametrize("command", ["predict", "export"])
def test_a_damaged_transform_or_head_is_one_sentence_naming_it(head_run, tmp_path, image_tree, run_cli, command):
    """Regression: a corrupt transform.joblib was a KeyError, a truncated model.keras "file not found"."""
    run = copy_lineage(head_run, tmp_path)
    reduced = tmp_path / "copy" / "reduced"
    args = [
        command,
        run,
        *([image_tree(classes=("a",), per_class=1)] if command == "predict" else []),
        "--out",
        tmp_path / f"out.{'csv' if command == 'predict' else 'keras'}",
    ]
    transform = (reduced / "transform.joblib").read_bytes()
    (reduced / "transform.joblib").write_bytes(transform[:-100])
    result = run_cli(*args, code=1)
    assert f"{reduced / 'transform.joblib'} is damaged: its sha256 is not the one reduce.json recorded" in result.output
    edit_json(reduced / "reduce.json", lambda r: r.pop("outputs"))  # as reduced dirs made before outputs were hashed
    reseal(run)
    result = run_cli(*args, code=1)
    assert f"{reduced / 'transform.joblib'} cannot be loaded (" in result.output and "it is damaged" in result.output
    (reduced / "transform.joblib").write_bytes(transform)
    model = (run / "model.keras").read_bytes()
    (run / "model.keras").write_bytes(model[: len(model) // 2])
    result = run_cli(*args, code=1)
    assert f"{run / 'model.keras'} is damaged: its sha256 is not the one config.json recorded" in result.output
    assert "rerun the `pipeline train` command that made it" in result.output and "Traceback" not in result.output


def test_dirs_from_before_the_sha256_fields_still_load(head_run, tmp_path):
    from pipeline.reduced import load_reduced

    run = copy_lineage(head_run, tmp_path)
    reduced = tmp_path / "copy" / "reduced"
    edit_json(reduced / "reduce.json", lambda r: r.pop("outputs"))
    edit_json(run / "config.json", lambda c: c.pop("model_sha256"))
    reseal(run)
    lineage = load_lineage(run)
    assert lineage.load_transform().pca_.n_components_ == 6
    assert lineage.load_head().output_shape == (None, 3)
    assert load_reduced(reduced).X.shape == (24, 6)
