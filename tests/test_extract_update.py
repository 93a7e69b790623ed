"""A features directory follows its collection: reruns over a changed folder update it in place (issue 14, issue 16)."""

import json
import os
import shutil
import subprocess

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline import shards
from pipeline.files import locked, temp_sibling
from same_features import assert_same_features

SMALL_TAPS = ["--tap", "resnet50:conv2_block1_out", "--tap", "vgg16:block1_pool"]
FAST = ["--weights", "random", "--image-size", "32", *SMALL_TAPS]
ARGS = [*FAST, "--shard-size", "4"]


def shard_files(out):
    """{name: (mtime_ns, bytes)} of every shard file."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.existing_shards(out)}


def live_rows(out):
    """{id: (class name, split, {tap: row bytes})} of the live rows, read straight from the shards."""
    manifest = shards.read_manifest(out)
    rows = {}
    for entry in manifest["shards"]:
        path = out / entry["file"]
        attrs = shards.read_shard_attrs(path)
        classes = attrs["classes"] if attrs["classes"] is not None else manifest["classes"]
        data = shards.read_shard(path)
        for row, image_id in enumerate(data.ids):
            if row in entry["retired"]:
                continue
            assert image_id not in rows, f"{image_id} is live twice"
            label = int(data.labels[row])
            rows[image_id] = (
                classes[label] if label >= 0 else None,
                data.splits[row],
                {key: values[row].tobytes() for key, values in data.features.items()},
            )
    return rows


def picture(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything would build a model."""
    monkeypatch.setattr("pipeline.engines.make_engine", lambda *a, **k: pytest.fail("a model was built"))


def update_line(result):
    return next(line for line in result.output.splitlines() if line.startswith("update: "))


def test_an_update_computes_only_new_and_changed_images_and_rewrites_no_shard(tmp_path, image_tree, run_cli):
    root, out = image_tree(), tmp_path / "f"
    first = run_cli("extract", root, "--out", out, *ARGS)
    assert update_line(first) == "update: added 6, changed 0, removed 0, restored 0, relabeled 0, unchanged 0, computed 6"
    before, rows_before = shard_files(out), live_rows(out)
    picture(root / "cat" / "003.png", seed=7)
    picture(root / "dog" / "001.png", seed=8)  # new content
    result = run_cli("extract", root, "--out", out, *ARGS)
    assert update_line(result) == "update: added 1, changed 1, removed 0, restored 0, relabeled 0, unchanged 5, computed 2"
    after = shard_files(out)
    assert {name: after[name] for name in before} == before  # no committed shard was rewritten (nor touched)
    assert sorted(after) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    manifest = shards.read_manifest(out)
    assert manifest["generation"] == 1 and manifest["rows"] == 7 and manifest["listed"] == 7
    assert [(e["file"], e["generation"], e["live"], e["retired"]) for e in manifest["shards"]] == [
        ("shard-00000.h5", 0, 4, []),
        ("shard-00001.h5", 0, 1, [0]),
        ("shard-00002.h5", 1, 2, []),  # dog/001.png's old row retired
    ]
    assert [{k: h[k] for k in ("generation", "added", "changed", "computed", "rows")} for h in manifest["history"]] == [
        {"generation": 0, "added": 6, "changed": 0, "computed": 6, "rows": 6},
        {"generation": 1, "added": 1, "changed": 1, "computed": 2, "rows": 7},
    ]
    assert shards.verify(out) == []
    rows = live_rows(out)
    assert {i: rows[i] for i in rows_before if i != "dog/001.png"} == {i: v for i, v in rows_before.items() if i != "dog/001.png"}
    run_cli("extract", root, "--out", tmp_path / "fresh", *ARGS)  # a first run over the new folder computes the same rows
    assert live_rows(tmp_path / "fresh") == rows
    again = run_cli("extract", root, "--out", out, *ARGS)
    assert f"{out} is up to date (7 rows); nothing to do" in again.output
    assert len(shards.read_manifest(out)["history"]) == 2  # a run that changed nothing adds no history


