"""The `pipeline bench` runner: every stage against its bound and the seed-style baseline -> bench.json + bench.md.

Stage one is measured at the precision `auto` picks and in float32 (each figure is the median of
`repeats` runs after a warm-up):
  model        the fused tap forward alone on an in-memory batch (no decode, no writing)
  extract      `pipeline.extract.extract` on the corpus, start to manifest, plus its steady state
  decode       the tf.data input pipeline alone: read, decode, resize, batch
  baseline     `seed_style_baseline`, the tutorial-style script, float32
  flops        analytic FLOPs per image, the achieved GFLOP/s and the measured matmul rate
  fast-decode  --fast-decode on camera-sized JPEGs: decode speed and feature cosine vs full decode
  ray          `extract` with engine ray (a local Ray started per run, default workers) against engine
               local, auto precision, runs alternating so that both see the same machine load
Stage two (bench.stage_two) on synthetic shards:
  reduce       seconds and peak RSS at growing row counts
  heads        seconds per head experiment on the smallest reduced set
  sweep        a sweep of `sweep_heads` heads with --jobs 1 and then --jobs 2, each a fresh `pipeline train`
"""

import csv
import dataclasses
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf

from pipeline import backbones, devices
from pipeline.bench import (
    STAGES,
    startup,
)
from pipeline.bench import (
    corpus as bench_corpus,
)
from pipeline.bench import (
    flops as bench_flops,
)
from pipeline.bench import (
    report as bench_report,
)
from pipeline.bench import (
    stacks as bench_stacks,
)
from pipeline.bench import (
    stage_two as bench_stage_two,
)
from pipeline.bench import (
    update as bench_update,
)
from pipeline.config import (
    DEFAULT_TAPS,
    ExtractConfig,
    HeadConfig,
    ReduceConfig,
    parse_tap,
    parse_weights,
    tap_backbone,
    tap_layer,
)
from pipeline.engines.worker import row_cosines
from pipeline.errors import PipelineError
from pipeline.extract import extract
from pipeline.files import write_json
from pipeline.inputs import image_batches
from pipeline.sources import list_source

