"""The shard worker itself: the Pillow fallback's memory, what float16 storage can hold, the writer's bookkeeping."""

import concurrent.futures

import h5py
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import shards
from pipeline.engines import worker as worker_module
from pipeline.inputs import UndecodableImage, decode_with_pillow, resize_image
from helpers import FAST, files_bytes

def _fallback_before_batching(self, missing):
    """The fallback as it was: every picture of the shard decoded first, then computed batch by batch (the reference)."""
    rescued, pictures, errors = [], [], []
    for index in missing:
        record = self._record(index)
        try:
            if record.problem:
                raise UndecodableImage(record.problem)
            pixels = decode_with_pillow(record.path)
        except UndecodableImage as e:
            errors.append({"id": record.id, "path": record.path, "reason": str(e)})
            continue
        rescued.append(index)
        pictures.append(resize_image(tf.constant(pixels), self.config.image_size, self.config.resize))
    if not rescued:
        return None, errors
    batch, indices = self.config.batch_size, np.array(rescued, np.int64)
    outputs = [self._compute(indices[i : i + batch], tf.stack(pictures[i : i + batch])) for i in range(0, len(pictures), batch)]
    return (indices, {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}), errors


def test_the_fallback_holds_one_batch_of_pictures_and_gives_the_same_bytes(tmp_path, run_cli, monkeypatch):
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(9):  # mostly TIFF (only Pillow reads it), two PNGs among them, one broken file
        kind = "png" if i in (2, 6) else "tiff"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.{kind}")
    (root / "4b.tiff").write_bytes(b"not a tiff")
    args = [*FAST, "--shard-size", 10, "--batch-size", 2]

    state = {"fallback": False, "held": 0, "peak": 0}
    real_fallback, real_compute, real_decode = (
        worker_module._ShardAssembler._fallback, worker_module._ShardAssembler._compute, worker_module.decode_with_pillow,
    )

    def fallback(self, missing):
        state["fallback"] = True
        try:
            return real_fallback(self, missing)
        finally:
            state["fallback"] = False

    def compute(self, indices, images):
        if state["fallback"]:
            state["held"] -= len(indices)  # computed: the worker lets go of these pictures
        return real_compute(self, indices, images)

    def decode(path):
        pixels = real_decode(path)
        state["held"] += 1
        state["peak"] = max(state["peak"], state["held"])
        return pixels

    with monkeypatch.context() as patch:
        patch.setattr(worker_module._ShardAssembler, "_fallback", fallback)
        patch.setattr(worker_module._ShardAssembler, "_compute", compute)
        patch.setattr(worker_module, "decode_with_pillow", decode)
        run_cli("extract", tmp_path / "images", "--out", tmp_path / "batched", *args)
    assert state["peak"] == 2 and state["held"] == 0  # 7 TIFFs, at most one batch of 2 decoded at once

    with monkeypatch.context() as patch:
        patch.setattr(worker_module._ShardAssembler, "_fallback", _fallback_before_batching)
        run_cli("extract", tmp_path / "images", "--out", tmp_path / "reference", *args)
    assert files_bytes(tmp_path / "batched") == files_bytes(tmp_path / "reference") and files_bytes(tmp_path / "batched")
    manifest = shards.read_manifest(tmp_path / "batched")
    assert manifest["rows"] == 9 and [e["id"] for e in manifest["errors"]] == ["a/4b.tiff"]


def _scaled(factor, row=1):
    """A _TapRunner.__call__ whose first tap's `row` is multiplied by `factor` (finite in float32)."""
    real = worker_module._TapRunner.__call__

    def call(self, images):
        features = real(self, images)
        key = next(iter(features))
        features[key][row] = np.abs(features[key][row]) * factor + 1.0
        return features

    return call


def test_features_float16_cannot_hold_stop_the_run_naming_the_image_and_tap(tmp_path, image_tree, run_cli, monkeypatch):
    root = image_tree()
    monkeypatch.setattr(worker_module._TapRunner, "__call__", _scaled(1e6))
    result = run_cli("extract", root, "--out", tmp_path / "f16", *FAST, "--storage-dtype", "float16", code=1)
    assert (
        "Error: --storage-dtype float16 cannot hold the features of cat/001.png at tap resnet50/conv2_block1_out "
        "(values up to" in result.output
    )
    assert "more than float16's largest 65504); rerun with --storage-dtype float32" in result.output
    assert shards.existing_shards(tmp_path / "f16") == [] and not (tmp_path / "f16" / "manifest.json").exists()

    run_cli("extract", root, "--out", tmp_path / "f32", *FAST)  # float32 holds them
    with h5py.File(tmp_path / "f32" / "shard-00000.h5") as f:
        assert np.isfinite(f["features/resnet50/conv2_block1_out"][:]).all()
        assert f["features/resnet50/conv2_block1_out"][1].max() > 65504


def test_float16_features_within_range_are_stored_as_the_cast_of_float32_ones(tmp_path, image_tree, run_cli):
    root = image_tree()
    run_cli("extract", root, "--out", tmp_path / "f16", *FAST, "--storage-dtype", "float16")
    run_cli("extract", root, "--out", tmp_path / "f32", *FAST)
    key = "features/vgg16/block1_pool"
    with h5py.File(tmp_path / "f16" / "shard-00000.h5") as half, h5py.File(tmp_path / "f32" / "shard-00000.h5") as full:
        assert half[key].dtype == np.float16
        np.testing.assert_array_equal(half[key][:], full[key][:].astype(np.float16))


def test_the_writer_checks_only_writes_it_has_not_seen_succeed(tmp_path, monkeypatch):
    """Checking for a failed write after every batch must not cost more with every shard written."""
    monkeypatch.setattr(worker_module._ShardWriter, "_write", lambda self, shard, data: None)
    real_done, checked = concurrent.futures.Future.done, []

    def done(self):
        checked.append(self)
        return real_done(self)

    with worker_module._ShardWriter(tmp_path, None, "float32") as writer:
        for shard in range(200):
            writer.submit(shard, None)
        writer.pool.shutdown(wait=True)  # every write has finished
        writer.raise_failure()
        monkeypatch.setattr(concurrent.futures.Future, "done", done)
        writer.raise_failure()
        monkeypatch.setattr(concurrent.futures.Future, "done", real_done)
    assert len(checked) <= 1  # not one look at each of the 200 finished writes
    assert all(writer.has(shard) for shard in range(200)) and not writer.has(200)


def test_a_failed_write_is_raised_at_the_next_check(tmp_path, monkeypatch):
    def write(self, shard, data):
        if shard == 1:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker_module._ShardWriter, "_write", write)
    with pytest.raises(OSError, match="No space left"):
        with worker_module._ShardWriter(tmp_path, None, "float32") as writer:
            for shard in range(2):
                writer.submit(shard, None)
            writer.pool.shutdown(wait=True)
            writer.raise_failure()
