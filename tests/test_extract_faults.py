"""Stage one under faults: what a killed, concurrent, misconfigured or starved run leaves behind."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from helpers import FAST, files_bytes, without_timing
from pipeline import shards
from pipeline.engines import worker as worker_module
from pipeline.engines.worker import row_cosines
from pipeline.files import locked


def test_whole_shard_files_are_byte_identical_across_runs(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=3)
    for out in ("one", "two"):
        run_cli("extract", root, "--out", tmp_path / out, *FAST, "--shard-size", 4)
    assert files_bytes(tmp_path / "one") == files_bytes(tmp_path / "two") and len(files_bytes(tmp_path / "one")) == 2


def test_a_first_shard_only_the_fallback_decodes_is_checked_and_resumes_to_the_same_manifest(tmp_path, run_cli):
    """Regression: shard 0 all TIFF used to crash the fidelity check with StopIteration."""
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.{'tiff' if i < 3 else 'png'}")
    args = [*FAST, "--shard-size", 3, "--precision", "mixed_bfloat16"]
    whole = run_cli("extract", tmp_path / "images", "--out", tmp_path / "whole", *args)
    manifest = shards.read_manifest(tmp_path / "whole")
    assert manifest["rows"] == 6 and manifest["errors"] == []
    assert 0.99 < manifest["precision"]["min_cosine_vs_float32"] < 1.0
    assert manifest["precision"]["rows_checked"] == 6  # both shards, the all-TIFF one included
    assert "min cosine vs float32" in whole.output

    run_cli("extract", tmp_path / "images", "--out", tmp_path / "resumed", *args)
    (tmp_path / "resumed" / "manifest.json").unlink()
    (tmp_path / "resumed" / "shard-00001.h5").unlink()
    run_cli("extract", tmp_path / "images", "--out", tmp_path / "resumed", *args)
    resumed = shards.read_manifest(tmp_path / "resumed")
    assert without_timing(resumed) == without_timing(manifest)


def test_row_cosines_of_zero_rows():
    zeros, ones = np.zeros((1, 3)), np.ones((1, 3))
    assert row_cosines(zeros, zeros).tolist() == [1.0]
    assert row_cosines(zeros, ones).tolist() == [0.0]  # not 1.0: the check must not pass a dead row
    assert row_cosines(ones, -ones)[0] == pytest.approx(-1.0)


def test_non_finite_features_stop_the_run_naming_the_image(tmp_path, image_tree, run_cli, monkeypatch):
    real = worker_module._TapRunner.__call__

    def poisoned(self, images):
        features = real(self, images)
        key = next(iter(features))
        features[key][0, 0] = np.inf
        return features

    monkeypatch.setattr(worker_module._TapRunner, "__call__", poisoned)
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST, code=1)
    assert "gives non-finite features (NaN or Inf) for cat/000.png at tap resnet50/conv2_block1_out" in result.output
    assert "--precision float32" in result.output
    assert not (tmp_path / "f" / "manifest.json").exists()


def test_overwrite_with_weights_that_fail_to_load_keeps_the_old_features(tmp_path, image_tree, run_cli):
    root = image_tree()
    run_cli("extract", root, "--out", tmp_path / "f", *FAST)
    before = {p.name: p.read_bytes() for p in (tmp_path / "f").iterdir() if not p.name.startswith(".")}
    (tmp_path / "junk.weights.h5").write_text("not weights")
    spec = f"resnet50=random,vgg16={tmp_path / 'junk.weights.h5'}"
    result = run_cli("extract", root, "--out", tmp_path / "f", *FAST, "--weights", spec, "--overwrite", code=1)
    assert "could not load vgg16 weights from" in result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "f").iterdir() if not p.name.startswith(".")} == before


def test_a_changed_image_is_computed_again_and_its_old_row_retired(tmp_path, image_tree, run_cli):
    root = image_tree()
    run_cli("extract", root, "--out", tmp_path / "f", *FAST)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "dog" / "001.png")
    os.utime(root / "dog" / "001.png", ns=(10**18, 10**18))
    updated = run_cli("extract", root, "--out", tmp_path / "f", *FAST)
    assert "update: added 0, changed 1, removed 0, restored 0, relabeled 0, unchanged 5, computed 1" in updated.output
    manifest = shards.read_manifest(tmp_path / "f")
    assert manifest["rows"] == 6 and manifest["shards"][0]["retired"] == [4] and shards.verify(tmp_path / "f") == []
    assert "up to date" in run_cli("extract", root, "--out", tmp_path / "f", *FAST).output


def test_progress_on_resume_counts_the_finished_shards(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=4)
    run_cli("extract", root, "--out", tmp_path / "f", *FAST, "--shard-size", 3)
    (tmp_path / "f" / "manifest.json").unlink()
    (tmp_path / "f" / "shard-00002.h5").unlink()
    output = run_cli("extract", root, "--out", tmp_path / "f", *FAST, "--shard-size", 3).output
    assert "extract: 6/8 images done by an earlier run" in output
    assert "extract: 8/8 images" in output


def test_an_up_to_date_rerun_or_one_that_only_writes_the_manifest_builds_no_model(tmp_path, image_tree, run_cli, monkeypatch):
    root = image_tree()
    run_cli("extract", root, "--out", tmp_path / "f", *FAST, "--shard-size", 4)
    monkeypatch.setattr("pipeline.engines.make_engine", lambda *a, **k: pytest.fail("a model was built"))
    assert "up to date" in run_cli("extract", root, "--out", tmp_path / "f", *FAST, "--shard-size", 4).output
    (tmp_path / "f" / "manifest.json").unlink()
    assert (
        "0 shards written, 2 already done" in run_cli("extract", root, "--out", tmp_path / "f", *FAST, "--shard-size", 4).output
    )


def test_an_edited_manifest_is_rebuilt_from_the_shards(tmp_path, image_tree, run_cli):
    root = image_tree()
    run_cli("extract", root, "--out", tmp_path / "f", *FAST)
    path = tmp_path / "f" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "rows": 5}))
    result = run_cli("extract", root, "--out", tmp_path / "f", *FAST)
    assert "manifest.json did not match its shards, so it was rebuilt from them" in result.output
    assert shards.read_manifest(tmp_path / "f")["rows"] == 6 and shards.verify(tmp_path / "f") == []


def test_a_second_writer_fails_naming_the_process_that_holds_the_directory(tmp_path, image_tree, run_cli):
    (tmp_path / "f").mkdir()
    with locked(tmp_path / "f" / ".pipeline.lock", "test"):
        result = run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST, code=1)
    assert f"features directory {tmp_path / 'f'} is in use by PID {os.getpid()} on " in result.output
    assert not (tmp_path / "f" / "manifest.json").exists()
    run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST)  # the lock is free again: it runs


def test_only_temp_files_this_tool_made_are_cleaned_up(tmp_path, image_tree, run_cli):
    from pipeline.files import temp_sibling

    (tmp_path / "f").mkdir()
    done = subprocess.Popen(["true"])
    done.wait()
    temp_sibling(tmp_path / "f" / "shard-00000.h5", pid=done.pid).write_bytes(b"half a shard")  # a killed run's
    run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST)
    assert not list((tmp_path / "f").glob("*.tmp")) and shards.verify(tmp_path / "f") == []
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / ".notes.12345.0badc0de.tmp").write_text("mine")  # named like the old temps: not ours
    refused = run_cli("extract", image_tree(), "--out", tmp_path / "g", *FAST, code=1)
    assert "is not empty and holds no features (it has .notes.12345.0badc0de.tmp)" in refused.output
    assert (tmp_path / "g" / ".notes.12345.0badc0de.tmp").read_text() == "mine"


def test_disk_full_while_writing_stops_at_once_keeps_finished_shards_and_resumes(tmp_path, image_tree, run_cli, monkeypatch):
    root = image_tree(per_class=6)
    args = [*FAST, "--shard-size", 3, "--batch-size", 3]
    real, calls = shards.write_shard, []

    def full_after_one(path, *a, **k):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(shards, "write_shard", full_after_one)
    progress_seen = []
    monkeypatch.setattr(worker_module._ShardAssembler, "add", _counting(worker_module._ShardAssembler.add, progress_seen))
    result = run_cli("extract", root, "--out", tmp_path / "f", *args, code=1)
    assert "no space left on device; the shards written so far are kept" in result.output
    assert "rerun the same command to resume" in result.output and "Traceback" not in result.output
    assert len(progress_seen) < 4  # it stopped at the failed write, not after all 4 shards' batches
    assert [p.name for p in shards.existing_shards(tmp_path / "f")] == ["shard-00000.h5"]
    monkeypatch.setattr(shards, "write_shard", real)
    resumed = run_cli("extract", root, "--out", tmp_path / "f", *args)
    assert "already done" in resumed.output and shards.verify(tmp_path / "f") == []


def _counting(method, seen):
    def add(self, indices, images):
        seen.append(len(indices))
        return method(self, indices, images)

    return add


def test_too_little_free_space_fails_before_computing(tmp_path, image_tree, run_cli, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("pipeline.files.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    monkeypatch.setattr(worker_module.ShardWorker, "run", lambda *a, **k: pytest.fail("images were computed"))
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST, code=1)
    assert "1 shards need about" in result.output and "MiB are free" in result.output


def test_a_read_only_output_is_one_sentence(tmp_path, image_tree, run_cli):
    if os.geteuid() == 0:
        pytest.skip("root writes through read-only permissions")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        result = run_cli("extract", image_tree(), "--out", tmp_path / "ro", *FAST, code=1)
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert "cannot write to" in result.output and "Traceback" not in result.output


def test_an_output_below_a_file_is_one_sentence(tmp_path, image_tree, run_cli):
    (tmp_path / "file").write_text("x")
    result = run_cli("extract", image_tree(), "--out", tmp_path / "file" / "sub", *FAST, code=1)
    assert "cannot be made" in result.output and "is a file" in result.output


def extract_argv(root, out, *extra):
    return [
        sys.executable,
        "-m",
        "pipeline",
        "extract",
        str(root),
        "--out",
        str(out),
        *FAST,
        "--shard-size",
        "2",
        *map(str, extra),
    ]


def test_job_array_tasks_then_a_plain_rerun_give_the_plain_run_s_bytes(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=5)  # 10 images, 5 shards
    tasks = [
        subprocess.Popen(
            extract_argv(root, tmp_path / "array", "--num-workers", 2, "--worker-index", i),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    assert "job-array task 0 of 2: 3 shards written" in outputs[0][0]
    assert "job-array task 1 of 2: 2 shards written" in outputs[1][0]
    assert not (tmp_path / "array" / "manifest.json").exists()
    final = run_cli("extract", *extract_argv(root, tmp_path / "array")[4:])
    assert "0 shards written, 5 already done" in final.output
    run_cli("extract", *extract_argv(root, tmp_path / "plain")[4:])
    assert files_bytes(tmp_path / "array") == files_bytes(tmp_path / "plain")
    assert without_timing(shards.read_manifest(tmp_path / "array")) == without_timing(shards.read_manifest(tmp_path / "plain"))


def test_slurm_array_variables_give_the_task_its_share(tmp_path, image_tree, run_cli, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST, "--shard-size", 1)
    assert "job-array task 1 of 3: 2 shards written" in result.output  # shards 1 and 4 of 6
    assert [p.name for p in shards.existing_shards(tmp_path / "f")] == ["shard-00001.h5", "shard-00004.h5"]


def test_flipped_feature_bytes_fail_verify(tmp_path, image_tree, run_cli):
    run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST)
    path = tmp_path / "f" / "shard-00000.h5"
    with h5py.File(path, "r") as f:
        dataset = f["features/vgg16/block1_pool"]
        assert dataset.fletcher32
        chunk = dataset.id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_cli("inspect", tmp_path / "f", "--verify", code=1)
    assert (
        "shard-00000.h5 cannot be read" in result.output
        and "extract again (the same command) to recompute its rows" in result.output
    )


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_so_in_one_line_and_resumes(tmp_path, image_tree, run_cli, signum, status):
    root = image_tree(per_class=30)
    out = tmp_path / "f"
    argv = [*extract_argv(root, out)[:-2], "--shard-size", "4", "--batch-size", "2"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "shard-00000.h5").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in stderr and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    resumed = run_cli("extract", *argv[4:])
    assert "already done" in resumed.output and shards.verify(out) == []


def test_a_job_array_task_without_shards_of_its_own_builds_no_model(tmp_path, image_tree, run_cli, monkeypatch):
    monkeypatch.setattr("pipeline.engines.make_engine", lambda *a, **k: pytest.fail("a model was built"))
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST, "--num-workers", 4, "--worker-index", 3)
    assert "job-array task 3 of 4: 0 shards written" in result.output  # 6 images make one shard, task 0's
    assert not list((tmp_path / "f").glob("shard-*"))
