"""The bundled demo set: scikit-learn's digits (1,797 real 8x8 scans) written as upscaled PNGs."""

import io
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(out_dir, size=64):
    """Write data/demo/<digit>/<index>.png, `size` px square, dark digit on white; return the count.

    A file that already holds the very bytes is left alone (its mtime too), so writing the set
    again changes nothing that a features directory made from it would see.
    """
    digits = load_digits()
    out_dir = Path(out_dir)
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        pixels = (255 - image * (255 / 16)).round().astype(np.uint8)  # 0..16 ink -> white paper
        picture = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        class_dir = out_dir / str(target)
        class_dir.mkdir(parents=True, exist_ok=True)
        path = class_dir / f"{index:04d}.png"
        if not path.is_file() or path.stat().st_size != buffer.tell() or path.read_bytes() != buffer.getvalue():
            path.write_bytes(buffer.getvalue())
    return len(digits.images)