def test_removed_images_are_retired_and_restored_without_a_model(tmp_path, image_tree, run_cli, monkeypatch):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *ARGS)
    before, rows_before = shard_files(out), live_rows(out)
    shutil.copy2(root / "dog" / "000.png", tmp_path / "backup.png")
    (root / "dog" / "000.png").unlink()
    monkeypatch.setattr("pipeline.engines.make_engine", lambda *a, **k: pytest.fail("a model was built"))
    removed = run_cli("extract", root, "--out", out, *ARGS)
    assert update_line(removed) == "update: added 0, changed 0, removed 1, restored 0, relabeled 0, unchanged 5, computed 0"
    assert "0 shards written" in removed.output and shard_files(out) == before
    manifest = shards.read_manifest(out)
    assert manifest["rows"] == 5 and manifest["shards"][0]["retired"] == [3] and shards.verify(out) == []
    assert "dog/000.png" not in live_rows(out)
    shutil.copy2(tmp_path / "backup.png", root / "dog" / "000.png")  # back from the backup: same bytes, same mtime
    restored = run_cli("extract", root, "--out", out, *ARGS)
    assert update_line(restored) == "update: added 0, changed 0, removed 0, restored 1, relabeled 0, unchanged 5, computed 0"
    assert shard_files(out) == before and live_rows(out) == rows_before and shards.verify(out) == []
    assert [h["generation"] for h in shards.read_manifest(out)["history"]] == [0, 1, 2]


def test_a_relabel_copies_the_row_bytes_without_a_model_and_a_new_class_shifts_no_bytes(
    tmp_path, image_tree, run_cli, monkeypatch
):
    root, out = image_tree(), tmp_path / "f"
    lines = ["path,label,split"] + [f"{p.relative_to(root)},{p.parent.name},train" for p in sorted(root.glob("*/*.png"))]
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    run_cli("extract", root / "list.csv", "--out", out, *ARGS)
    before, rows_before = shard_files(out), live_rows(out)
    lines[1] = lines[1].replace(",cat,train", ",ant,train")  # a class that sorts first: every index shifts
    lines[5] = lines[5].replace(",train", ",test")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr("pipeline.engines.make_engine", lambda *a, **k: pytest.fail("a model was built"))
    result = run_cli("extract", root / "list.csv", "--out", out, *ARGS)
    assert update_line(result) == "update: added 0, changed 0, removed 0, restored 0, relabeled 2, unchanged 4, computed 0"
    assert {name: shard_files(out)[name] for name in before} == before
    manifest = shards.read_manifest(out)
    assert manifest["classes"] == ["ant", "cat", "dog"] and shards.verify(out) == []
    rows = live_rows(out)
    assert rows["cat/000.png"] == ("ant", "train", rows_before["cat/000.png"][2])  # the very feature bytes, the new label
    assert rows["dog/001.png"] == ("dog", "test", rows_before["dog/001.png"][2])
    assert {i: rows[i] for i in rows if i not in ("cat/000.png", "dog/001.png")} == {
        i: v for i, v in rows_before.items() if i not in ("cat/000.png", "dog/001.png")
    }


def test_a_rewrite_of_the_same_bytes_is_no_change_and_a_moved_image_keeps_its_features(
    tmp_path, image_tree, run_cli, monkeypatch
):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *ARGS)
    rows_before = live_rows(out)
    data = (root / "cat" / "001.png").read_bytes()
    (root / "cat" / "001.png").write_bytes(data)  # what `cp` without -p, a checkout or demo-data did: a new mtime
    os.utime(root / "cat" / "001.png", ns=(10**18, 10**18))
    monkeypatch.setattr("pipeline.engines.make_engine", lambda *a, **k: pytest.fail("a model was built"))
    touched = run_cli("extract", root, "--out", out, *ARGS)
    assert f"{out} is up to date (6 rows); nothing to do" in touched.output
    (root / "bird").mkdir()
    (root / "cat" / "002.png").rename(root / "bird" / "002.png")  # a new id, and bytes a row was made from
    moved = run_cli("extract", root, "--out", out, *ARGS)
    assert update_line(moved) == "update: added 1, changed 0, removed 1, restored 0, relabeled 0, unchanged 5, computed 0"
    rows = live_rows(out)
    assert rows["bird/002.png"] == ("bird", "", rows_before["cat/002.png"][2]) and "cat/002.png" not in rows
    assert shards.verify(out) == []