FORMAT = "pipeline-bench/1"
# CPU flags that decide the precision `auto` picks and how fast it runs, reported with the machine.
REPORTED_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "fma"})
STAGE_ONE = ("model", "extract", "decode", "baseline", "flops", "fast-decode", "ray")  # measured by _stage_one
FLOPS_METHOD = "analytic: 2 x multiply-adds of every Conv2D/Dense of the truncated tap model (bench.flops.count_flops)"
_PREPROCESS = {"resnet50": keras.applications.resnet50.preprocess_input, "vgg16": keras.applications.vgg16.preprocess_input}


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and how big; `quick()` gives the one-minute version."""

    out: Path = Path("bench-out")  # bench.json, bench.md, and a scratch work/ removed at the end
    image_size: int = 224  # model input side
    taps: tuple[str, ...] = DEFAULT_TAPS  # "backbone/layer" taps of stage one, as `extract --tap`
    images: int = 64  # corpus images for the extract, decode and baseline stages
    batch_size: int = 32  # images per forward pass, and the model bound's in-memory batch
    repeats: int = 3  # timed runs per figure, after one warm-up
    data: Path | None = None  # the user's image folder or CSV instead of the generated corpus
    weights: str = "random"  # as `extract --weights`; speed does not depend on the values
    skip: tuple[str, ...] = ()  # stages (STAGES) not to run
    matmul_size: int = 4096  # side of the square matmuls timed for the FLOP bound
    large_images: int = 16  # camera-sized JPEGs for the fast-decode stage
    reduce_rows: tuple[int, ...] = (50_000, 100_000, 200_000)  # reduce sizes; the smallest feeds the heads
    reduce_repeats: int = 1  # cold-process reduce runs per size (a 200k-row reduce takes minutes)
    shard_rows: int = 25_000  # rows per synthetic shard; divides every reduce size
    tap_dims: tuple[int, ...] = (1024, 2048, 512, 512)  # synthetic dims of the four default taps
    components: int = 256  # PCA components kept by reduce
    head_epochs: int = HeadConfig.epochs  # upper bound of each head experiment (early stopping ends sooner)
    sweep_heads: int = 8  # heads of the sweep stage (a multiple of 4), on the smallest reduced set
    sweep_epochs: int = 4  # epochs every sweep head runs (no early stopping, so both sweeps do the same work)
    sweep_jobs: tuple[int, ...] = (1, 2)  # --jobs of each timed sweep; the first is the reference
    sweep_repeats: int = 1  # timed sweeps per --jobs value (each trains every head)

    def __post_init__(self):
        object.__setattr__(self, "taps", tuple(parse_tap(tap) for tap in self.taps))
        unknown = [stage for stage in self.skip if stage not in STAGES]
        if unknown:
            raise PipelineError(f"bench stage {unknown[0]!r} is not one of {', '.join(STAGES)}")

    @classmethod
    def quick(cls, **overrides):
        """About a minute on two cores: 64 px, a few images, tiny stage two."""
        small = dict(
            image_size=64,
            images=32,
            batch_size=16,
            repeats=1,
            matmul_size=1024,
            large_images=4,
            reduce_rows=(2_000, 4_000, 8_000),
            shard_rows=1_000,
            tap_dims=(64, 128, 32, 32),
            components=32,
            head_epochs=5,
            sweep_epochs=2,
        )
        return cls(**{**small, **overrides})


def run_bench(options, log=print):
    """Run every stage not skipped, write out/bench.json and out/bench.md, return the report dict."""
    out = Path(options.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_start, started = os.getloadavg(), time.perf_counter()
    gpus = devices.tensorflow_gpus()  # device options were set by the command (cli.TensorFlowCommand)
    gpu = bool(gpus)
    requested = ExtractConfig(
        taps=options.taps, image_size=options.image_size, batch_size=options.batch_size, weights=options.weights
    )
    config = backbones.resolve(requested, gpu, backbones.cpu_flags(), devices.compute_capability(gpus))
    policies = list(dict.fromkeys([config.precision, "float32"]))
    try:
        corpus, corpus_name = _corpus(options, work)
        paths = [record.path for record in list_source(corpus).records]
        results = _stage_one(options, config, policies, corpus, paths, work, log)
        if "startup" not in options.skip:
            results["startup"] = measure_startup(options, config, policies, corpus, work, log)
        if "update" not in options.skip:
            log("updates: add 1%, remove 1%, no change")
            results["update"] = bench_update.measure_update(
                corpus, work, dataclasses.replace(config, precision=policies[-1]), options.repeats
            )
        results.update(_stage_two(options, work, log))
        if "stacks" not in options.skip:  # the 50,000 x 256 figure on stage two's smallest reduced set, when it was made
            large = work / f"reduced-{min(options.reduce_rows)}-0"
            results["stacks"] = bench_stacks.measure_stacks(work / "stacks", log, large if large.is_dir() else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "format": FORMAT,
        "machine": _machine(gpu),
        "settings": {
            **{key: value for key, value in dataclasses.asdict(options).items() if key not in ("out", "data")},
            "corpus": corpus_name,
            "precision_auto": config.precision,
            "xla": config.xla,
        },
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    report["derived"] = bench_report.derived(results, config.precision)
    report["targets"] = bench_report.targets(report["derived"], policies)
    write_json(out / "bench.json", report)
    (out / "bench.md").write_text(bench_report.render_markdown(report))
    return report


def _corpus(options, work):
    """A CSV source of the corpus (the first `images` of --data, or generated ones) and its description."""
    if options.data is not None:
        listing = list_source(options.data)
        name = f"the first {min(options.images, len(listing.records))} images of {options.data}"
    else:
        listing = list_source(bench_corpus.write_corpus(work / "corpus", options.images))
        name = f"{options.images} JPEG crops (~{'x'.join(map(str, bench_corpus.PHOTO_SIZE))}) of scikit-learn's sample photos"
    source = work / "corpus.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path", "label"])
        for r in [r for r in listing.records if not r.problem][: options.images]:  # no pipes or oversized files
            writer.writerow([r.id, r.path, listing.classes[r.label] if r.label >= 0 else ""])
    return source, name


def _machine(gpu):
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "accelerator": ", ".join(_gpu_name(d) for d in tf.config.list_physical_devices("GPU")) if gpu else "no GPU",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "cpu_flags": sorted(backbones.cpu_flags() & REPORTED_FLAGS),
    }


def _gpu_name(device):
    return tf.config.experimental.get_device_details(device).get("device_name", device.name)


def _read_lines(path):
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


# --- stage one -----------------------------------------------------------------------------


def _stage_one(options, config, policies, corpus, paths, work, log):
    wanted = {stage for stage in STAGE_ONE if stage not in options.skip}
    results = {}
    if "decode" in wanted:
        log("decode bound")
        results["decode"] = {"images_per_second": bench_report.summarize(measure_decode(paths, config, options.repeats))}
    models, forwards = {}, {}
    if wanted & {"model", "flops", "fast-decode"}:
        for policy in policies:
            models[policy], forwards[policy] = tap_forward(dataclasses.replace(config, precision=policy))
    first = [(0, min(len(paths), config.batch_size))]
    batch = next(iter(image_batches(paths, first, config.batch_size, config.image_size, config.resize)))[1]
    for policy in policies:
        if wanted & {"model", "flops"}:  # the FLOP bound is judged against the model bound
            log(f"model bound, {policy}")
            results.setdefault("model", {})[policy] = {
                "images_per_second": bench_report.summarize(measure_model(forwards[policy], batch, options.repeats))
            }
        if "flops" in wanted:
            log(f"FLOP bound, {policy}")
            per_image = round(bench_flops.count_flops(models[policy]) / 1e9, 4)
            flops = results.setdefault("flops", {"gflop_per_image": per_image, "method": FLOPS_METHOD, "policies": {}})
            matmul = bench_flops.matmul_gflops(policy, options.matmul_size, options.repeats)
            flops["policies"][policy] = _flop_bound(per_image, matmul, options.matmul_size, results["model"][policy])
        if "extract" in wanted:
            log(f"end to end, {policy}")
            runs = measure_extract(dataclasses.replace(config, precision=policy), corpus, work / "features", options.repeats)
            fidelity = min(run["min_cosine_vs_float32"] for run in runs)
            results.setdefault("extract", {})[policy] = {**_summarize_runs(runs), "min_cosine_vs_float32": fidelity}
    if "ray" in wanted:
        log(f"end to end, engine ray vs local, {config.precision}")
        runs = measure_engines(config, corpus, work / "features", options.repeats)
        results["ray"] = {config.precision: {engine: _summarize_runs(engine_runs) for engine, engine_runs in runs.items()}}
    if "baseline" in wanted:
        log("seed-style baseline, float32")
        results["baseline"] = _summarize_runs(measure_baseline(paths, config, work / "baseline.h5", options.repeats))
    if "fast-decode" in wanted:
        log("fast decode")
        results["fast_decode"] = measure_fast_decode(options, config, forwards[config.precision], work / "large")
    return results


def tap_forward(config):
    """(tap model, compiled forward returning numpy) exactly as `extract` builds them, with `config`'s weights."""
    trunks = {}
    for name, source in parse_weights(config.weights, config.backbones, config.seed).items():
        trunks[name] = backbones.build_backbone(name, config.image_size, config.precision)
        backbones.load_weights(trunks[name], name, source)
    model = backbones.build_tap_model(trunks, config.taps, config.pooling, config.image_size)
    compiled = backbones.compile_forward(model, config.image_size, config.xla, config.batch_size)
    return model, lambda images: {key: value.numpy() for key, value in compiled(images).items()}


