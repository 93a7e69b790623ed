"""The public reader: live rows in sorted-id order, batches, memory, and a manifest checked against its shards."""

import json
import re
import tracemalloc

import h5py
import numpy as np
import pytest

from pipeline import load_features
from pipeline.errors import PipelineError
from pipeline.features import open_features

TAPS = ["resnet50/conv5_block3_out", "vgg16/block5_conv3"]


def edit_manifest(features, change):
    path = features / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_load_features_gives_every_row_in_sorted_id_order_with_its_bytes(features_dir, live_rows):
    features = features_dir(n=70, shard_size=30, storage_dtype="float16")
    loaded = load_features(features)
    expected = live_rows(features)
    assert loaded.ids.tolist() == sorted(expected) and loaded.classes == ["a", "b", "c"]
    assert [loaded.classes[label] for label in loaded.labels] == [expected[i][0] for i in loaded.ids]
    assert list(loaded.features) == TAPS
    for key in TAPS:
        assert loaded.features[key].dtype == np.float16  # float16 stays float16 unless asked
        assert np.array_equal(loaded.features[key], np.stack([expected[i][2][key] for i in loaded.ids]))
    as_float32 = load_features(features, taps="vgg16/block5_conv3", dtype=np.float32)
    assert list(as_float32.features) == ["vgg16/block5_conv3"] and as_float32.features["vgg16/block5_conv3"].dtype == np.float32
    assert np.array_equal(as_float32.features["vgg16/block5_conv3"], loaded.features["vgg16/block5_conv3"].astype(np.float32))


def test_retired_rows_never_appear_and_labels_follow_each_shard_s_classes(updated_features, live_rows):
    features = updated_features()
    expected = live_rows(features)
    loaded = load_features(features)
    assert loaded.ids.tolist() == sorted(expected)
    assert "img00003.png" not in loaded.ids and "img00010+new.png" in loaded.ids
    assert loaded.classes == ["a", "aa", "b", "c"]
    assert [loaded.classes[label] for label in loaded.labels] == [expected[i][0] for i in loaded.ids]
    relabelled = loaded.ids.tolist().index("img00007.png")
    assert (loaded.classes[loaded.labels[relabelled]], loaded.splits[relabelled]) == ("c", "test")
    for key in TAPS:
        assert np.array_equal(loaded.features[key], np.stack([expected[i][2][key] for i in loaded.ids]))


@pytest.mark.parametrize("batch_rows", [1, 7, 1000])
def test_batches_are_the_loaded_rows_in_order(updated_features, batch_rows):
    features = updated_features()
    whole = load_features(features)
    batches = list(open_features(features).batches(batch_rows=batch_rows, dtype=np.float32))
    assert max(len(b.ids) for b in batches) == min(batch_rows, len(whole))
    assert np.concatenate([b.ids for b in batches]).tolist() == whole.ids.tolist()
    assert np.concatenate([b.positions for b in batches]).tolist() == list(range(len(whole)))
    assert np.concatenate([b.labels for b in batches]).tolist() == whole.labels.tolist()
    stacked = np.concatenate([b.matrix() for b in batches])
    assert np.array_equal(stacked, np.concatenate([whole.features[key] for key in TAPS], axis=1))


def test_shard_batches_give_each_shard_s_live_rows_once(updated_features):
    features = updated_features()
    opened = open_features(features)
    seen = [p for part in opened.parts for b in opened.shard_batches(part, batch_rows=4) for p in b.positions]
    assert sorted(seen) == list(range(len(opened)))


def test_memory_is_no_larger_than_the_arrays_returned(features_dir):
    features = features_dir(n=3000, taps={"resnet50/a": 256, "vgg16/b": 128}, shard_size=700, storage_dtype="float16")
    tracemalloc.start()
    loaded = load_features(features)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    returned = sum(array.nbytes for array in loaded.features.values())
    assert peak < returned * 1.25 + 2**20  # ids, labels and splits of 3,000 rows take well under 1 MiB


def test_an_unknown_tap_names_the_known_ones(features_dir):
    with pytest.raises(PipelineError, match="tap vgg16/nope is not in .*; it has resnet50/conv5_block3_out, vgg16/block5_conv3"):
        load_features(features_dir(), taps=["vgg16/nope"])


