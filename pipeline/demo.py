"""The bundled demo set: scikit-learn's digits (1,797 real 8x8 scans) written as upscaled PNGs."""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(out_dir, size=64):
    """Write data/demo/<digit>/<index>.png, `size` px square, dark digit on white; return the count."""
    digits = load_digits()
    out_dir = Path(out_dir)
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        pixels = (255 - image * (255 / 16)).round().astype(np.uint8)  # 0..16 ink -> white paper
        picture = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        class_dir = out_dir / str(target)
        class_dir.mkdir(parents=True, exist_ok=True)
        picture.save(class_dir / f"{index:04d}.png")
    return len(digits.images)