def measure_model(forward, batch, repeats):
    """Images/s of `repeats` forward passes over one in-memory batch, after a warm-up pass."""
    forward(batch)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        forward(batch)
        rates.append(int(batch.shape[0]) / (time.perf_counter() - started))
    return rates


def measure_decode(paths, config, repeats, fast_decode=False):
    """Images/s of the input pipeline alone over `paths`, `repeats` passes after a warm-up pass."""
    dataset = image_batches(paths, [(0, len(paths))], config.batch_size, config.image_size, config.resize, fast_decode)
    rates = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        count = sum(int(indices.shape[0]) for indices, _ in dataset)
        rates.append(count / (time.perf_counter() - started))
    return rates[1:]


def measure_extract(config, corpus, out_dir, repeats):
    """`repeats` full `extract` runs into a fresh `out_dir`, after a warm-up run; a summary of each."""
    runs = [_timed_extract(config, corpus, out_dir) for _ in range(repeats + 1)]
    return runs[1:]


def measure_engines(config, corpus, out_dir, repeats):
    """{local, ray}: `repeats` runs of each engine after a warm-up, alternating so that load on the machine hits both alike."""
    runs = {"local": [], "ray": []}
    for _ in range(repeats + 1):
        for engine, engine_runs in runs.items():
            engine_runs.append(_timed_extract(config, corpus, out_dir, engine))
    return {engine: engine_runs[1:] for engine, engine_runs in runs.items()}