def test_demo_data_twice_leaves_every_file_alone(tmp_path, run_cli):
    run_cli("demo-data", tmp_path / "demo", "--size", 8)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*.png")}
    (next(iter(before))).write_bytes(b"damaged")
    run_cli("demo-data", tmp_path / "demo", "--size", 8)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*.png")}
    assert len(before) == 1797 and sum(before[p] != after[p] for p in before) == 1  # only the damaged one was written again


def flip_a_feature_byte(path):
    with h5py.File(path, "r") as f:
        offset = f["features/vgg16/block1_pool"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_shard_that_fails_its_checksum_is_recomputed_by_the_advised_rerun(tmp_path, image_tree, run_cli):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *ARGS)
    rows_before = live_rows(out)
    flip_a_feature_byte(out / "shard-00000.h5")
    verified = run_cli("inspect", out, "--verify", code=1)
    assert (
        "shard-00000.h5 cannot be read" in verified.output
        and "extract again (the same command) to recompute its rows" in verified.output
    )
    repaired = run_cli("extract", root, "--out", out, *ARGS)
    assert (
        f"warning: {out / 'shard-00000.h5'} was damaged (" in repaired.output
        and "so its rows were computed again" in repaired.output
    )
    assert "1 shards written" in repaired.output and not (out / "shard-00000.h5").exists()
    assert shards.verify(out) == [] and live_rows(out) == rows_before
    assert f"{out} is up to date" in run_cli("extract", root, "--out", out, *ARGS).output


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_an_up_to_date_rerun_removes_a_killed_run_s_temp_and_never_a_user_s_look_alike(tmp_path, image_tree, run_cli):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *ARGS)
    killed = temp_sibling(out / "manifest.json", pid=dead_pid())
    killed.write_text('{"half')
    alive = temp_sibling(out / "manifest.json")  # this process's: alive, so perhaps still being written
    alive.write_text('{"half')
    users = [out / ".thesis.123.abcdef12.tmp", out / ".manifest.json.4242.0badc0de.tmp"]
    for path in users:
        path.write_text("mine")
    result = run_cli("extract", root, "--out", out, *ARGS)
    assert "up to date" in result.output
    assert not killed.exists() and alive.exists() and all(path.read_text() == "mine" for path in users)


def test_an_update_killed_mid_shard_resumes_with_the_shards_it_finished(tmp_path, image_tree, run_cli, monkeypatch):
    root, out = image_tree(), tmp_path / "f"
    args = [*FAST, "--shard-size", "2"]
    run_cli("extract", root, "--out", out, *args)
    for i in range(3):
        picture(root / "cat" / f"01{i}.png", seed=20 + i)
    real, calls = shards.write_shard, []

    def killed_at_the_second(path, *a, **k):
        calls.append(path)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(shards, "write_shard", killed_at_the_second)
    run_cli("extract", root, "--out", out, *args, code=130)
    monkeypatch.setattr(shards, "write_shard", real)
    first_new = shard_files(out)["shard-00003.h5"]
    assert shards.read_manifest(out)["generation"] == 0  # the manifest still describes the committed state
    resumed = run_cli("extract", root, "--out", out, *args)
    assert "(1 shards written, 4 already done)" in resumed.output
    assert update_line(resumed) == "update: added 3, changed 0, removed 0, restored 0, relabeled 0, unchanged 6, computed 3"
    assert shard_files(out)["shard-00003.h5"] == first_new and shards.verify(out) == []
    assert shards.read_manifest(out)["rows"] == 9


