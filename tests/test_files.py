"""Atomic writes that survive a power loss: the new bytes are fsynced before the rename, the directory after."""

import os
import shutil
import subprocess

import numpy as np
import pytest

from pipeline import files, shards
from pipeline.errors import PipelineError


@pytest.fixture
def disk_log(monkeypatch):
    """Every fsync (as the path its descriptor names) and every rename, in order."""
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


def assert_durable(events, path, synced=()):
    """`path` was renamed into place after its temp (and `synced`, relative to it) were fsynced, and its directory after."""
    path = str(path)
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == path]
    assert renames, f"{path} was never renamed into place: {events}"
    rename = renames[-1]
    tmp = events[rename][1]
    before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert tmp in before, f"{tmp} renamed onto {path} without an fsync first: {events}"
    for name in synced:
        assert os.path.join(tmp, name) in before, f"{name} in {tmp} was not fsynced before the rename: {events}"
    after = [e[1] for e in events[rename + 1 :] if e[0] == "fsync"]
    assert os.path.dirname(path) in after, f"the directory of {path} was not fsynced after the rename: {events}"


def test_a_shard_and_the_manifest_are_fsynced_before_the_rename_and_their_directory_after(tmp_path, disk_log):
    data = shards.ShardData(["a", "b"], np.array([0, 1], np.int32), ["", ""], {"vgg16/block1_pool": np.ones((2, 3), np.float32)})
    shards.write_shard(tmp_path / "shard-00000.h5", data, index=0, config_sha256="abc", config={})
    assert_durable(disk_log, tmp_path / "shard-00000.h5")
    disk_log.clear()
    shards.write_manifest(tmp_path, {"format": "x"})
    assert_durable(disk_log, tmp_path / "manifest.json")
    assert shards.read_shard(tmp_path / "shard-00000.h5").ids == ["a", "b"]


def test_every_atomic_writer_is_durable(tmp_path, disk_log):
    with files.atomic_path(tmp_path / "leaderboard.csv") as tmp:
        tmp.write_text("a,b\n")
    assert_durable(disk_log, tmp_path / "leaderboard.csv")

    for round_ in range(2):  # a new directory, then one that replaces it
        disk_log.clear()
        with files.atomic_dir(tmp_path / "reduced") as staging:
            (staging / "sub").mkdir()
            (staging / "sub" / "x.bin").write_bytes(b"x" * round_)
            (staging / "reduce.json").write_text("{}")
        assert_durable(disk_log, (tmp_path / "reduced").absolute(), synced=("sub/x.bin", "sub", "reduce.json"))
        assert (tmp_path / "reduced" / "sub" / "x.bin").read_bytes() == b"x" * round_
    assert files.leftover_temps(tmp_path) == []


def test_a_failed_fsync_renames_nothing(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text("old\n")

    def fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        files.write_json(tmp_path / "manifest.json", {"new": True})
    assert (tmp_path / "manifest.json").read_text() == "old\n" and files.leftover_temps(tmp_path) == []


def test_the_output_guard_makes_the_folder_locks_and_removes_only_a_killed_writer_s_temps(tmp_path):
    out = tmp_path / "new" / "out.csv"
    with files.output_guard(out, "predictions file"):  # makes new/ and takes new/.out.csv.lock
        ended = subprocess.Popen(["true"])
        ended.wait()
        killed = files.temp_sibling(out, pid=ended.pid)  # a writer that is provably dead
        other = files.temp_sibling(tmp_path / "new" / "other.csv", pid=ended.pid)
        killed.write_text("half"), other.write_text("another output's")
        with pytest.raises(files.LockBusy, match=f"^predictions file is in use by PID {os.getpid()} on "):
            with files.output_guard(out, "predictions file"):
                pass
    with files.output_guard(out, "predictions file"):
        assert not killed.exists() and other.exists()  # only temps of this output, under its lock
    inside = tmp_path / "features"
    with files.output_guard(inside, "features directory", into=True):
        (inside / "shard-00000.h5").touch()
        files.temp_sibling(inside / "shard-00001.h5", pid=ended.pid).write_text("half")
    with files.output_guard(inside, "features directory", into=True, shared=True):
        assert len(files.leftover_temps(inside)) == 1  # a shared holder (a job-array task) removes nothing
    with files.output_guard(inside, "features directory", into=True):
        assert files.leftover_temps(inside) == [] and (inside / "shard-00000.h5").exists()
    assert (inside / files.DIR_LOCK_NAME).exists()


def test_the_free_space_check_counts_what_the_old_output_frees(tmp_path, monkeypatch):
    usage = shutil._ntuple_diskusage(10**12, 10**12 - 2**20, 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    files.check_space(tmp_path / "not" / "yet", 2**20, "it needs")  # measured where the nearest existing folder is
    files.check_space(tmp_path, 3 * 2**20, "it needs", freeable=2 * 2**20)
    with pytest.raises(PipelineError) as error:
        files.check_space(tmp_path / "out", 5 * 2**20, "2 shards need", freeable=2 * 2**20, freed_by="the old features")
    assert str(error.value) == (
        f"2 shards need about 5 MiB but only 1 MiB are free (plus 2 MiB the old features would free) where {tmp_path / 'out'} goes; "
        "free space (or use another --out) and rerun"
    )


def test_only_temps_of_this_tool_whose_writer_is_provably_dead_are_leftovers(tmp_path):
    import subprocess

    done = subprocess.Popen(["true"])
    done.wait()
    dead = files.temp_sibling(tmp_path / "manifest.json", pid=done.pid)
    alive = files.temp_sibling(tmp_path / "manifest.json")  # this process
    elsewhere = tmp_path / f".manifest.json.pipeline-{files.host_tag('another-host')}-{done.pid}.0badc0de.tmp"
    look_alikes = [tmp_path / ".thesis.123.abcdef12.tmp", tmp_path / ".manifest.json.4242.0badc0de.tmp"]
    for path in (dead, alive, elsewhere, *look_alikes):
        path.write_text("x")
    assert files.is_temp(dead.name) and files.is_temp(elsewhere.name) and not any(files.is_temp(p.name) for p in look_alikes)
    assert files.leftover_temps(tmp_path) == [dead] and files.leftover_temps(tmp_path, "other") == []


def test_swap_dir_puts_the_new_directory_in_place_in_one_step(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("old")
    new = files.temp_sibling(tmp_path / "d")
    new.mkdir()
    (new / "new").write_text("new")
    files.swap_dir(new, tmp_path / "d")
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and [p.name for p in (tmp_path / "d").iterdir()] == ["new"]
