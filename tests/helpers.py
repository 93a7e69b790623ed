"""Plain functions and flags the tests share (fixtures live in conftest.py): fast extraction, reading outputs back."""

import contextlib
import hashlib
import io

import numpy as np
from PIL import Image

from pipeline import shards

RANDOM_32PX = ["--weights", "random", "--image-size", "32"]  # no download, 32-px images
SMALL_TAPS = ["--tap", "resnet50:conv2_block1_out", "--tap", "vgg16:block1_pool"]  # the two cheapest taps
FAST = [*RANDOM_32PX, *SMALL_TAPS]  # an extraction in seconds
QUICK_HEAD = ["--hidden", 8, "--epochs", 2, "--batch-size", 32]  # a head trained in a second


def write_image_tree(root, classes=("cat", "dog"), per_class=3, size=32, seed=0):
    """`per_class` random RGB PNGs (000.png, 001.png, ...) in a folder per class under `root`, the same bytes for the same seed."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


def read_rows(features):
    """({id: {tap: row}}, manifest) of a features dir, read back through the shard format."""
    manifest = shards.read_manifest(features)
    rows = {}
    for entry in manifest["shards"]:
        data = shards.read_shard(features / entry["file"])
        for i, image_id in enumerate(data.ids):
            rows[image_id] = {key: values[i] for key, values in data.features.items()}
    return rows, manifest


def files_bytes(features):
    """Every shard file's bytes, by name."""
    return {p.name: p.read_bytes() for p in sorted(features.glob("shard-*.h5"))}


def without_timing(manifest):
    return {key: value for key, value in manifest.items() if key != "timing"}


def tree_bytes(directory):
    """Every file under `directory` (hidden ones too) by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encoded(image, fmt, **options):
    """A PIL image's bytes in `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@contextlib.contextmanager
def local_ray():
    """A local Ray with 2 CPUs for the block; the commands use a Ray that is already up as they find it, and leave it running."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