def _timed_extract(config, corpus, out_dir, engine="local"):
    """One `extract` on `engine` into a fresh `out_dir` (removed after): RunClock's summary plus the fidelity check."""
    shutil.rmtree(out_dir, ignore_errors=True)
    clock = RunClock()
    result = extract(config, list_source(corpus), out_dir, progress=clock, engine=engine)  # listing is part of the run
    shutil.rmtree(out_dir, ignore_errors=True)
    return {**clock.finish(), "min_cosine_vs_float32": result.manifest["precision"]["min_cosine_vs_float32"]}


class RunClock:
    """A progress callback that times a run: start to finish, first batch, and the steady rate after it."""

    def __init__(self):
        self.started = time.perf_counter()
        self.done = []  # (seconds since start, images) per progress call

    def start(self, total, done):
        pass

    def __call__(self, n):
        if n:
            self.done.append((time.perf_counter() - self.started, n))

    def finish(self):
        """{seconds, images, first_batch_seconds, steady (images/s after the first batch, None if one)}."""
        seconds = time.perf_counter() - self.started
        steady = None
        if len(self.done) > 1:
            steady = sum(n for _, n in self.done[1:]) / (self.done[-1][0] - self.done[0][0])
        images = sum(n for _, n in self.done)
        return {"seconds": seconds, "images": images, "first_batch_seconds": self.done[0][0], "steady": steady}


def _summarize_runs(runs):
    """Summaries over runs: start-to-end and steady images/s, and time to the first batch."""
    steady = [run["steady"] for run in runs if run["steady"] is not None]
    return {
        "images": runs[0]["images"],
        "images_per_second": bench_report.summarize([run["images"] / run["seconds"] for run in runs]),
        "steady_images_per_second": bench_report.summarize(steady) if steady else None,
        "first_batch_seconds": bench_report.summarize([run["first_batch_seconds"] for run in runs]),
    }


def _flop_bound(gflop_per_image, matmul_rates, matmul_size, model):
    """The FLOP bound implied by the matmul rate, and the share of it the model bound reaches."""
    matmul = bench_report.summarize(matmul_rates)
    return {
        "matmul_size": matmul_size,
        "matmul_gflops": matmul,
        "bound_images_per_second": bench_report.summarize([rate / gflop_per_image for rate in matmul_rates]),
        "achieved_gflops": bench_report.summarize([rate * gflop_per_image for rate in model["images_per_second"]["runs"]]),
        "fraction_of_bound": bench_report.ratio(model["images_per_second"]["median"] * gflop_per_image, matmul["median"]),
    }


def measure_baseline(paths, config, out_path, repeats):
    """`repeats` runs of `seed_style_baseline` on `paths` with `config`'s taps and weights, after a warm-up run."""
    runs = []
    for _ in range(repeats + 1):
        clock = RunClock()
        seed_style_baseline(
            paths, config.taps, config.image_size, config.batch_size, config.weights, config.seed, out_path, clock
        )
        runs.append(clock.finish())
    return runs[1:]


