"""The input pipeline: read, decode, resize, batch and prefetch with tf.data, plus a Pillow fallback.

TensorFlow reads and decodes JPEG, PNG, BMP and still WebP in parallel inside the graph, once
the image's header says it is within MAX_PIXELS. An element whose header check fails is filtered
out, one whose read or decode fails is dropped by `ignore_errors`; the caller sees the gap in the carried
indices and decodes that file with Pillow (GIF, TIFF, and whatever else TensorFlow rejects),
or records why nobody could. The caller passes None for files its listing found unsafe to read
(see `file_problem`); the fallback reads every file with the same checks (`read_image_file`).
"""

import functools
import io
import os
import warnings

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from pipeline.layers import resize_image  # shared with the exported SavedModel's bytes signature
from pipeline.sources import file_problem

AUTOTUNE = tf.data.AUTOTUNE
JPEG_RATIOS = (8, 4, 2)  # DCT downscales libjpeg offers, largest first
MAX_PIXELS = (1 << 29) // 3  # ~179 MP, 0.5 GB of RGB: TensorFlow's own JPEG limit; camera sensors stop at 151 MP
Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2  # Pillow refuses twice this from the header, before allocating (its default)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # Pillow's warning is for images we accept
# What Pillow may take a file for: never EPS (it runs Ghostscript) or its other plugins.
PILLOW_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
# Where the formats TensorFlow decodes state their size. Each: the bytes that identify the
# header as (offset, bytes, bit mask or None for all bits), then width and height as unsigned
# integers (offset, byte count, big-endian, right shift, bits kept, plus). PNG and BMP fields
# keep 31 bits, so the product fits int64: their decoders refuse a larger value anyway.
_BY_DECODER = ((0, 0, False, 0, 0, 0),) * 2  # a size of 0: the decoder checks it
_HEADERS = (
    # JPEG: TensorFlow's decoder refuses more than MAX_PIXELS itself; `_decode_fast` checks first.
    ([(0, b"\xff\xd8\xff", None)], *_BY_DECODER),
    # PNG: the IHDR chunk, first by the spec.
    ([(0, b"\x89PNG\r\n\x1a\n", None)], (16, 4, True, 0, 31, 0), (20, 4, True, 0, 31, 0)),
    # BMP: the info header. A top-down BMP (negative height) reads as huge and goes to Pillow.
    ([(0, b"BM", None)], (18, 4, False, 0, 31, 0), (22, 4, False, 0, 31, 0)),
    # WebP: lossy, lossless, and extended if not animated (VP8X flag 2), as Pillow's
    # WebPImagePlugin._get_size reads them.
    (
        [(0, b"RIFF", None), (8, b"WEBPVP8 ", None), (23, b"\x9d\x01\x2a", None)],
        (26, 2, False, 0, 14, 0),
        (28, 2, False, 0, 14, 0),
    ),
    ([(0, b"RIFF", None), (8, b"WEBPVP8L", None), (20, b"\x2f", None)], (21, 4, False, 0, 14, 1), (21, 4, False, 14, 14, 1)),
    ([(0, b"RIFF", None), (8, b"WEBPVP8X", None), (20, b"\x00", b"\x02")], (24, 3, False, 0, 24, 1), (27, 3, False, 0, 24, 1)),
)
_HEAD = 32  # header bytes read for the check
EXIF_HEAD = 1 << 17  # bytes read to find an image's EXIF orientation
EXIF_ORIENTATION_TAG = 0x0112
DEVICE_BUFFER_BATCHES = 2  # batches copied to the GPU ahead of the one it computes


