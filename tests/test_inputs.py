"""The input pipeline on hostile files: bounded reads, header checks before decoding, first frames, 16 bits."""

import json
import os
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import encoded
from pipeline.inputs import (
    MAX_PIXELS,
    UndecodableImage,
    _header_pixels,
    decode_image,
    decode_with_pillow,
    image_batches,
    load_image,
)
from pipeline.sources import MAX_FILE_BYTES

RED, BLUE = (255, 0, 0), (0, 0, 255)


def rows_of(paths, ranges=None, **options):
    """The indices image_batches yields over `paths`."""
    ranges = ranges or [(0, len(paths))]
    return [int(i) for indices, _ in image_batches(paths, ranges, 4, 32, "squash", **options) for i in indices]


def within(seconds, function, *args):
    """function(*args) in a daemon thread: its result or exception, or a failure if it is still running."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function(*args)
        except Exception as e:  # handed back to the test
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} was still running after {seconds} s"
    return outcome


def test_unsafe_files_are_refused_before_anything_is_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "folder.jpg").mkdir()
    with open(tmp_path / "huge.tif", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    (tmp_path / "empty.png").write_bytes(b"")
    expected = {
        "pipe.jpg": "not a regular file (named pipe)",
        "zero.jpg": "not a regular file (character device)",
        "folder.jpg": "not a regular file (directory)",
        "huge.tif": "exceeds the 1 GiB cap",
        "empty.png": "empty file",
        "missing.png": "file not found",
    }
    for name, reason in expected.items():
        outcome = within(10, decode_with_pillow, str(tmp_path / name))
        assert isinstance(outcome.get("error"), UndecodableImage) and reason in str(outcome["error"]), name


def test_none_paths_are_gaps_and_byte_paths_reach_odd_names(tmp_path):
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")  # not UTF-8
    Image.new("RGB", (8, 8), RED).save(odd, format="PNG")
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "blue.png")
    paths = [None, os.fsdecode(odd), None, odd, str(tmp_path / "blue.png"), None]
    assert rows_of(paths, [(0, 3), (3, 6)]) == [1, 3, 4]
    assert rows_of(paths, [(3, 6)], fast_decode=True) == [3, 4]
    assert rows_of([None, None]) == []


def test_batches_prefetched_to_a_device_are_the_batches_the_host_would_compute(tmp_path):
    """The GPU path copies batches ahead of use (prefetch_to_device, the last step); on a CPU, "/cpu:0" shows it
    composes with the rest of the pipeline and changes nothing: same indices, same pixels, same shard boundaries."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))

    def batches(device):
        return [
            (i.numpy().tolist(), x.numpy()) for i, x in image_batches(paths, [(0, 3), (3, 5)], 2, 16, "squash", device=device)
        ]

    host, on_device = batches(None), batches("/cpu:0")
    assert [i for i, _ in on_device] == [i for i, _ in host] == [[0, 1], [2], [3, 4]]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(host, on_device, strict=True))


