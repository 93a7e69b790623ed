import h5py
import numpy as np
import pytest

from pipeline import shards
from pipeline.errors import PipelineError


def test_shard_round_trip_keeps_ids_labels_splits_and_features(tmp_path):
    data = shards.ShardData(
        ids=["a.png", "b/ü.png"],
        labels=np.array([0, -1], np.int32),
        splits=["train", ""],
        features={"vgg16/block5_conv3": np.arange(6, dtype=np.float32).reshape(2, 3)},
        errors=[{"id": "c.png", "path": "/x/c.png", "reason": "truncated"}],
    )
    path = tmp_path / shards.shard_filename(3)
    shards.write_shard(path, data, index=3, config_sha256="abc", config={"k": 1}, storage_dtype="float16")
    back = shards.read_shard(path)
    assert back.ids == data.ids and back.splits == data.splits
    np.testing.assert_array_equal(back.labels, data.labels)
    assert back.features["vgg16/block5_conv3"].dtype == np.float16
    np.testing.assert_array_equal(back.features["vgg16/block5_conv3"], data.features["vgg16/block5_conv3"])
    attrs = shards.read_shard_attrs(path)
    assert (attrs["format"], attrs["config_sha256"], attrs["shard_index"], attrs["rows"]) == (shards.FORMAT, "abc", 3, 2)
    assert attrs["errors"] == data.errors and attrs["config"] == {"k": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_leaves_no_file_behind(tmp_path):
    bad = shards.ShardData(["a"], np.array([0]), [""], {"x/y": np.zeros((1, 2))})
    with pytest.raises(TypeError):
        shards.write_shard(tmp_path / "s.h5", bad, index=0, config_sha256=None, config={})
    assert list(tmp_path.iterdir()) == []


def test_unreadable_files_have_no_attrs(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert shards.read_shard_attrs(tmp_path / "junk.h5") is None
    assert shards.read_shard_attrs(tmp_path / "missing.h5") is None


def test_feature_chunks_concatenate_taps_in_order_and_upcast(features_dir):
    root = features_dir(n=23, taps={"resnet50/a": 3, "vgg16/b": 2}, shard_size=10, storage_dtype="float16")
    manifest = shards.read_manifest(root)
    chunks = list(shards.iter_feature_chunks(root, manifest, ["vgg16/b", "resnet50/a"], chunk_rows=4))
    assert [len(c[0]) for c in chunks] == [4, 4, 2, 4, 4, 2, 3]
    X = np.concatenate([c[3] for c in chunks])
    assert X.shape == (23, 5) and X.dtype == np.float32
    first = shards.read_shard(root / "shard-00000.h5")
    np.testing.assert_array_equal(X[:10, :2], first.features["vgg16/b"].astype(np.float32))


def test_verify_passes_a_sound_directory(features_dir):
    assert shards.verify(features_dir(n=30, shard_size=7)) == []


def corrupt(path, dataset, index, value):
    with h5py.File(path, "r+") as f:
        f[dataset][index] = value


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: corrupt(d / "shard-00001.h5", "features/vgg16/block5_conv3", 0, np.full(16, np.nan)), "NaN or Inf"),
        (lambda d: corrupt(d / "shard-00001.h5", "ids", 0, "img00000.png"), "'img00000.png' is live in two rows"),
        (lambda d: corrupt(d / "shard-00001.h5", "ids", 1, "img00010.png"), "not unique and sorted"),
        (lambda d: corrupt(d / "shard-00000.h5", "labels", 2, 7), "outside -1..2"),
        (lambda d: (d / "shard-00001.h5").unlink(), "missing or not a features shard"),
        (lambda d: (d / "shard-00009.h5").write_bytes(b""), "not in the manifest"),
    ],
)
def test_verify_names_each_problem(features_dir, damage, expected):
    root = features_dir(n=30, shard_size=10)
    damage(root)
    problems = shards.verify(root)
    assert any(expected in p for p in problems), problems


def test_reading_a_non_features_directory_says_so(tmp_path):
    with pytest.raises(PipelineError, match="is not a features directory"):
        shards.read_manifest(tmp_path)
    (tmp_path / "shard-00000.h5").write_bytes(b"")
    with pytest.raises(PipelineError, match="did not finish"):
        shards.read_manifest(tmp_path)