def seed_style_baseline(paths, taps, image_size, batch_size, weights, seed, out_path, progress=None):
    """The comparison point: feature extraction as common Keras tutorials write it.

    Every image goes through `keras.utils.load_img`; each backbone is its own keras.applications
    model cut at its taps and global-average pooled; `model.predict` runs per batch in float32;
    the features are concatenated in memory and written to one HDF5 file at the end. Weights come
    from the same loader as `extract`, so both compute the same function of the same images.
    `progress(n)` is called after each batch, as `extract` calls it.
    """
    models = {}
    for backbone, source in parse_weights(weights, tuple(dict.fromkeys(map(tap_backbone, taps))), seed).items():
        trunk = backbones.build_backbone(backbone, image_size)
        backbones.load_weights(trunk, backbone, source)
        keys = [tap for tap in taps if tap_backbone(tap) == backbone]
        pooled = [keras.layers.GlobalAveragePooling2D()(trunk.get_layer(tap_layer(key)).output) for key in keys]
        models[backbone] = (keys, keras.Model(trunk.input, pooled))
    features = {tap: [] for tap in taps}
    for start in range(0, len(paths), batch_size):
        pictures = [
            keras.utils.load_img(path, target_size=(image_size, image_size)) for path in paths[start : start + batch_size]
        ]
        batch = np.stack([keras.utils.img_to_array(picture) for picture in pictures])
        for backbone, (keys, model) in models.items():
            outputs = model.predict(_PREPROCESS[backbone](batch.copy()), verbose=0)
            for key, output in zip(keys, outputs if isinstance(outputs, list) else [outputs]):
                features[key].append(output)
        if progress:
            progress(len(batch))
    with h5py.File(out_path, "w") as f:
        for key, parts in features.items():
            f.create_dataset(key, data=np.concatenate(parts))


def measure_fast_decode(options, config, forward, work):
    """--fast-decode on camera-sized JPEGs: decode-bound images/s both ways and feature cosines."""
    paths = [
        record.path
        for record in list_source(bench_corpus.write_corpus(work, options.large_images, bench_corpus.LARGE_SIZE)).records
    ]
    full = measure_decode(paths, config, options.repeats)
    fast = measure_decode(paths, config, options.repeats, fast_decode=True)
    features = {}
    for fast_decode in (False, True):
        batches = image_batches(paths, [(0, len(paths))], config.batch_size, config.image_size, config.resize, fast_decode)
        outputs = [forward(images) for _, images in batches]
        features[fast_decode] = {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}
    cosines = np.concatenate([row_cosines(features[False][key], features[True][key]) for key in features[False]])
    return {
        "photo_size": list(bench_corpus.LARGE_SIZE),
        "images": len(paths),
        "full_images_per_second": bench_report.summarize(full),
        "fast_images_per_second": bench_report.summarize(fast),
        "speedup": bench_report.ratio(bench_report.summarize(fast), bench_report.summarize(full)),
        "min_cosine_vs_full_decode": float(cosines.min()),
        "mean_cosine_vs_full_decode": float(cosines.mean()),
        "precision": config.precision,
    }


def measure_startup(options, config, policies, corpus, work, log):
    """Fresh-process start-up: time to the first batch per policy, an up-to-date rerun, predict on one image."""
    results = {"first_batch": {}}
    for policy in policies:
        log(f"start-up, first batch, {policy}")
        runs = [
            startup.measure_first_batch(corpus, work / "startup-features", dataclasses.replace(config, precision=policy))
            for _ in range(options.repeats)
        ]
        results["first_batch"][policy] = {phase: bench_report.summarize([run[phase] for run in runs]) for phase in runs[0]}
    log("start-up, up-to-date rerun and predict on one image")
    argv = startup.extract_argv(corpus, work / "startup-features", dataclasses.replace(config, precision=policies[-1]))
    results["up_to_date_seconds"] = bench_report.summarize([startup.time_command(argv) for _ in range(options.repeats)])
    run_dir, one = startup.prepare_run(corpus, work / "startup-run", dataclasses.replace(config, precision="float32"))
    predict = startup.predict_argv(run_dir, one, work / "startup-run" / "one.csv")
    results["predict_one_seconds"] = bench_report.summarize([startup.time_command(predict) for _ in range(options.repeats)])
    log("start-up, extract of 4 images with and without --xla")
    four = startup.first_images(corpus, work / "startup-four", 4)
    results["four_images_seconds"] = {}
    out = work / "startup-four-features"
    for xla in ("--xla", "--no-xla"):
        argv = [*startup.extract_argv(four, out, dataclasses.replace(config, precision="float32")), xla]
        results["four_images_seconds"][xla] = bench_report.summarize(
            [startup.time_fresh_extract(argv, out) for _ in range(options.repeats)]
        )
    return results