def sixteen_bit_png(path, values):
    path.write_bytes(tf.io.encode_png(tf.constant(values, tf.uint16)).numpy())


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("top", [65535, 255])  # a bright image, and a dark one whose values all fit 8 bits
def test_16_bit_pngs_decode_alike_in_tensorflow_and_pillow(tmp_path, channels, top):
    ramp = np.array([0, 1, 255, 256, 300, 32767, 32768, 65280, 65535], np.int64)
    ramp = np.minimum(ramp, top).reshape(1, -1, 1)
    values = np.concatenate([ramp, top - ramp, ramp // 2][:channels], axis=2)
    sixteen_bit_png(tmp_path / "x.png", values)
    by_tensorflow = decode_image(tf.io.read_file(str(tmp_path / "x.png"))).numpy()
    by_pillow = decode_with_pillow(tmp_path / "x.png")
    assert by_pillow.dtype == np.uint8 and np.array_equal(by_pillow, by_tensorflow)
    assert np.array_equal(by_pillow[0, :, 0], ramp[0, :, 0] >> 8)  # the top 8 bits: monotonic, 300 -> 1, 255 -> 0


def test_header_sizes_are_read_as_pillow_reads_them():
    rng = np.random.default_rng(0)
    for width, height in [(1, 1), (37, 23), (300, 17), (16383, 2)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))
        for fmt, options in [
            ("PNG", {}),
            ("BMP", {}),
            ("WEBP", {"lossless": True}),
            ("WEBP", {"quality": 80}),
            ("WEBP", {"exif": b"Exif\x00\x00MM"}),
        ]:
            data = encoded(image, fmt, **options)
            assert int(_header_pixels(data)) == width * height, (fmt, options, width, height)
        assert int(_header_pixels(encoded(image, "JPEG"))) == 0  # TensorFlow's JPEG decoder checks its size itself
        for data in (encoded(image, "GIF"), encoded(image, "TIFF"), b"", b"\x89PNG"):
            assert int(_header_pixels(data)) == MAX_PIXELS + 1
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    animated = encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert animated[12:16] == b"VP8X" and int(_header_pixels(animated)) == MAX_PIXELS + 1


@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif", "bmp", "webp", "tiff"])
def test_decompression_bombs_are_refused_from_their_header(tmp_path, bomb_bytes, fmt):
    path = tmp_path / f"bomb.{fmt}"
    path.write_bytes(bomb_bytes[fmt])
    assert rows_of([str(path)]) == [] and rows_of([str(path)], fast_decode=True) == []
    with pytest.raises(UndecodableImage, match="179-megapixel cap"):
        decode_with_pillow(path)


def test_a_jpeg_just_over_the_cap_is_left_to_pillow_which_refuses_it(tmp_path):
    data = bytearray(encoded(Image.new("RGB", (16, 16), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 13377, 13378)  # 178,957,506 pixels: MAX_PIXELS + 536
    (tmp_path / "x.jpg").write_bytes(data)
    assert 13377 * 13378 > MAX_PIXELS
    assert rows_of([str(tmp_path / "x.jpg")]) == [] and rows_of([str(tmp_path / "x.jpg")], fast_decode=True) == []
    with pytest.raises(UndecodableImage, match="megapixel cap"):
        decode_with_pillow(tmp_path / "x.jpg")


def test_gifs_and_animated_webps_go_to_pillow_which_decodes_the_first_frame_only(tmp_path):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:] * 50, duration=10)
    (tmp_path / "cut.gif").write_bytes(gif[:-40])  # the last frames are cut off: only reading them would fail
    (tmp_path / "anim.webp").write_bytes(encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True))
    (tmp_path / "still.png").write_bytes(encoded(frames[0], "PNG"))
    paths = [str(tmp_path / name) for name in ("cut.gif", "anim.webp", "still.png")]
    assert rows_of(paths) == [2]
    for path in paths:
        assert np.array_equal(decode_with_pillow(path), np.full((8, 8, 3), RED, np.uint8)), path