# --- the manifest is checked against the shards


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["classes"].reverse(), r"lists its classes as \['c', 'b', 'a'\], not sorted and unique"),
        (lambda m: m.pop("taps"), "has no 'taps' record"),
        (lambda m: m.pop("classes"), "has no 'classes' record"),
        (lambda m: m["taps"].pop(), r"lists taps resnet50/conv5_block3_out \(24\), but shard-00000.h5 holds"),
        (lambda m: m["taps"][0].update(dim=25), "lists taps resnet50/conv5_block3_out \\(25\\)"),
        (lambda m: m["shards"][1].update(rows=29), "says shard-00001.h5 holds 29 rows, but it holds 30"),
        (lambda m: m.update(rows=61), "says 61 live rows, but its shards leave 60 live"),
        (lambda m: m["shards"][0].update(retired=[5, 2]), "retires rows of shard-00000.h5 that are not ascending row numbers"),
        (
            lambda m: m["shards"][0].update(retired=[30]),
            "retires rows of shard-00000.h5 that are not ascending row numbers below its 30",
        ),
        (lambda m: m["shards"][0].update(retired=[1], live=30), "says shard-00000.h5 has 30 live rows, but it retires 1 of 30"),
        (lambda m: m.update(classes=["a", "b"]), "lists 2 classes, but shard-00000.h5 has rows labelled 2"),
    ],
)
def test_a_manifest_that_disagrees_with_its_shards_is_one_sentence(features_dir, change, message):
    features = features_dir(n=60, shard_size=30)
    edit_manifest(features, change)
    with pytest.raises(
        PipelineError, match=message + ".*; rerun the same `pipeline extract` command, which rebuilds the manifest"
    ):
        open_features(features)


def test_a_manifest_lacking_a_class_its_shards_name_is_refused(updated_features):
    features = updated_features()
    edit_manifest(features, lambda m: m.update(classes=["a", "b", "c"]))
    with pytest.raises(PipelineError, match="lacks class 'aa', which live rows of shard-00003.h5 are labelled with"):
        open_features(features)


def test_renamed_classes_follow_the_shards_names(updated_features):
    # Shards that record their classes are the truth: a manifest with other (still sorted) names is refused.
    features = updated_features()
    edit_manifest(features, lambda m: m.update(classes=["a", "aa", "b", "d"]))
    with pytest.raises(PipelineError, match="lacks class 'c'"):
        open_features(features)


def test_a_live_id_twice_is_refused(updated_features):
    features = updated_features()
    edit_manifest(features, lambda m: m["shards"][0].update(retired=[3, 4], live=23))  # img00007's old row live again
    edit_manifest(features, lambda m: m.update(rows=m["rows"] + 1))
    with pytest.raises(PipelineError, match="leaves id 'img00007.png' live in more than one row"):
        open_features(features)


def test_damaged_features_are_one_sentence(features_dir):
    features = features_dir(n=60, shard_size=30)
    path = features / "shard-00001.h5"
    with h5py.File(path, "r") as f:
        chunk = f["features/vgg16/block5_conv3"].id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    opened = open_features(features)  # ids, labels and splits are intact
    with pytest.raises(PipelineError, match=r"cannot read .*shard-00001.h5 .*the features are damaged: `pipeline inspect"):
        opened.load()
    with pytest.raises(PipelineError, match="shard-00001.h5"):
        list(opened.batches(batch_rows=16))


# --- every reader goes through it


@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--verify"], ["reduce"]])
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["classes"].reverse(), r"lists its classes as \['c', 'b', 'a'\], not sorted and unique"),
        (lambda m: m.pop("taps"), "has no 'taps' record"),
    ],
)
def test_inspect_and_reduce_refuse_a_manifest_that_disagrees_with_its_shards(
    features_dir, tmp_path, run_cli, command, change, message
):
    features = features_dir(n=60, shard_size=30)
    edit_manifest(features, change)
    args = ["--out", tmp_path / "reduced"] if command == ["reduce"] else command[1:]
    output = run_cli(command[0], features, *args, code=1).output
    assert "Traceback" not in output
    if "--verify" in command:  # the problem, then the count
        assert output.startswith("problem: ") and output.strip().splitlines()[-1] == f"Error: 1 problem(s) in {features}"
    else:
        assert output.startswith("Error: ") and len(output.strip().splitlines()) == 1
    assert re.search(
        message + ".*; rerun the same `pipeline extract` command, which rebuilds the manifest from the shards", output
    )
    assert not (tmp_path / "reduced").exists()


def test_inspect_counts_live_rows_only(tmp_path, image_tree, run_cli):
    run_cli(
        "extract",
        image_tree(),
        "--out",
        tmp_path / "f",
        "--weights",
        "random",
        "--image-size",
        "32",
        "--tap",
        "vgg16:block1_pool",
        "--shard-size",
        "4",
    )
    assert "6 rows in 2 shards" in run_cli("inspect", tmp_path / "f").output
    edit_manifest(tmp_path / "f", lambda m: (m["shards"][0].update(retired=[0, 2], live=2), m.update(rows=4)))
    assert "4 rows in 2 shards" in run_cli("inspect", tmp_path / "f").output