def test_two_updates_at_once_the_second_is_refused_by_the_lock(tmp_path, image_tree, run_cli):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *ARGS)
    picture(root / "cat" / "003.png", seed=7)
    before = shard_files(out)
    with locked(out / ".pipeline.lock", "another update"):
        busy = run_cli("extract", root, "--out", out, *ARGS, code=1)
    assert f"features directory {out} is in use by PID {os.getpid()}" in busy.output
    assert shard_files(out) == before and shards.read_manifest(out)["rows"] == 6


def test_a_job_array_update_writes_the_plain_update_s_bytes(tmp_path, image_tree, run_cli):
    root = image_tree()
    args = [*FAST, "--shard-size", "2"]
    run_cli("extract", root, "--out", tmp_path / "plain", *args)
    shutil.copytree(tmp_path / "plain", tmp_path / "array")
    for i in range(3):
        picture(root / "dog" / f"01{i}.png", seed=30 + i)
    (root / "cat" / "000.png").unlink()
    run_cli("extract", root, "--out", tmp_path / "plain", *args)
    for task in (1, 0):
        result = run_cli("extract", root, "--out", tmp_path / "array", *args, "--num-workers", 2, "--worker-index", task)
        assert f"job-array task {task} of 2: 1 shards written" in result.output
    assert shards.read_manifest(tmp_path / "array")["generation"] == 0  # tasks write no manifest
    final = run_cli("extract", root, "--out", tmp_path / "array", *args)
    assert "(0 shards written" in final.output
    plain, array = shard_files(tmp_path / "plain"), shard_files(tmp_path / "array")
    assert {name: b for name, (_, b) in plain.items()} == {name: b for name, (_, b) in array.items()}
    assert shards.without_run_facts(shards.read_manifest(tmp_path / "plain")) == shards.without_run_facts(
        shards.read_manifest(tmp_path / "array")
    )


def test_compact_drops_retired_rows_keeps_live_bytes_and_the_next_rerun_is_up_to_date(tmp_path, image_tree, run_cli, monkeypatch):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *ARGS)
    (root / "cat" / "000.png").unlink()
    picture(root / "dog" / "002.png", seed=40)
    picture(root / "dog" / "005.png", seed=41)
    run_cli("extract", root, "--out", out, *ARGS)
    rows, manifest = live_rows(out), shards.read_manifest(out)
    assert sum(len(e["retired"]) for e in manifest["shards"]) == 2
    inspected = run_cli("inspect", out)
    assert "generation 0: 2 shards, 4 live rows, 2 retired" in inspected.output
    assert "generation 1: 1 shard, 2 live rows, 0 retired" in inspected.output
    assert (
        "update 1 at " in inspected.output
        and "added 1, changed 1, removed 1, restored 0, relabeled 0, computed 2" in inspected.output
    )
    result = run_cli("compact", out)
    assert f"compacted {out}: 6 live rows kept, 2 retired rows dropped, 3 -> 2 shards" in result.output
    compacted = shards.read_manifest(out)
    assert [(e["file"], e["rows"], e["retired"]) for e in compacted["shards"]] == [
        ("shard-00000.h5", 4, []),
        ("shard-00001.h5", 2, []),
    ]
    assert compacted["history"] == manifest["history"] and compacted["generation"] == 1
    assert live_rows(out) == rows and shards.verify(out) == [] and not list(tmp_path.glob(".f.*"))
    assert "has no retired rows; nothing to compact" in run_cli("compact", out).output
    monkeypatch.setattr("pipeline.engines.make_engine", lambda *a, **k: pytest.fail("a model was built"))
    assert f"{out} is up to date (6 rows)" in run_cli("extract", root, "--out", out, *ARGS).output