def test_bombs_cost_no_memory(tmp_path, bomb_bytes):
    """In a fresh process: after a warm-up, refusing every bomb leaves the peak RSS where it was."""
    side = 13_500  # a real 1-bit PNG of 182 million black pixels (> MAX_PIXELS) that deflates to 23 kB
    assert side * side > MAX_PIXELS
    idat = zlib.compress(b"\x00" * (side * (1 + (side + 7) // 8)), 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    chunks = [(b"IHDR", ihdr), (b"IDAT", idat), (b"IEND", b"")]
    png = b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks
    )
    (tmp_path / "real.png").write_bytes(png)
    for fmt, data in bomb_bytes.items():
        (tmp_path / f"bomb.{fmt}").write_bytes(data)
    Image.new("RGB", (8, 8), RED).save(tmp_path / "warm.png")
    script = """
import json, resource, sys
from pipeline.inputs import UndecodableImage, decode_with_pillow, image_batches
warm, bombs = sys.argv[1], sys.argv[2:]
for paths in ([warm], bombs):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = sum(int(i.shape[0]) for i, _ in image_batches(paths, [(0, len(paths))], 4, 224, "squash"))
    refused = 0
    for path in paths:
        try:
            decode_with_pillow(path)
        except UndecodableImage:
            refused += 1
print(json.dumps({"rows": rows, "refused": refused, "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""
    bombs = [str(tmp_path / "real.png"), *(str(tmp_path / f"bomb.{fmt}") for fmt in bomb_bytes)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "warm.png"), *bombs], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["rows"] == 0 and outcome["refused"] == len(bombs)
    assert outcome["grew_mb"] < 150, outcome  # decoding the real PNG to RGB alone would take 550 MB, resizing it 2.2 GB


def seed_images():
    """Small valid files of every format, with structure worth corrupting."""
    rng = np.random.default_rng(1)
    picture = Image.fromarray(np.kron(rng.integers(0, 256, (4, 4, 3), np.uint8), np.ones((3, 3, 1), np.uint8)))
    frames = [picture, picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return [
        encoded(picture, "JPEG", quality=90),
        encoded(picture, "JPEG", progressive=True),
        encoded(picture, "PNG"),
        encoded(picture.convert("P"), "PNG"),
        encoded(picture, "GIF", save_all=True, append_images=frames[1:]),
        encoded(picture, "BMP"),
        encoded(picture, "TIFF", compression="tiff_lzw"),
        encoded(picture, "WEBP", quality=80),
        encoded(picture, "WEBP", lossless=True),
        encoded(picture, "WEBP", save_all=True, append_images=frames[1:], lossless=True),
    ]


SEEDS = seed_images()


@st.composite
def fuzzed(draw):
    """A seed image with flipped bits, cut short, or spliced with another."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    kind = draw(st.sampled_from(["flip", "cut", "splice"]))
    if kind == "flip":
        for position in draw(st.lists(st.integers(0, len(data) * 8 - 1), min_size=1, max_size=8)):
            data[position // 8] ^= 1 << (position % 8)
    elif kind == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    else:
        other = draw(st.sampled_from(SEEDS))
        data = data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    """A file rewritten per example, and the graph that image_batches maps over each file, compiled once."""
    decode = tf.function(lambda contents: load_image(contents, 16, "squash"))
    return tmp_path_factory.mktemp("fuzz") / "image", decode


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on corrupt TIFF tags
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=fuzzed())
def test_fuzzed_files_decode_to_pixels_or_a_reason(fuzz_target, data):
    path, decode = fuzz_target
    path.write_bytes(data)
    try:
        image, decoded = decode(tf.constant(data))
    except tf.errors.InvalidArgumentError:  # what ignore_errors turns into a gap
        pass
    else:
        assert image.shape == (16, 16, 3) and np.all(np.isfinite(image))
        assert 0 <= float(tf.reduce_min(image)) <= float(tf.reduce_max(image)) <= 255
    try:
        pixels = decode_with_pillow(path)
    except UndecodableImage as e:
        assert str(e)
    else:
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        assert pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS


_PARALLEL_UNDER_DETERMINISM = """
import sys
import tensorflow as tf
from tensorflow.python.data.experimental.ops import testing
from pipeline.inputs import load_image

tf.config.experimental.enable_op_determinism()  # as the worker does on a GPU
paths = tf.constant(sys.argv[1:])
counter = tf.Variable(0, dtype=tf.int64)
for name, extra in (("plain", lambda index: index), ("stateful", lambda index: index + counter.read_value())):
    for fast_decode in (False, True):
        for resize in ("squash", "center-crop"):
            def load(index):
                return extra(index), *load_image(tf.io.read_file(paths[index]), 32, resize, fast_decode)

            dataset = tf.data.Dataset.range(len(sys.argv) - 1).apply(testing.assert_next(["ParallelMap"]))
            dataset = dataset.map(load, num_parallel_calls=4, deterministic=True)
            try:
                decoded = [bool(ok) for _, _, ok in dataset]
            except tf.errors.InvalidArgumentError:
                print(name, fast_decode, resize, "serialised")
            else:
                print(name, fast_decode, resize, "parallel", decoded)
"""


def test_the_input_map_stays_parallel_under_op_determinism(tmp_path):
    """A stateful op in the map (an assert, a variable) makes op determinism rewrite it into a sequential map."""
    Image.new("RGB", (48, 32), RED).save(tmp_path / "x.jpg")
    Image.new("RGB", (32, 48), BLUE).save(tmp_path / "x.png")
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # a header claiming 10 gigapixels
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    paths = [str(tmp_path / name) for name in ("x.jpg", "x.png", "bomb.png")]
    done = subprocess.run(
        [sys.executable, "-c", _PARALLEL_UNDER_DETERMINISM, *paths], capture_output=True, text=True, env=env, timeout=300
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr[-2000:]
    for fast_decode in (False, True):
        for resize in ("squash", "center-crop"):
            assert f"plain {fast_decode} {resize} parallel [True, True, False]" in lines
            assert f"stateful {fast_decode} {resize} serialised" in lines  # the check can fail
