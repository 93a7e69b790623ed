"""Photos from phones: an image stored on its side with an EXIF orientation is featurised upright (unless turned off)."""

import json

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline import shards
from pipeline.inputs import exif_orientation

FAST = ["--weights", "random", "--image-size", "32", "--tap", "vgg16:block1_pool", "--precision", "float32"]
# The stored pixels of an image whose EXIF orientation says how to turn them upright (what a phone writes).
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def photo(seed=0, size=(48, 32)):
    """A non-square picture (width x height) of horizontal stripes, so that lying on its side changes what is computed."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(rng.integers(0, 256, (size[1] // 4, 1, 3)), 4, axis=0)
    return Image.fromarray(np.repeat(rows, size[0], axis=1).astype(np.uint8))


def save(image, path, orientation=1, **options):
    """`image` saved upright, or (orientation > 1) stored as a phone would with that EXIF orientation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = image if orientation == 1 else image.transpose(STORED[orientation])
    exif = Image.Exif()
    if orientation > 1:
        exif[0x0112] = orientation
    stored.save(path, exif=exif.tobytes(), **options)


def features_by_id(features):
    found = {}
    for path in shards.existing_shards(features):
        data = shards.read_shard(path)
        found.update(zip(data.ids, next(iter(data.features.values()))))
    return found


def relative_difference(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_every_orientation_is_read_from_the_header(tmp_path):
    for orientation in range(1, 9):
        save(photo(), tmp_path / f"{orientation}.jpg", orientation)
        assert exif_orientation(str(tmp_path / f"{orientation}.jpg")) == orientation
        save(photo(), tmp_path / f"{orientation}.tiff", orientation)
        assert exif_orientation(str(tmp_path / f"{orientation}.tiff")) == 1  # Pillow's TIFF decoder turns it upright itself
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    assert exif_orientation(str(tmp_path / "broken.jpg")) == 1 and exif_orientation(str(tmp_path / "missing.jpg")) == 1


@pytest.mark.parametrize("suffix, options", [("png", {}), ("tiff", {})], ids=["tensorflow-decodes-png", "pillow-fallback-tiff"])
def test_every_orientation_gives_the_upright_image_s_features(tmp_path, run_cli, suffix, options):
    for orientation in range(1, 9):
        save(photo(), tmp_path / "images" / "a" / f"{orientation}.{suffix}", orientation, **options)
    save(photo(1), tmp_path / "images" / "b" / f"other.{suffix}")
    run_cli("extract", tmp_path / "images", "--out", tmp_path / "f", *FAST)
    found = features_by_id(tmp_path / "f")
    upright = found[f"a/1.{suffix}"]
    assert all(np.array_equal(found[f"a/{o}.{suffix}"], upright) for o in range(2, 9))  # lossless: exactly the same
    assert shards.read_manifest(tmp_path / "f")["config"]["exif_orientation"] is True


def test_a_portrait_phone_jpeg_is_featurised_upright_and_the_option_turns_it_off(tmp_path, run_cli):
    save(photo(), tmp_path / "images" / "a" / "upright.jpg", quality=100, subsampling=0)
    save(photo(), tmp_path / "images" / "a" / "phone.jpg", 6, quality=100, subsampling=0)  # stored on its side
    save(photo(1), tmp_path / "images" / "b" / "other.jpg")
    run_cli("extract", tmp_path / "images", "--out", tmp_path / "on", *FAST)
    run_cli("extract", tmp_path / "images", "--out", tmp_path / "off", *FAST, "--no-exif-orientation")
    on, off = features_by_id(tmp_path / "on"), features_by_id(tmp_path / "off")
    assert relative_difference(on["a/phone.jpg"], on["a/upright.jpg"]) < 0.02  # JPEG's rounding of rotated blocks only
    assert relative_difference(off["a/phone.jpg"], off["a/upright.jpg"]) > 0.1  # lying on its side
    assert np.array_equal(on["a/upright.jpg"], off["a/upright.jpg"])
    assert shards.read_manifest(tmp_path / "off")["config"]["exif_orientation"] is False


def test_a_directory_made_before_the_option_resumes_without_it(tmp_path, run_cli):
    for name, orientation in (("a/0.png", 6), ("a/1.png", 8), ("b/2.png", 1)):
        save(photo(len(name)), tmp_path / "images" / name, orientation)
    args = [tmp_path / "images", *FAST, "--shard-size", 1]
    run_cli("extract", *args, "--out", tmp_path / "off", "--no-exif-orientation")
    old = tmp_path / "old"
    run_cli("extract", *args, "--out", old, "--no-exif-orientation")
    (old / "manifest.json").unlink()
    (old / "shard-00001.h5").unlink()
    for path in shards.existing_shards(old):  # as a version without the option recorded them
        with h5py.File(path, "r+") as f:
            config = json.loads(f.attrs["config"])
            del config["exif_orientation"]
            f.attrs["config"] = json.dumps(config)
    resumed = run_cli("extract", *args, "--out", old)
    assert "(1 shards written, 2 already done)" in resumed.output
    assert set(features_by_id(old)) == set(features_by_id(tmp_path / "off"))
    assert all(np.array_equal(features_by_id(old)[key], value) for key, value in features_by_id(tmp_path / "off").items())
    refused = run_cli("extract", *args, "--out", old, "--exif-orientation", code=1)
    assert "holds features made with other settings (exif_orientation: False -> True)" in refused.output
