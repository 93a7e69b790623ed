"""The shard worker itself: the Pillow fallback's memory, what float16 storage can hold, the writer's bookkeeping."""

import concurrent.futures
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import FAST, files_bytes
from pipeline import inputs as inputs_module
from pipeline import shards
from pipeline.engines import worker as worker_module
from pipeline.inputs import UndecodableImage, decode_with_pillow, orient, resize_image


def _pillow_batches_decoding_all_first(items, batch_size, image_size, resize, failed, orientations=None):
    """The fallback as it was: every picture of the shard decoded first, then batched (the reference)."""
    rescued, pictures = [], []
    for index, path, problem in items:
        try:
            if problem:
                raise UndecodableImage(problem)
            pixels = decode_with_pillow(path)
        except UndecodableImage as e:
            failed(index, str(e))
            continue
        rescued.append(index)
        picture = tf.constant(pixels) if orientations is None else orient(tf.constant(pixels), orientations[index])
        pictures.append(resize_image(picture, image_size, resize))
    indices = np.array(rescued, np.int64)
    for i in range(0, len(pictures), batch_size):
        yield indices[i : i + batch_size], tf.stack(pictures[i : i + batch_size])


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
    real_rescue, real_features, real_decode = (
        worker_module._ShardAssembler._rescue,
        worker_module._TapRunner.features,
        inputs_module.decode_with_pillow,
    )

    def rescue(self, missing, errors):
        state["fallback"] = True
        try:
            return real_rescue(self, missing, errors)
        finally:
            state["fallback"] = False

    def features(self, images, row_id, check_fidelity=False):
        if state["fallback"]:
            state["held"] -= int(images.shape[0])  # computed: the worker lets go of these pictures
        return real_features(self, images, row_id, check_fidelity)

    def decode(path):
        pixels = real_decode(path)
        state["held"] += 1
        state["peak"] = max(state["peak"], state["held"])
        return pixels

    with monkeypatch.context() as patch:
        patch.setattr(worker_module._ShardAssembler, "_rescue", rescue)
        patch.setattr(worker_module._TapRunner, "features", features)
        patch.setattr(inputs_module, "decode_with_pillow", decode)
        run_cli("extract", tmp_path / "images", "--out", tmp_path / "batched", *args)
    assert state["peak"] == 2 and state["held"] == 0  # 7 TIFFs, at most one batch of 2 decoded at once

    with monkeypatch.context() as patch:
        patch.setattr(worker_module, "pillow_batches", _pillow_batches_decoding_all_first)
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


def test_a_small_run_skips_xla_records_its_device_and_computes_without_tf32(tmp_path, image_tree, run_cli, monkeypatch):
    """Below EAGER_MAX_IMAGES the forward is not compiled even with --xla; TF32 is off; the shard and inspect say what computed."""

    def no_compile(*args, **kwargs):
        raise AssertionError("a 6-image run compiled its forward pass")

    monkeypatch.setattr(worker_module.backbones, "compile_forward", no_compile)
    tf.config.experimental.enable_tensor_float_32_execution(True)
    run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST, "--xla")
    assert not tf.config.experimental.tensor_float_32_execution_enabled()
    device = shards.read_shard_attrs(tmp_path / "f" / "shard-00000.h5")["device"]
    assert device["forward"] == "eager" and device["cuda"] is None and device["op_determinism"] is False  # no GPU here
    assert device["tensorflow"].startswith(tf.__version__) and device["device"]
    assert shards.read_manifest(tmp_path / "f")["config"]["xla"] is True  # as asked: a larger listing would compile
    inspected = run_cli("inspect", tmp_path / "f")
    assert f"computed on {shards.describe_device(device)}: 1 shard" in inspected.output


def test_running_out_of_device_memory_names_the_batch_and_image_size_to_lower(tmp_path, image_tree, run_cli, monkeypatch):
    def exhausted(images, training=False):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,64,1024,1024]")

    real_build = worker_module.backbones.build_tap_model
    monkeypatch.setattr(worker_module.backbones, "build_tap_model", lambda *args: real_build(*args) and exhausted)
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST, "--batch-size", 4, code=1)
    assert result.output.strip().splitlines()[-1] == (
        "Error: the device ran out of memory computing a batch of 4 images of 32x32 px; "
        "rerun with a smaller --batch-size (now 4) or --image-size"
    )
    assert "Traceback" not in result.output and not (tmp_path / "f" / "manifest.json").exists()


def test_op_determinism_is_enabled_on_a_gpu_unless_no_deterministic(tmp_path, image_tree, run_cli, monkeypatch):
    enabled = []
    fake_gpu = worker_module.devices.TensorFlowGpu("/physical_device:GPU:0", "a GPU", (8, 0))
    monkeypatch.setattr(
        worker_module.devices, "tensorflow_gpus", lambda: [fake_gpu]
    )  # this machine has none: only the decision is tested
    monkeypatch.setattr(
        worker_module.backbones, "device_record", lambda gpu, forward, determinism: {"op_determinism": determinism}
    )
    monkeypatch.setattr(worker_module.tf.config.experimental, "enable_op_determinism", lambda: enabled.append(True))
    root, args = image_tree(), [*FAST, "--precision", "float32", "--no-xla"]
    run_cli("extract", root, "--out", tmp_path / "on", *args)
    assert enabled == [True] and shards.read_shard_attrs(tmp_path / "on" / "shard-00000.h5")["device"] == {"op_determinism": True}
    run_cli("extract", root, "--out", tmp_path / "off", *args, "--no-deterministic")
    assert enabled == [True] and shards.read_shard_attrs(tmp_path / "off" / "shard-00000.h5")["device"] == {
        "op_determinism": False
    }
    assert shards.read_manifest(tmp_path / "on")["config_sha256"] == shards.read_manifest(tmp_path / "off")["config_sha256"]


def test_a_compiled_forward_is_kept_for_the_next_process(tmp_path, image_tree):
    """In fresh processes, as a user runs them: the worker sets XLA's cache dir before anything reads XLA's flags."""
    root = image_tree(per_class=9)  # 18 images: above EAGER_MAX_IMAGES, so --xla compiles
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_XLA_FLAGS", None)
    programs = []
    for run in ("first", "second"):
        argv = [
            sys.executable,
            "-m",
            "pipeline",
            "extract",
            str(root),
            "--out",
            str(tmp_path / run),
            *map(str, FAST),
            "--xla",
            "--precision",
            "float32",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert shards.read_shard_attrs(tmp_path / run / "shard-00000.h5")["device"]["forward"] == "xla"
        programs.append({p.name: p.stat().st_mtime_ns for p in (tmp_path / "keras" / "xla").iterdir()})
    assert len(programs[0]) == 1 and programs[1] == programs[0]  # compiled by the first, read (not rewritten) by the second