# --- stage two -----------------------------------------------------------------------------


def _stage_two(options, work, log):
    results = {}
    wanted = [stage for stage in ("reduce", "heads", "sweep") if stage not in options.skip]
    if not wanted:
        return results
    tap_dims = dict(zip(bench_stage_two.DEFAULT_TAP_DIMS, options.tap_dims))
    sizes = sorted(options.reduce_rows) if "reduce" in wanted else [min(options.reduce_rows)]
    log(f"synthetic shards: {max(sizes):,} rows x {sum(tap_dims.values()):,} dims, float16")
    synthetic = bench_stage_two.write_synthetic_features(work / "synthetic", max(sizes), options.shard_rows, tap_dims)
    config = ReduceConfig(solver="incremental", components=options.components)
    repeats = options.reduce_repeats if "reduce" in wanted else 1  # heads and sweeps alone need one reduced set
    runs = []
    for rows in sizes:
        log(f"reduce, {rows:,} rows")
        source = synthetic if rows == max(sizes) else bench_stage_two.prefix_features(synthetic, work / f"features-{rows}", rows)
        measured = [bench_stage_two.measure_reduce(source, work / f"reduced-{rows}-{run}", config) for run in range(repeats)]
        runs.append({"rows": rows, **{key: bench_report.summarize([m[key] for m in measured]) for key in measured[0]}})
    if "reduce" in wanted:
        smallest, largest = runs[0], runs[-1]
        growth = (largest["seconds"]["median"] / largest["rows"]) / (smallest["seconds"]["median"] / smallest["rows"])
        results["reduce"] = {
            "dims": sum(tap_dims.values()),
            "storage": "float16",
            "solver": config.solver,
            "components": config.components,
            "batch_rows": config.batch_rows,
            "sizes": runs,
            "row_cost_growth": bench_report.ratio(growth, 1),
        }
        log(f"load_features, {max(sizes):,} rows")
        results["reduce"]["load_features"] = bench_stage_two.measure_load(synthetic)
    if "heads" in wanted:
        log(f"head experiments on {sizes[0]:,} x {config.components}")
        head_config = HeadConfig(epochs=options.head_epochs)
        measured = bench_stage_two.measure_heads(work / f"reduced-{sizes[0]}-0", work / "runs", options.repeats, head_config)
        results["heads"] = {
            "rows": sizes[0],
            "dims": config.components,
            "hidden": list(head_config.hidden),
            "seconds": bench_report.summarize([m["seconds"] for m in measured["heads"]]),
            "epochs": bench_report.summarize([m["epochs"] for m in measured["heads"]]),
            "seconds_per_epoch": bench_report.summarize([m["seconds"] / m["epochs"] for m in measured["heads"]]),
            "val_accuracy": bench_report.summarize([m["val"]["accuracy"] for m in measured["heads"]]),
            "linear_probe_seconds": measured["baseline"]["seconds"],
        }
    if "sweep" in wanted:
        results["sweep"] = _sweep(options, work / f"reduced-{sizes[0]}-0", work, sizes[0], config.components, log)
    return results


def _sweep(options, reduced_dir, work, rows, dims, log):
    """The same sweep timed with each --jobs value, each time into a fresh runs dir."""
    sweep = bench_stage_two.sweep_file(work / "sweep.toml", options.sweep_heads, options.sweep_epochs)
    timings = {}
    for jobs in options.sweep_jobs:
        log(f"sweep of {options.sweep_heads} heads on {rows:,} x {dims}, --jobs {jobs}")
        measured = []
        for repeat in range(options.sweep_repeats):
            runs = work / f"sweep-runs-{jobs}-{repeat}"
            measured.append(bench_stage_two.measure_sweep(reduced_dir, runs, sweep, jobs))
            shutil.rmtree(runs, ignore_errors=True)
        timings[str(jobs)] = {key: bench_report.summarize([m[key] for m in measured]) for key in ("seconds", "run_seconds")}
    return {
        "rows": rows,
        "dims": dims,
        "heads": options.sweep_heads,
        "epochs": options.sweep_epochs,
        "cores": os.cpu_count(),
        "jobs": timings,
    }
