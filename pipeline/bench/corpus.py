"""Benchmark corpora: JPEGs cut from the real photos scikit-learn ships, at chosen sizes."""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

PHOTO_SIZE = (500, 375)  # ImageNet-like landscape (width, height); some come out portrait
LARGE_SIZE = (3000, 2000)  # a camera-sized photo, for --fast-decode
JPEG_QUALITY = 90


def write_corpus(out_dir, count, size=PHOTO_SIZE, seed=0):
    """Write `count` JPEGs under out_dir/<photo name>/; return out_dir.

    Each is a random crop (40-100% of the side, aspect jitter, mirrored half the time) of one
    of the sample photos, resized to about `size` (+-10%, a quarter of them portrait).
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    samples = load_sample_images()
    photos = [(Path(name).stem, Image.fromarray(pixels)) for name, pixels in zip(samples.filenames, samples.images)]
    for index in range(count):
        name, photo = photos[index % len(photos)]
        width, height = (round(side * rng.uniform(0.9, 1.1)) for side in size)
        if rng.random() < 0.25:
            width, height = height, width
        picture = _random_crop(photo, width / height, rng).resize((width, height), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{index:05d}.jpg", quality=JPEG_QUALITY)
    return out_dir


def _random_crop(photo, aspect, rng):
    """The largest box of the given aspect that fits, scaled by 40-100%, at a random place."""
    width, height = photo.size
    crop_w, crop_h = (width, width / aspect) if width / height < aspect else (height * aspect, height)
    scale = rng.uniform(0.4, 1.0)
    crop_w, crop_h = max(1, round(crop_w * scale)), max(1, round(crop_h * scale))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return photo.crop((left, top, left + crop_w, top + crop_h))
