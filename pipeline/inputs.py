"""The input pipeline: read, decode, resize, batch and prefetch with tf.data, plus a Pillow fallback.

TensorFlow decodes JPEG, PNG, GIF, BMP and WebP in parallel inside the graph. An element whose
decode fails is dropped from the stream by `ignore_errors`; the caller sees the gap in the
carried indices and decodes that file with Pillow (TIFF, and whatever else TensorFlow rejects),
or records why nobody could.
"""

import functools
import os

import numpy as np
import tensorflow as tf
from PIL import Image, ImageSequence

from pipeline.layers import resize_image  # shared with the exported SavedModel's bytes signature

AUTOTUNE = tf.data.AUTOTUNE
JPEG_RATIOS = (8, 4, 2)  # DCT downscales libjpeg offers, largest first


class UndecodableImage(Exception):
    """Neither TensorFlow nor Pillow could turn the file into pixels."""


def decode_image(contents):
    """Encoded bytes -> uint8 (H, W, 3): TensorFlow's decoders, the first frame of an animation."""
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _decode_fast(contents, image_size):
    """Like `decode_image`, but a JPEG is decoded at the smallest DCT scale that still covers the size.

    libjpeg can scale by 1/2, 1/4 or 1/8 while decoding (output side = ceil(side / ratio)); the
    largest ratio whose short side stays >= image_size is used, so nothing is upsampled later.
    """

    def scaled_jpeg():
        shape = tf.image.extract_jpeg_shape(contents)
        short_side = tf.minimum(shape[0], shape[1])
        branches = [
            (short_side >= (image_size - 1) * ratio + 1, functools.partial(tf.io.decode_jpeg, contents, channels=3, ratio=ratio))
            for ratio in JPEG_RATIOS
        ]
        return tf.case(branches, default=functools.partial(decode_image, contents))

    image = tf.cond(tf.io.is_jpeg(contents), scaled_jpeg, functools.partial(decode_image, contents))
    image.set_shape([None, None, 3])
    return image


def image_batches(paths, shard_ranges, batch_size, image_size, resize, fast_decode=False):
    """Dataset of (indices int64 (B,), images float32 (B, S, S, 3)) over the given shard ranges.

    Batches never cross a shard boundary, so a shard's batches (and so its bytes) are the same
    whether a run does every shard or resumes at this one. Indices point into `paths`; a path
    that is None is never read (it shows as a gap, as a failed decode does).
    `fast_decode` decodes large JPEGs at a reduced DCT scale (see `_decode_fast`).
    """
    readable = tf.constant([path is not None for path in paths], dtype=tf.bool)
    paths = tf.constant([b"" if path is None else os.fsencode(path) for path in paths], dtype=tf.string)
    decode = functools.partial(_decode_fast, image_size=image_size) if fast_decode else decode_image

    def load(index):
        image = decode(tf.io.read_file(paths[index]))
        return index, resize_image(image, image_size, resize)

    def shard(start, stop):
        return (
            tf.data.Dataset.range(start, stop)
            .filter(lambda index: readable[index])
            .map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
            .ignore_errors()
            .batch(batch_size)
        )

    starts = [start for start, _ in shard_ranges]
    stops = [stop for _, stop in shard_ranges]
    dataset = tf.data.Dataset.from_tensor_slices((tf.constant(starts, tf.int64), tf.constant(stops, tf.int64)))
    return dataset.flat_map(shard).prefetch(AUTOTUNE)


def decode_with_pillow(path):
    """Pillow decode to uint8 RGB (H, W, 3): first frame, 16-bit scaled down, alpha dropped."""
    try:
        with Image.open(path) as image:
            frame = next(ImageSequence.Iterator(image))
            frame.load()
            return _to_rgb(frame)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, StopIteration) as e:
        raise UndecodableImage(_reason(e)) from None


def _to_rgb(image):
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits
        pixels = np.asarray(image, dtype=np.uint32)
        grey = (pixels >> 8 if pixels.max(initial=0) > 255 else pixels).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _reason(error):
    text = str(error).strip()
    if isinstance(error, FileNotFoundError):
        return "file not found"
    return text or type(error).__name__
