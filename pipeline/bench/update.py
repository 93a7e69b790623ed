"""Updates: a rerun after the collection changed, each as a whole `pipeline extract` command in a fresh process.

  full        the first run over the corpus
  add 1%      a rerun after 1% more images (new content) were added
  remove 1%   a rerun after 1% of the images were deleted (no model is built)
  no change   a rerun over the unchanged folder (up to date; no TensorFlow import), also timed in-process
  start-up    a first run over a single image: what any run that computes pays before its images
plus what change detection costs: the sha256 of every corpus file, per image.
"""

import hashlib
import math
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.bench import report as bench_report
from pipeline.bench import startup
from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.sources import list_source


def measure_update(corpus, work, config: ExtractConfig, repeats):
    """Seconds (summaries) of the full run, the reruns after adding and removing 1%, with no change (whole command and
    in this process), and the sha256 cost per image."""
    images = work / "update-images"
    shutil.rmtree(images, ignore_errors=True)
    for record in list_source(corpus).records:  # a folder of its own (the corpus may be a CSV), which the stage then changes
        (images / record.id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(record.path, images / record.id)
    out = work / "update-features"
    shutil.rmtree(out, ignore_errors=True)
    argv = startup.extract_argv(images, out, config)
    records = list_source(images).records
    change = max(1, math.ceil(len(records) / 100))
    full = startup.time_command(argv)
    for k, record in enumerate(records[:change]):  # new content: an existing picture, mirrored
        path = Path(record.path)
        with Image.open(path) as picture:
            picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path.with_name(f"added-{k}{path.suffix}"))
    add = startup.time_command(argv)
    for record in records[-change:]:
        Path(record.path).unlink()
    remove = startup.time_command(argv)
    no_change = [startup.time_command(argv) for _ in range(repeats)]
    one = work / "update-one"  # start-up: a first run over one image (as eager as an update of a few)
    (one / "images").mkdir(parents=True, exist_ok=True)
    shutil.copy2(records[0].path, one / "images" / Path(records[0].path).name)
    start_up = startup.time_command(startup.extract_argv(one / "images", one / "features", config))
    in_process = []
    for _ in range(repeats):  # the rerun itself, without the interpreter's start-up and imports: listing, planning, checks
        started = time.perf_counter()
        extract(config, list_source(images), out)
        in_process.append(time.perf_counter() - started)
    hashing = _sha256_cost([Path(r.path) for r in list_source(images).records])
    summary = bench_report.summarize
    return {
        "images": len(records),
        "added": change,
        "removed": change,
        "full_seconds": summary([full]),
        "add_seconds": summary([add]),
        "remove_seconds": summary([remove]),
        "start_up_seconds": summary([start_up]),
        "no_change_seconds": summary(no_change),
        "no_change_in_process_seconds": summary(in_process),
        **hashing,
    }


def _sha256_cost(paths):
    """What hashing the files costs (read from the page cache, as a rerun right after listing finds them)."""
    sizes = [p.stat().st_size for p in paths]
    for p in paths:
        p.read_bytes()  # warm the cache, as the listing's stat and an earlier read leave it
    started = time.perf_counter()
    for p in paths:
        hashlib.sha256(p.read_bytes()).hexdigest()
    seconds = time.perf_counter() - started
    return {
        "sha256_ms_per_image": round(1000 * seconds / len(paths), 4),
        "sha256_mb_per_second": round(sum(sizes) / 2**20 / max(seconds, 1e-9), 1),
        "mean_image_kb": round(float(np.mean(sizes)) / 1024, 1),
    }
