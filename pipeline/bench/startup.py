"""Start-up: what a user waits for before work begins, each measured in a fresh process.

first batch   command start to the first batch computed by `extract`, split into the phases
              before it (imports, listing, model ready = built, weights loaded, traced)
up to date    a whole `pipeline extract` rerun over a finished directory
predict one   a whole `pipeline predict` on a single image
xla, 4 images a whole `pipeline extract` of 4 images with --xla, and with --no-xla (runs that small skip the compile)
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import ExtractConfig, HeadConfig, ReduceConfig


def measure_first_batch(corpus, out_dir, config: ExtractConfig):
    """Seconds from process start to: imports done, listing done, model ready, first batch, end (into a fresh `out_dir`)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = [sys.executable, "-m", __name__, str(corpus), str(out_dir), json.dumps(config.to_dict())]
    launched = time.time()
    completed = subprocess.run(argv, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"extract of {corpus} failed:\n{completed.stderr}")
    marks = json.loads(completed.stdout.splitlines()[-1])
    return {phase: at - launched for phase, at in marks.items()}


def _first_batch_child(corpus, out_dir, config_json):
    """The child's side of measure_first_batch: wall-clock time at each phase, printed as JSON."""
    marks = {}
    import tensorflow  # noqa: F401  (what every computing command imports; timed as part of the imports)

    from pipeline.extract import extract
    from pipeline.sources import list_source

    marks["imports"] = time.time()
    listing = list_source(corpus)
    marks["listing"] = time.time()

    class Clock:
        def start(self, total, done):
            marks.setdefault("model_ready", time.time())

        def __call__(self, images):
            if images:
                marks.setdefault("first_batch", time.time())

    extract(ExtractConfig(**json.loads(config_json)), listing, out_dir, progress=Clock())
    marks["end"] = time.time()
    print(json.dumps(marks))


def time_command(argv):
    """Wall seconds of a command run to completion (it must succeed)."""
    started = time.perf_counter()
    completed = subprocess.run(argv, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed:\n{completed.stderr}")
    return time.perf_counter() - started


def time_fresh_extract(argv, out_dir):
    """Wall seconds of an extract command into `out_dir`, emptied first so that it computes everything."""
    shutil.rmtree(out_dir, ignore_errors=True)
    return time_command(argv)


def extract_argv(corpus, out_dir, config: ExtractConfig):
    """The `pipeline extract` command line that runs `config`."""
    argv = [sys.executable, "-m", "pipeline", "extract", str(corpus), "--out", str(out_dir)]
    for tap in config.taps:
        argv += ["--tap", tap.replace("/", ":")]
    argv += [
        "--image-size",
        config.image_size,
        "--batch-size",
        config.batch_size,
        "--precision",
        config.precision,
        "--weights",
        config.weights,
        "--seed",
        config.seed,
        "--pooling",
        config.pooling,
    ]
    return [str(arg) for arg in argv]


def prepare_run(corpus, work, config: ExtractConfig):
    """A head run on the corpus (tiny reduce and head), and a folder holding one of its images: (run dir, folder)."""
    from pipeline.extract import extract
    from pipeline.reduce import reduce_features
    from pipeline.sources import list_source
    from pipeline.train import train

    listing = list_source(corpus)
    extract(config, listing, work / "features")
    components = max(1, min(8, len(listing.records) // 4))  # below the train rows (a quarter go to val, by class)
    reduce_features(
        work / "features", work / "reduced", ReduceConfig(components=components, val_fraction=0.25, test_fraction=0.0)
    )
    head = list(train(work / "reduced", work / "runs", [HeadConfig(hidden=(8,), epochs=2)]))[-1]
    one = work / "one"
    one.mkdir()
    first = Path(listing.records[0].path)
    (one / first.name).write_bytes(first.read_bytes())
    return work / "runs" / head.run_id, one


def first_images(corpus, folder, count):
    """`folder`, made to hold copies of the corpus' first `count` images (by listing order)."""
    from pipeline.sources import list_source

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, record in enumerate(list_source(corpus).records[:count]):
        (folder / f"{i:03d}{Path(record.path).suffix}").write_bytes(Path(record.path).read_bytes())
    return folder


def predict_argv(run_dir, images, out_csv):
    return [sys.executable, "-m", "pipeline", "predict", str(run_dir), str(images), "--out", str(out_csv)]


if __name__ == "__main__":
    _first_batch_child(*sys.argv[1:])
