"""Stage two (a) under faults: concurrent reduces, damaged inputs and outputs, full disks, NaN, degenerate splits."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from collections import namedtuple

import h5py
import joblib
import numpy as np
import pytest

from helpers import QUICK_HEAD, sha256, tree_bytes
from pipeline import reduce as reduce_module
from pipeline import reduced as reduced_module
from pipeline.config import HeadConfig, ReduceConfig
from pipeline.errors import PipelineError
from pipeline.files import leftover_temps, lock_beside, locked
from pipeline.reduce import reduce_features
from pipeline.reduced import load_reduced
from pipeline.train import train


def test_a_second_reduce_into_one_out_fails_naming_the_process(reduced, run_cli):
    features, out = reduced
    with locked(lock_beside(out), "test"):
        result = run_cli("reduce", features, "--out", out, "--components", 5, "--overwrite", code=1)
    assert f"reduced directory {out} is in use by PID {os.getpid()} on " in result.output
    assert load_reduced(out).X.shape[1] == 4
    run_cli("reduce", features, "--out", out, "--components", 5, "--overwrite")  # free again
    assert load_reduced(out).X.shape[1] == 5


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_lock_whose_holder_note_cannot_be_written_still_locks():
    """Regression: on a full disk the lock file's buffered note failed at close, masking the command's own error."""
    with pytest.raises(RuntimeError, match="the command's own error"):
        with locked("/dev/full", "test"):  # every write to /dev/full fails with ENOSPC
            raise RuntimeError("the command's own error")


def test_load_reduced_hashes_the_very_reduce_json_it_parsed(reduced, monkeypatch):
    """Regression: reduce.json was parsed, then hashed in a second read; a reduce --overwrite in between gave a run the new
    sha256 with the old X."""
    _, out = reduced
    original = (out / "reduce.json").read_bytes()
    real = h5py.File

    def rewritten_meanwhile(*args, **kwargs):
        (out / "reduce.json").write_bytes(original.replace(b"{", b'{"other": 1, ', 1))  # another reduction lands
        return real(*args, **kwargs)

    monkeypatch.setattr(reduced_module.h5py, "File", rewritten_meanwhile)
    data = load_reduced(out)
    assert data.report_sha256 == hashlib.sha256(original).hexdigest() and "other" not in data.report


def test_a_reduce_and_a_load_of_one_reduced_dir_exclude_each_other(reduced, run_cli):
    features, out = reduced
    with locked(lock_beside(out), "a reduce"):
        with pytest.raises(PipelineError, match=f"reduced directory {out} is in use by PID {os.getpid()}") as caught:
            load_reduced(out)
    assert type(caught.value) is PipelineError  # not LockBusy, which train would take for a run another process holds
    with reduced_module._reading(out):
        assert load_reduced(out).X.shape[1] == 4  # readers share the lock
        result = run_cli("reduce", features, "--out", out, "--components", 5, "--overwrite", code=1)
    assert f"reduced directory {out} is in use by PID {os.getpid()}" in result.output and load_reduced(out).X.shape[1] == 4


def test_two_reduces_with_other_settings_at_once_leave_one_consistent_reduction(features_dir, tmp_path):
    """Regression: both used to write one fixed .partial dir, leaving reduce.json of one and transform.joblib of the other."""
    features, out = features_dir(n=300, shard_size=50), tmp_path / "reduced"
    argv = [sys.executable, "-m", "pipeline", "reduce", str(features), "--out", str(out), "--overwrite", "--solver", "full"]
    processes = [
        subprocess.Popen([*argv, "--components", str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in (16, 24)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    codes = [p.returncode for p in processes]
    assert 0 in codes and set(codes) <= {0, 1}, outputs
    for (_, stderr), code in zip(outputs, codes):
        if code:
            assert "is in use by PID" in stderr and "Traceback" not in stderr
    data = load_reduced(out)
    transform = joblib.load(out / "transform.joblib")
    assert data.X.shape[1] == data.report["components"] == transform.pca_.n_components_ == data.report["config"]["components"]
    assert not leftover_temps(tmp_path)


def test_a_killed_reduce_s_staging_dir_is_removed_by_the_next(reduced, run_cli):
    features, out = reduced
    import subprocess

    from pipeline.files import temp_sibling

    killed = subprocess.Popen(["true"])
    killed.wait()
    leftover = temp_sibling(out, pid=killed.pid)
    leftover.mkdir()
    (leftover / "reduced.h5").write_bytes(b"half")
    run_cli("reduce", features, "--out", out, "--components", 4)
    assert not leftover.exists()


@pytest.mark.parametrize("solver", ["incremental", "full"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_features_name_the_tap_and_the_rows(features_dir, tmp_path, run_cli, solver, value):
    """Regression: NaN with --solver incremental gave all-NaN reduced rows and exit 0; the rest raw tracebacks."""
    features = features_dir(n=90, shard_size=30)
    with h5py.File(features / "shard-00001.h5", "r+") as f:
        f["features/vgg16/block5_conv3"][2, 5] = value
        f["features/vgg16/block5_conv3"][7, 0] = value
    result = run_cli(
        "reduce", features, "--out", tmp_path / "reduced", "--solver", solver, "--components", 4, "--batch-rows", 16, code=1
    )
    assert "hold NaN or Inf: tap vgg16/block5_conv3 in 2 of 90 rows (first 'img00032.png')" in result.output
    assert "resnet50" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "reduced").exists()


def test_disk_full_while_writing_keeps_the_previous_reduction_and_a_rerun_completes(reduced, run_cli, monkeypatch):
    features, out = reduced
    before = tree_bytes(out)
    real = reduce_module.write_reduced

    def full(path, *args):
        path.write_bytes(b"part of a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(reduce_module, "write_reduced", full)
    result = run_cli("reduce", features, "--out", out, "--components", 5, "--overwrite", code=1)
    assert (
        f"cannot write reduced directory {out}: no space left on device; the previous reduction in it is unchanged"
        in result.output
    )
    assert "Traceback" not in result.output
    assert tree_bytes(out) == before and not leftover_temps(out.parent)
    monkeypatch.setattr(reduce_module, "write_reduced", real)
    run_cli("reduce", features, "--out", out, "--components", 5, "--overwrite")
    assert load_reduced(out).X.shape[1] == 5


def test_too_little_free_space_fails_before_writing(reduced, run_cli, monkeypatch):
    features, out = reduced
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(reduce_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = run_cli("reduce", features, "--out", out.parent / "other", "--components", 4, code=1)
    assert "the reduced directory needs about" in result.output and "MiB are free" in result.output
    assert not (out.parent / "other").exists()


def test_a_truncated_reduced_h5_is_rebuilt_by_reduce_and_refused_by_train(reduced, tmp_path, run_cli):
    """Regression: it used to be "up to date" for reduce and a traceback in train."""
    features, out = reduced
    list(train(out, tmp_path / "runs", [HeadConfig(hidden=(4,), epochs=1)]))
    intact, report = (out / "reduced.h5").read_bytes(), (out / "reduce.json").read_bytes()
    (out / "reduced.h5").write_bytes(intact[: len(intact) // 2])
    refused = run_cli("train", out, "--runs", tmp_path / "runs", *QUICK_HEAD, code=1)
    assert f"{out / 'reduced.h5'} is damaged" in refused.output
    assert "rerun the same `pipeline reduce` command to rebuild it" in refused.output
    repaired = run_cli("reduce", features, "--out", out, "--components", 4)
    assert f"{out / 'reduced.h5'} is damaged" in repaired.output and "so it was reduced again" in repaired.output
    # byte-identical outputs, so the old record (and every run that links to it) stays valid
    assert (out / "reduced.h5").read_bytes() == intact and (out / "reduce.json").read_bytes() == report
    assert "already done" in run_cli("train", out, "--runs", tmp_path / "runs", "--hidden", 4, "--epochs", 1).output


def test_a_truncated_reduced_h5_from_before_the_sha256_fields_is_reduced_again(reduced, run_cli):
    features, out = reduced
    report = json.loads((out / "reduce.json").read_text())
    del report["outputs"]
    (out / "reduce.json").write_text(json.dumps(report))
    data = (out / "reduced.h5").read_bytes()
    (out / "reduced.h5").write_bytes(data[: len(data) // 2])
    repaired = run_cli("reduce", features, "--out", out, "--components", 4)
    assert f"{out / 'reduced.h5'} cannot be read (" in repaired.output and "so it was reduced again" in repaired.output
    assert load_reduced(out).X.shape == (90, 4)


def test_reruns_write_byte_identical_reduced_files(features_dir, tmp_path):
    features = features_dir(n=90, shard_size=30)
    for name in ("one", "two"):
        reduce_features(features, tmp_path / name, ReduceConfig(components=4, solver="incremental", batch_rows=20))
    for name in ("reduced.h5", "transform.joblib"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    outputs = json.loads((tmp_path / "one" / "reduce.json").read_text())["outputs"]
    assert outputs == {name: sha256(tmp_path / "one" / name) for name in ("reduced.h5", "transform.joblib")}


def test_a_features_dir_missing_or_damaging_a_shard_is_one_sentence(features_dir, tmp_path, run_cli):
    features = features_dir(n=90, shard_size=30)
    shard = features / "shard-00001.h5"
    intact = shard.read_bytes()
    shard.unlink()
    missing = run_cli("reduce", features, "--out", tmp_path / "reduced", code=1)
    assert f"{shard} is listed in the manifest but is missing" in missing.output and "rerun `pipeline extract`" in missing.output
    shard.write_bytes(intact)
    with h5py.File(shard, "r") as f:
        offset = f["features/vgg16/block5_conv3"].id.get_chunk_info(0).byte_offset
    data = bytearray(intact)
    data[offset + 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    damaged = run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", 4, code=1)
    assert f"cannot read {shard}" in damaged.output and f"`pipeline inspect {features} --verify`" in damaged.output
    assert "Traceback" not in damaged.output and not (tmp_path / "reduced").exists()


def test_an_empty_train_split_or_too_many_components_is_refused(features_dir, tmp_path, run_cli):
    given = features_dir(n=40, splits=lambda i: "val" if i % 2 else "test", name="all-given")
    no_train = run_cli("reduce", given, "--out", tmp_path / "a", code=1)
    assert "only 0 of 40 rows are in train; PCA needs at least 2" in no_train.output
    features = features_dir(n=20)
    many = run_cli("reduce", features, "--out", tmp_path / "b", "--components", 14, "--whiten", code=1)
    assert (
        "--components 14 is more than the maximum of 13 here (the least of 14 train rows minus one, since centred rows "
        "span one direction fewer, and 40 features)"
    ) in many.output
    run_cli("reduce", features, "--out", tmp_path / "b", "--components", 13, "--whiten")
    data = load_reduced(tmp_path / "b")
    train_rows = data.X[data.splits == "train"]
    assert (
        np.isfinite(data.X).all() and np.abs(train_rows.std(axis=0, ddof=1) - 1).max() < 1e-3
    )  # every column whitened, none blown up