def _header_tables():
    """_HEADERS as the constant arrays `_header_pixels` computes with."""
    values, masks = np.zeros((len(_HEADERS), _HEAD), np.int64), np.zeros((len(_HEADERS), _HEAD), np.int64)
    weights, shifts, bits, plus = np.zeros((2 * len(_HEADERS), _HEAD), np.int64), [], [], []
    for row, (patterns, *sides) in enumerate(_HEADERS):
        for offset, value, mask in patterns:
            values[row, offset : offset + len(value)] = list(value)
            masks[row, offset : offset + len(value)] = list(mask or b"\xff" * len(value))
        for column, (offset, size, big_endian, shift, kept, add) in enumerate(sides, start=2 * row):
            order = range(size - 1, -1, -1) if big_endian else range(size)
            weights[column, offset : offset + size] = [1 << (8 * i) for i in order]
            shifts.append(shift), bits.append((1 << kept) - 1), plus.append(add)
    return values, masks, weights, np.array(shifts), np.array(bits), np.array(plus)


_HEADER_VALUES, _HEADER_MASKS, _FIELD_WEIGHTS, _FIELD_SHIFTS, _FIELD_BITS, _FIELD_PLUS = _header_tables()


class UndecodableImage(Exception):
    """Neither TensorFlow nor Pillow could turn the file into pixels."""


