"""Stage-two benchmark: `reduce` on synthetic float16 shards (seconds, peak RSS, scaling), heads, and sweeps.

The synthetic features are written once at the largest row count; a smaller size is a features
dir whose manifest lists a prefix of those shards (hard links), so every size reads the same
bytes. Each reduce runs in a fresh Python process that reports its own peak RSS, so the number is
the reduce's alone, not this process's TensorFlow.
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import shards
from pipeline.config import DEFAULT_TAPS, HeadConfig, ReduceConfig

# Channels of the default taps: 1024 + 2048 + 512 + 512 = 4096 dims, as `pipeline extract` stores them.
DEFAULT_TAP_DIMS = dict(zip(DEFAULT_TAPS, (1024, 2048, 512, 512)))
LATENT_DIMS = 32  # rank of the synthetic features' structure
LATENT_CLASS_SPREAD = 0.3  # spread of the class centers in latent space, in units of the latent noise


def write_synthetic_features(out_dir, rows, shard_rows, tap_dims=None, classes=10, seed=0):
    """A features dir in the real format: float16 shards of `rows` rows of low-rank features.

    Each row is a latent vector (its class's center plus noise, so classes overlap) mapped
    linearly to all taps, plus isotropic noise: PCA finds structure, and heads learn something
    without reaching perfect accuracy at once.
    """
    tap_dims = tap_dims or DEFAULT_TAP_DIMS
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    dim = sum(tap_dims.values())
    centers = LATENT_CLASS_SPREAD * rng.standard_normal((classes, LATENT_DIMS), dtype=np.float32)
    mixing = rng.standard_normal((LATENT_DIMS, dim), dtype=np.float32)
    edges = np.cumsum([0, *tap_dims.values()])
    config = {"synthetic": True, "rows": rows, "tap_dims": tap_dims, "seed": seed}
    entries = []
    for index, start in enumerate(range(0, rows, shard_rows)):
        count = min(shard_rows, rows - start)
        labels = (np.arange(start, start + count) % classes).astype(np.int32)
        latent = centers[labels] + rng.standard_normal((count, LATENT_DIMS), dtype=np.float32)
        X = latent @ mixing + rng.standard_normal((count, dim), dtype=np.float32)
        features = {tap: X[:, a:b] for tap, a, b in zip(tap_dims, edges[:-1], edges[1:])}
        data = shards.ShardData([f"img{i:07d}.jpg" for i in range(start, start + count)], labels, [""] * count, features)
        name = shards.shard_filename(index)
        shards.write_shard(out_dir / name, data, index=index, config_sha256="synthetic", config=config, storage_dtype="float16")
        entries.append({"file": name, "rows": count})
    _write_synthetic_manifest(out_dir, config, tap_dims, classes, entries)
    return out_dir


def prefix_features(features_dir, out_dir, rows):
    """A features dir holding the first `rows` rows of `features_dir` (whole shards, hard-linked)."""
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    manifest = shards.read_manifest(features_dir)
    entries, total = [], 0
    for entry in manifest["shards"]:
        if total >= rows:
            break
        entries.append(entry)
        total += entry["rows"]
    if total != rows:
        raise ValueError(f"{rows} rows is not a whole number of {manifest['shards'][0]['rows']}-row shards")
    out_dir.mkdir(parents=True)
    for entry in entries:
        os.link(features_dir / entry["file"], out_dir / entry["file"])
    tap_dims = {tap["key"]: tap["dim"] for tap in manifest["taps"]}
    _write_synthetic_manifest(out_dir, manifest["config"], tap_dims, len(manifest["classes"]), entries)
    return out_dir


def _write_synthetic_manifest(out_dir, config, tap_dims, classes, entries):
    manifest = shards.make_manifest(
        config=config,
        config_sha256="synthetic",
        weights={},
        taps=[
            {"key": tap, "backbone": tap.split("/")[0], "layer": tap.split("/")[1], "dim": dim, "pooling": "avg"}
            for tap, dim in tap_dims.items()
        ],
        classes=[f"class{c}" for c in range(classes)],
        shards=entries,
        listed=sum(entry["rows"] for entry in entries),
        errors=[],
        precision={"policy": "float32", "min_cosine_vs_float32": 1.0},
        timing={},
    )
    shards.write_manifest(out_dir, manifest)


def measure_reduce(features_dir, out_dir, config):
    """Run `reduce_features` in a fresh Python process; return its {seconds, peak_rss_mb}.

    The child reports its own high-water RSS: what a parent reads with wait4 or RUSAGE_CHILDREN
    starts from this process's RSS, which a child inherits when it is forked.
    """
    argv = [sys.executable, "-m", __name__, str(features_dir), str(out_dir), json.dumps(config.to_dict())]
    completed = subprocess.run(argv, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"reduce of {features_dir} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.splitlines()[-1])


def _reduce_and_report(features_dir, out_dir, config_json):
    """The child's side of `measure_reduce`: reduce, then print seconds and peak RSS as JSON."""
    from pipeline.reduce import reduce_features

    started = time.perf_counter()
    reduce_features(features_dir, out_dir, ReduceConfig(**json.loads(config_json)))
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": _peak_rss_mb()}))


def measure_load(features_dir):
    """`load_features` of every tap in a fresh Python process, after a plain sequential read of the same shard files:
    {seconds, gigabytes, gb_per_second, file_gb_per_second, peak_rss_mb, arrays_mb}.

    The plain read leaves the files in whatever cache state `load_features` then meets, so the ratio of the two rates
    compares the reader with the fastest sequential read of its files here (the disk's, or the page cache's).
    """
    argv = [sys.executable, "-m", __name__, "--load", str(features_dir)]
    completed = subprocess.run(argv, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"load_features of {features_dir} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.splitlines()[-1])


def _load_and_report(features_dir):
    """The child's side of `measure_load`: read the files, then load_features, and print the figures as JSON."""
    from pipeline import load_features

    files = sorted(Path(features_dir).glob("shard-*.h5"))
    started = time.perf_counter()
    file_bytes = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(16 * 2**20):
                file_bytes += len(chunk)
    file_seconds = time.perf_counter() - started
    started = time.perf_counter()
    loaded = load_features(features_dir)
    seconds = time.perf_counter() - started
    arrays = sum(array.nbytes for array in loaded.features.values())
    print(
        json.dumps(
            {
                "rows": len(loaded),
                "seconds": seconds,
                "gigabytes": arrays / 1e9,
                "gb_per_second": arrays / 1e9 / seconds,
                "file_gb_per_second": file_bytes / 1e9 / file_seconds,
                "peak_rss_mb": _peak_rss_mb(),
                "arrays_mb": arrays / 2**20,
            }
        )
    )


def _peak_rss_mb():
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss keeps the parent's)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS: bytes, an upper bound


def measure_heads(reduced_dir, runs_dir, repeats, head_config=HeadConfig()):
    """Train `repeats` heads (seeds 0..repeats-1) after the linear-probe baseline; their metrics."""
    from pipeline.train import train

    configs = [dataclasses.replace(head_config, seed=seed) for seed in range(repeats)]
    outcomes = list(train(reduced_dir, runs_dir, configs))
    return {
        "baseline": outcomes[0].metrics,
        "heads": [outcome.metrics for outcome in outcomes[1:]],
    }


def sweep_file(path, heads, epochs):
    """A sweep TOML of `heads` runs (hidden x dropout x seed, in that order), each trained exactly `epochs` epochs."""
    grid = {"hidden": [[256], [512, 128]], "dropout": [0.0, 0.3], "seed": list(range(max(1, heads // 4)))}
    combos = len(grid["hidden"]) * len(grid["dropout"]) * len(grid["seed"])
    if combos != heads:
        raise ValueError(f"a sweep of {heads} heads is not a multiple of 4")
    lines = ["[base]", f"epochs = {epochs}", f"patience = {epochs}", "", "[grid]"]  # patience = epochs: no early stop
    lines += [f"{key} = {json.dumps(values)}" for key, values in grid.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def measure_sweep(reduced_dir, runs_dir, sweep, jobs):
    """`pipeline train REDUCED --sweep SWEEP --jobs N` in a fresh process, start to end: {seconds, run_seconds}.

    A fresh process, because that is what a user runs: TensorFlow starts in it (or in each worker).
    """
    argv = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        str(reduced_dir),
        "--runs",
        str(runs_dir),
        "--sweep",
        str(sweep),
        "--jobs",
        str(jobs),
    ]
    started = time.perf_counter()
    completed = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"sweep with --jobs {jobs} failed:\n{completed.stderr}")
    runs = [json.loads(path.read_text()) for path in sorted(Path(runs_dir).glob("h*/metrics.json"))]
    return {"seconds": seconds, "run_seconds": sum(run["seconds"] for run in runs), "runs": len(runs)}


if __name__ == "__main__":
    if sys.argv[1] == "--load":
        _load_and_report(sys.argv[2])
    else:
        _reduce_and_report(*sys.argv[1:])