def one_generation_copy(features, live_rows, out, shard_size=20):
    """The live rows of `features` (same bytes, labels and splits) written as a directory that was never updated."""
    from pipeline import shards

    manifest = json.loads((features / "manifest.json").read_text())
    rows = live_rows(features)
    ids = sorted(rows)
    out.mkdir()
    entries = []
    for index, start in enumerate(range(0, len(ids), shard_size)):
        part = ids[start : start + shard_size]
        data = shards.ShardData(
            part,
            np.array([manifest["classes"].index(rows[i][0]) for i in part], np.int32),
            [rows[i][1] for i in part],
            {key: np.stack([rows[i][2][key] for i in part]) for key in TAPS},
        )
        shards.write_shard(
            out / shards.shard_filename(index),
            data,
            index=index,
            config_sha256=manifest["config_sha256"],
            config=manifest["config"],
        )
        entries.append({"file": shards.shard_filename(index), "rows": len(part)})
    manifest.update(shards=entries, rows=len(ids), generation=0)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("solver", ["full", "incremental"])
def test_reduce_and_probe_see_the_live_rows_only(updated_features, live_rows, tmp_path, solver):
    from pipeline.config import ReduceConfig
    from pipeline.probe import probe
    from pipeline.reduce import reduce_features
    from pipeline.reduced import load_reduced

    updated = updated_features()
    fresh = one_generation_copy(updated, live_rows, tmp_path / "fresh")
    config = ReduceConfig(components=5, solver=solver, batch_rows=7, val_fraction=0.2)
    reduced = [load_reduced(reduce_features(f, tmp_path / f"reduced-{f.name}", config).out) for f in (updated, fresh)]
    assert reduced[0].ids == reduced[1].ids == sorted(live_rows(updated))
    assert reduced[0].labels.tolist() == reduced[1].labels.tolist() and reduced[0].splits.tolist() == reduced[1].splits.tolist()
    assert reduced[0].report["rows"] == len(live_rows(updated)) and reduced[0].classes == ["a", "aa", "b", "c"]
    if solver == "full":  # the same rows in the same order: the same numbers
        assert np.array_equal(reduced[0].X, reduced[1].X)
    else:  # per-shard sums, added in another grouping
        assert np.allclose(np.abs(reduced[0].X), np.abs(reduced[1].X), atol=1e-4)
    probes = [probe(f, tmp_path / f"probe-{f.name}", components=4, val_fraction=0.2).report for f in (updated, fresh)]
    assert probes[0]["splits"] == probes[1]["splits"] and probes[0]["rows"] == len(live_rows(updated))
    assert [g["val"] for g in probes[0]["groups"]] == [g["val"] for g in probes[1]["groups"]]


def test_a_reduce_after_an_update_is_a_new_reduce_and_training_the_old_one_says_so(updated_features, tmp_path, run_cli):
    def reduce_generation_0(features):
        run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", "4", "--val-fraction", "0.2")

    features = updated_features(before=reduce_generation_0)
    output = run_cli(
        "reduce", features, "--out", tmp_path / "reduced", "--components", "4", "--val-fraction", "0.2", code=1
    ).output
    assert (
        "already holds a different reduction (made from the features before extract updated them (generation 0, now 1))" in output
    )
    trained = run_cli("train", tmp_path / "reduced", "--runs", tmp_path / "runs", "--epochs", "1", "--hidden", "4").output
    assert (
        "warning: the features in" in trained
        and "(extract updated it: generation 0, now 1); this trains on the rows as they were" in trained
    )
    run_cli("reduce", features, "--out", tmp_path / "reduced-1", "--components", "4", "--val-fraction", "0.2")
    assert (
        "warning"
        not in run_cli("train", tmp_path / "reduced-1", "--runs", tmp_path / "runs-1", "--epochs", "1", "--hidden", "4").output
    )


def test_check_features_counts_live_rows_without_reading_ids(updated_features, live_rows, monkeypatch):
    from pipeline.features import check_features

    features = updated_features()
    expected = len(live_rows(features))
    monkeypatch.setattr(h5py.Dataset, "asstr", lambda self: pytest.fail("check_features read strings"))
    summary = check_features(features)
    assert summary.rows == expected and summary.classes == ["a", "aa", "b", "c"] and list(summary.taps) == TAPS


def test_a_shard_with_every_row_retired_is_skipped(updated_features, live_rows):
    features = updated_features()

    def retire_shard_1(manifest):
        entry = manifest["shards"][1]
        manifest["rows"] -= entry["live"]
        entry.update(retired=list(range(entry["rows"])), live=0)

    edit_manifest(features, retire_shard_1)
    expected = live_rows(features)
    loaded = load_features(features)
    assert (
        loaded.ids.tolist() == sorted(expected) and "img00026.png" not in loaded.ids and "img00041.png" in loaded.ids
    )  # its copy
    assert np.concatenate([b.ids for b in open_features(features).batches(batch_rows=5)]).tolist() == sorted(expected)
