"""--fast-decode: JPEGs decoded at a reduced DCT scale that still covers the image size."""

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.config import ExtractConfig
from pipeline.inputs import _decode_fast, image_batches
from pipeline.layers import resize_image


@pytest.fixture
def photo(tmp_path):
    """A smooth 1000x600 RGB photo-like picture, as JPEG and PNG."""
    folder = tmp_path / "photos"
    folder.mkdir()
    y, x = np.mgrid[0:600, 0:1000]
    pixels = np.stack([x * 255 // 1000, y * 255 // 600, (x + y) * 255 // 1600], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "photo.jpg", quality=92)
    Image.fromarray(pixels).save(folder / "photo.png")
    return folder / "photo.jpg", folder / "photo.png"


@pytest.mark.parametrize(
    "image_size, shape",
    [(64, (75, 125)), (75, (75, 125)), (76, (150, 250)), (224, (300, 500)), (300, (300, 500)), (301, (600, 1000))],
)
def test_largest_dct_scale_whose_short_side_covers_the_size(photo, image_size, shape):
    decoded = _decode_fast(tf.io.read_file(str(photo[0])), image_size)
    assert tuple(decoded.shape) == (*shape, 3)


def test_non_jpeg_is_decoded_at_full_size(photo):
    assert tuple(_decode_fast(tf.io.read_file(str(photo[1])), 64).shape) == (600, 1000, 3)


def test_off_is_the_plain_decode_and_on_stays_close(photo):
    paths = [str(photo[0]), str(photo[1])]
    default = next(iter(image_batches(paths, [(0, 2)], 2, 64, "squash")))[1].numpy()
    off = next(iter(image_batches(paths, [(0, 2)], 2, 64, "squash", fast_decode=False)))[1].numpy()
    on = next(iter(image_batches(paths, [(0, 2)], 2, 64, "squash", fast_decode=True)))[1].numpy()
    by_hand = resize_image(tf.io.decode_image(tf.io.read_file(paths[0]), channels=3), 64, "squash").numpy()
    assert np.array_equal(default, off) and np.array_equal(off[0], by_hand)
    assert np.array_equal(on[1], off[1])  # the PNG takes the normal path
    assert not np.array_equal(on[0], off[0]) and np.abs(on[0] - off[0]).mean() < 2.0


def test_fast_decode_is_part_of_the_config_hash():
    assert ExtractConfig(fast_decode=True).sha256() != ExtractConfig().sha256()


def test_extract_flag_reaches_the_saved_config(photo, tmp_path):
    args = [
        "extract",
        str(photo[0].parent),
        "--out",
        str(tmp_path / "features"),
        "--weights",
        "random",
        "--image-size",
        "32",
        "--tap",
        "vgg16:block1_conv2",
        "--fast-decode",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "features" / "manifest.json").read_text())
    assert manifest["config"]["fast_decode"] is True and manifest["rows"] == 2