def read_image_file(path):
    """The bytes of `path` (str or bytes), or UndecodableImage with the reason it is not read.

    The checks run on the opened descriptor, so a file swapped since listing is checked too;
    O_NONBLOCK makes opening a named pipe return at once instead of waiting for a writer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UndecodableImage(_reason(e)) from None
    try:
        info = os.fstat(fd)
        problem = file_problem(info)
        if problem:
            raise UndecodableImage(problem)
        with open(fd, "rb", closefd=False) as f:
            contents = f.read(info.st_size)
            if f.read(1):
                raise UndecodableImage("file grew while being read")
    finally:
        os.close(fd)
    return contents


def _fits(contents, fast_decode):
    """Whether TensorFlow may decode `contents`: a bool tensor, False leaving a gap that the Pillow fallback fills.

    A stateless signal rather than an assert, so that op determinism keeps the map parallel. With
    `fast_decode` a JPEG's full size is checked too: its scaled decode would pass the decoder's own check.
    """
    fits = _header_pixels(contents) <= MAX_PIXELS
    if not fast_decode:
        return fits
    jpeg = tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.reduce_prod(tf.image.extract_jpeg_shape(contents, output_type=tf.int64)[:2]),
        lambda: tf.constant(0, tf.int64),
    )
    return fits & (jpeg <= MAX_PIXELS)


def load_image(contents, image_size, resize, fast_decode=False, orientation=None):
    """What the input map does with one file's bytes: (float32 (S, S, 3) image, whether it was decoded).

    An image that may not be decoded (see `_fits`) comes back as zeros with False, without being
    decoded; bytes that fail to decode raise, as any decoder error does. `orientation` (an EXIF
    orientation tensor, or None) turns the decoded image upright before it is resized.
    """
    decode = functools.partial(_decode_fast, image_size=image_size) if fast_decode else decode_image

    def upright_and_resized():
        image = decode(contents)
        return resize_image(image if orientation is None else orient(image, orientation), image_size, resize)

    fits = _fits(contents, fast_decode)
    image = tf.cond(fits, upright_and_resized, lambda: tf.zeros((image_size, image_size, 3), tf.float32))
    return image, fits


def _header_pixels(contents):
    """The pixels a PNG, BMP or still WebP header claims (0 for a JPEG), capped at MAX_PIXELS + 1: what anything else gets.

    Branch-free tensor arithmetic on the first bytes, ~2% of a photo's decode: a Python call per
    image cost ~15% of the decode throughput here, a tf.cond or extract_jpeg_shape ~5% of its CPU.
    """
    head = tf.cast(tf.io.decode_raw(contents, tf.uint8, fixed_length=_HEAD), tf.int64)  # the first bytes, zero-padded
    matches = tf.reduce_all(tf.bitwise.bitwise_and(head, _HEADER_MASKS) == _HEADER_VALUES, axis=1)
    fields = tf.bitwise.right_shift(tf.linalg.matvec(_FIELD_WEIGHTS, head), _FIELD_SHIFTS)
    sides = tf.bitwise.bitwise_and(fields, _FIELD_BITS) + _FIELD_PLUS
    return tf.reduce_min(tf.where(matches, tf.reduce_prod(tf.reshape(sides, [-1, 2]), axis=1), MAX_PIXELS + 1))


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
        shape = tf.image.extract_jpeg_shape(contents, output_type=tf.int64)
        short_side = tf.minimum(shape[0], shape[1])
        branches = [
            (short_side >= (image_size - 1) * ratio + 1, functools.partial(tf.io.decode_jpeg, contents, channels=3, ratio=ratio))
            for ratio in JPEG_RATIOS
        ]
        return tf.case(branches, default=functools.partial(decode_image, contents))  # the full size is checked by `_fits`

    image = tf.cond(tf.io.is_jpeg(contents), scaled_jpeg, functools.partial(decode_image, contents))
    image.set_shape([None, None, 3])
    return image


def exif_orientation(path):
    """The EXIF orientation (1..8) of the image at `path` (str or bytes), from its first bytes; 1 (as stored) when it has none.

    Read like `read_image_file` (a FIFO or device is never opened for reading), and only as far as
    EXIF_HEAD: a JPEG's EXIF segment comes first and holds at most 64 KiB. Anything unreadable
    counts as 1; the decode that follows names the problem.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 1
    try:
        if file_problem(os.fstat(fd)):
            return 1
        with open(fd, "rb", closefd=False) as f:
            head = f.read(EXIF_HEAD)
        with Image.open(io.BytesIO(head), formats=PILLOW_FORMATS) as image:
            if image.format == "TIFF":
                return 1  # only Pillow decodes TIFF, and it turns the image upright itself
            value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # Pillow's own fuzzing counts any Exception as a rejected file
        return 1
    finally:
        os.close(fd)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def orient(image, orientation):
    """A decoded (H, W, C) image turned upright by its EXIF `orientation` (an int32 scalar, 1..8; 1 leaves it as stored).

    Each orientation is a transpose (5..8) followed by a left-right and/or an up-down flip, as
    Pillow's ImageOps.exif_transpose applies them.
    """
    image = tf.cond(orientation >= 5, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
    image = tf.cond(tf.reduce_any(orientation == [2, 3, 6, 7]), lambda: tf.reverse(image, [1]), lambda: image)
    image = tf.cond(tf.reduce_any(orientation == [3, 4, 7, 8]), lambda: tf.reverse(image, [0]), lambda: image)
    image.set_shape([None, None, 3])
    return image


def image_batches(paths, shard_ranges, batch_size, image_size, resize, fast_decode=False, orientations=None, device=None):
    """Dataset of (indices int64 (B,), images float32 (B, S, S, 3)) over the given shard ranges.

    Batches never cross a shard boundary, so a shard's batches (and so its bytes) are the same
    whether a run does every shard or resumes at this one. Indices point into `paths`, whose
    entries are str or bytes; a None entry is never read and leaves a gap like a failed decode.
    `fast_decode` decodes large JPEGs at a reduced DCT scale (see `_decode_fast`). `orientations`,
    one EXIF orientation per path, turns each image upright after decoding (see `orient`). With
    `device` ("/gpu:0"), batches are copied to it ahead of use, so the copy overlaps the compute.
    """
    paths = list(paths)
    readable = tf.constant([i for i, p in enumerate(paths) if p is not None], dtype=tf.int64)
    # Bytes, so that a name with undecodable (surrogate-escaped) bytes reaches the file system as is.
    paths = tf.constant([b"" if p is None else os.fsencode(p) for p in paths], dtype=tf.string)

    upright = tf.constant(orientations, tf.int32) if orientations is not None else None

    def upright_of(index):
        return None if upright is None else upright[index]

    def load(index):
        return index, *load_image(tf.io.read_file(paths[index]), image_size, resize, fast_decode, upright_of(index))

    def shard(start, stop):
        low, high = tf.unstack(tf.searchsorted(readable, tf.stack([start, stop]), out_type=tf.int64))
        return (
            tf.data.Dataset.from_tensor_slices(readable[low:high])  # slicing: a per-element filter here cost ~20%
            .map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
            .ignore_errors()  # what failed to decode
            .filter(lambda index, image, decoded: decoded)  # what was not decoded
            .map(lambda index, image, decoded: (index, image))
            .batch(batch_size)
        )

    starts = [start for start, _ in shard_ranges]
    stops = [stop for _, stop in shard_ranges]
    dataset = tf.data.Dataset.from_tensor_slices((tf.constant(starts, tf.int64), tf.constant(stops, tf.int64)))
    dataset = dataset.flat_map(shard).prefetch(AUTOTUNE)
    if device is not None:  # must be the last transformation
        dataset = dataset.apply(tf.data.experimental.prefetch_to_device(device, buffer_size=DEVICE_BUFFER_BATCHES))
    return dataset


def pillow_batches(items, batch_size, image_size, resize, failed, orientations=None):
    """Decode with Pillow what TensorFlow could not: batches of (indices int64 (B,), images float32 (B, S, S, 3)).

    `items` are (index, path, problem) in order; one with a problem, or that Pillow cannot decode
    either, goes to `failed(index, reason)` (which may raise to stop) and into no batch. Pictures are
    decoded `batch_size` at a time, each batch once the caller has taken the one before, so a shard
    that only Pillow can read holds one batch of pictures, not the whole shard; the batches are the
    same as decoding all first and then batching would give. `orientations` (EXIF orientation by
    index, or None) turns each picture upright first, as the input map does.
    """
    indices, pictures = [], []
    for index, path, problem in items:
        try:
            if problem:
                raise UndecodableImage(problem)
            pixels = decode_with_pillow(path)
        except UndecodableImage as e:
            failed(index, str(e))
            continue
        indices.append(index)
        picture = tf.constant(pixels)
        if orientations is not None:
            picture = orient(picture, tf.constant(orientations[index], tf.int32))
        pictures.append(resize_image(picture, image_size, resize))
        del pixels
        if len(pictures) == batch_size:
            yield np.array(indices, np.int64), tf.stack(pictures)
            indices, pictures = [], []
    if pictures:
        yield np.array(indices, np.int64), tf.stack(pictures)


def decode_with_pillow(path):
    """Pillow decode to uint8 RGB (H, W, 3): first frame only, 16-bit as TensorFlow does it, alpha dropped.

    Reads like `read_image_file` and refuses an image over MAX_PIXELS from its header, before any
    pixel is decoded; raises UndecodableImage with the reason.
    """
    contents = read_image_file(path)
    try:
        with Image.open(io.BytesIO(contents), formats=PILLOW_FORMATS) as image:
            image.load()  # the frame open() stopped at: the first
            return _to_rgb(image)
    except Image.DecompressionBombError:
        raise UndecodableImage(f"image exceeds the {MAX_PIXELS / 1e6:.0f}-megapixel cap") from None
    except UnidentifiedImageError:
        raise UndecodableImage("not a JPEG, PNG, GIF, BMP, WebP or TIFF image") from None
    except Exception as e:  # Pillow's own fuzzing counts any Exception as a rejected file
        raise UndecodableImage(_reason(e)) from None


def _to_rgb(image):
    if image.mode.startswith("I"):  # 16-bit grey (I;16*, or I): the top 8 bits, as TensorFlow's PNG decoder
        pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 0xFFFF)
        grey = (pixels >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _reason(error):
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, OSError) and error.strerror:  # from the OS: no path in the text
        return error.strerror.lower()
    return str(error).strip() or type(error).__name__