def test_a_compact_that_fails_midway_leaves_the_old_directory_whole(tmp_path, image_tree, run_cli, monkeypatch):
    root, out = image_tree(per_class=4), tmp_path / "f"
    run_cli("extract", root, "--out", out, *ARGS)
    (root / "cat" / "000.png").unlink()
    run_cli("extract", root, "--out", out, *ARGS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = shards.write_shard, []

    def full_at_the_second(path, *a, **k):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(shards, "write_shard", full_at_the_second)
    run_cli("compact", out, code=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not list(tmp_path.glob(".f.*"))
    monkeypatch.setattr(shards, "write_shard", real)
    flip_a_feature_byte(out / "shard-00000.h5")
    refused = run_cli("compact", out, code=1)
    assert f"Error: {out} has 1 problem(s) (shard-00000.h5 cannot be read" in refused.output
    assert "rerun `pipeline extract` to repair it, then compact" in refused.output


def test_inspect_verify_checks_the_retired_bookkeeping(tmp_path, image_tree, run_cli):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *ARGS)
    (root / "dog" / "000.png").unlink()
    run_cli("extract", root, "--out", out, *ARGS)
    good = json.loads((out / "manifest.json").read_text())

    def problems(change):
        """verify's problems with a changed manifest (inspect --verify stops at the first contradiction the reader finds)."""
        manifest = json.loads(json.dumps(good))
        change(manifest)
        (out / "manifest.json").write_text(json.dumps(manifest))
        assert "problem: " in run_cli("inspect", out, "--verify", code=1).output
        return "\n".join(shards.verify(out))

    assert "shard-00000.h5: retired rows must be ascending, unique and within 0..3" in problems(
        lambda m: m["shards"][0].update(retired=[3, 9])
    )
    assert "shard-00000.h5: 4 live rows, but 4 rows less 1 retired are 3" in problems(lambda m: m["shards"][0].update(live=4))
    assert "'dog/000.png' is live" not in problems(lambda m: m["shards"][0].update(retired=[], live=4))
    assert "shards hold 6 live rows, manifest says 5" in problems(lambda m: m["shards"][0].update(retired=[], live=4))
    later = problems(lambda m: m["shards"][0].update(generation=2))
    assert (
        "shard-00000.h5 is of generation 0, manifest says 2" in later
        and "a shard of generation 2 is newer than the manifest's generation 1" in later
    )
    (out / "manifest.json").write_text(json.dumps(good))
    assert "verified: 2 shards, 5 rows, no problems" in run_cli("inspect", out, "--verify").output


def test_other_feature_settings_are_refused_naming_each_setting(tmp_path, image_tree, run_cli):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *ARGS)
    picture(root / "cat" / "003.png", seed=7)  # other images alone are an update, so only the settings are named
    result = run_cli("extract", root, "--out", out, *ARGS, "--pooling", "max", "--image-size", "40", code=1)
    assert (
        f"{out} holds features made with other settings (pooling: 'avg' -> 'max', image_size: 32 -> 40); "
        "use another --out or pass --overwrite"
    ) in result.output


def test_a_ray_update_writes_the_local_update_s_features(tmp_path, image_tree, run_cli):
    root = image_tree()
    args = [*FAST[:4], "--tap", "vgg16:block1_pool", "--shard-size", "2"]  # one small backbone: the actor builds it quicker
    run_cli("extract", root, "--out", tmp_path / "local", *args)
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    for i in range(3):
        picture(root / "cat" / f"01{i}.png", seed=50 + i)
    (root / "dog" / "002.png").unlink()
    run_cli("extract", root, "--out", tmp_path / "local", *args)
    result = run_cli("extract", root, "--out", tmp_path / "ray", *args, "--engine", "ray", "--workers", 1)
    assert update_line(result) == "update: added 3, changed 0, removed 1, restored 0, relabeled 0, unchanged 5, computed 3"
    assert len(shard_files(tmp_path / "ray")) == 5
    # An actor may run other intra-op threads than this process: the README's promise across engines, not bytes.
    assert_same_features(tmp_path / "ray", tmp_path / "local")
