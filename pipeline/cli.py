"""The `pipeline` command line: flags become config objects, results become printed lines.

This is the only module that talks to the user. Heavy imports (TensorFlow) happen inside the
commands so that `pipeline --help` stays fast.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import click
from click.core import ParameterSource

from pipeline import config as cfg
from pipeline import devices
from pipeline.bench import STAGES as BENCH_STAGES
from pipeline.errors import PipelineError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ info logs off the user's screen
devices.request_memory_growth()  # before any TensorFlow import; inherited by local Ray actors and worker processes


REDELIVERY_DELAY_S = 0.1  # after the unraisable hook has returned


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every cleanup on the way out runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


class PipelineGroup(click.Group):
    """Turns a PipelineError from any command into one `Error: ...` line and exit status 1.

    Ctrl-C (SIGINT) and SIGTERM end in one line and the shell's usual status, 130 or 143: every
    command keeps what it finished, so rerunning it resumes.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            raise click.ClickException(str(e)) from None
        except (KeyboardInterrupt, Terminated) as e:
            click.echo("interrupted; rerun the same command to resume", err=True)
            ctx.exit(143 if isinstance(e, Terminated) else 130)


class TensorFlowCommand(click.Command):
    """A command that runs TensorFlow in this process: the device options are set before its body runs.

    This is where commands set them (devices.configure), after the flags are parsed and before
    anything imports TensorFlow. `runs_here(params)` says whether TensorFlow runs in this process
    (train with --jobs leaves it to its workers). `gpu_work` commands warn loudly when nvidia-smi
    lists a GPU that TensorFlow does not see. `extract` is not one: it loads TensorFlow only when
    there is something to compute, and its worker (engines.worker.ShardWorker) sets the options
    first, in this process or in a Ray actor.
    """

    def __init__(self, *args, runs_here=lambda params: True, gpu_work=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs_here, self.gpu_work = runs_here, gpu_work

    def invoke(self, ctx):
        if self.runs_here(ctx.params):
            for problem in devices.configure():
                click.echo(f"warning: {problem}", err=True)
            if self.gpu_work:
                warn_unseen_gpus()
        return super().invoke(ctx)


def warn_unseen_gpus():
    """Loudly, when nvidia-smi lists an NVIDIA GPU but TensorFlow sees none (the work would run on the CPU)."""
    unseen = devices.unseen_gpus_warning(bool(devices.tensorflow_gpus()))
    if unseen:
        click.echo(click.style(f"WARNING: {unseen}", fg="red", bold=True), err=True)


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def cli():
    """Extract frozen CNN features once, then reduce and train many small heads on them."""


def _redeliver_swallowed_interrupts(unraisable):
    """Send an interrupt again when it was raised where Python ignores exceptions (a __del__, a GC callback).

    Without this, a SIGTERM or Ctrl-C that lands in such a place is printed and lost, and the
    command runs on to exit 0. It is sent a moment later from a timer thread, because a signal
    that arrives while the hook runs is handled inside the hook and lost again; this way the main
    thread raises it at its next ordinary line.
    """
    for kind, signum in ((Terminated, signal.SIGTERM), (KeyboardInterrupt, signal.SIGINT)):
        if isinstance(unraisable.exc_value, kind):
            resend = threading.Timer(REDELIVERY_DELAY_S, os.kill, args=(os.getpid(), signum))
            resend.daemon = True
            resend.start()
            return
    sys.__unraisablehook__(unraisable)


def install_interrupt_handlers():
    """SIGTERM raises Terminated, SIGINT KeyboardInterrupt; an interrupt swallowed by a __del__ or GC callback is sent again.

    SIGINT is set explicitly: a command started as a background job of a shell without job control
    inherits it ignored, and Python then leaves it so, which would make Ctrl-C or `kill -INT` do nothing.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = _redeliver_swallowed_interrupts


def main():
    install_interrupt_handlers()
    cli(prog_name="pipeline")


@cli.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False, writable=True))
@click.option("--size", default=64, show_default=True, type=click.IntRange(8, 1024), help="Side of the written PNGs in pixels.")
def demo_data(out, size):
    """Write the demo set (scikit-learn's digits) as PNGs under OUT/<digit>/."""
    from pipeline.demo import write_digits

    count = write_digits(out, size)
    click.echo(f"wrote {count} digit images ({size}x{size} PNG) to {out}")


def given_options(ctx, options):
    """The options typed on the command line (or set through their environment variable)."""
    return {key: value for key, value in options.items() if ctx.get_parameter_source(key) is not ParameterSource.DEFAULT}


class Progress:
    """A tqdm bar on a terminal; a plain line every `interval` seconds otherwise.

    `start` gives the total and the images an earlier run finished; the rate and ETA count only
    the images computed now. `before_computing()` runs at the start of a run with images to compute.
    """

    def __init__(self, label, interval=10.0, before_computing=None):
        self.label, self.interval, self.before_computing = label, interval, before_computing
        self.total = self.done = self.computed = 0
        self.bar = None

    def start(self, total, done):
        if done < total and self.before_computing is not None:
            self.before_computing()
        self.total, self.done = total, done
        self.started = self.last = time.monotonic()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", desc=self.label, dynamic_ncols=True)
        elif done:
            click.echo(f"{self.label}: {done}/{total} images done by an earlier run", err=True)

    def __call__(self, n):
        if not n:
            return
        self.done += n
        self.computed += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            rate = self.computed / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            click.echo(f"{self.label}: {self.done}/{self.total} images, {rate:.1f} images/s, ETA {eta:.0f} s", err=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


_EXTRACT = cfg.ExtractConfig()
# Keys a --config file may set: every option below but --out and --config themselves.
EXTRACT_KEYS = (
    "backbone",
    "tap",
    "pooling",
    "image_size",
    "resize",
    "fast_decode",
    "exif_orientation",
    "batch_size",
    "precision",
    "xla",
    "weights",
    "seed",
    "shard_size",
    "storage_dtype",
    "on_error",
    "deterministic",
    "overwrite",
)


@cli.command()
@click.argument("source", type=click.Path(exists=True, path_type=str))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Features directory to write (shards + manifest.json)."
)
@click.option(
    "--backbone",
    multiple=True,
    type=click.Choice(cfg.BACKBONES),
    help="Backbone to run; repeat for several. Default: both, or those of --tap.",
)
@click.option(
    "--tap",
    multiple=True,
    help="BACKBONE:LAYER to pool and store; repeat. Default: conv4/conv5 of ResNet50, block4/5_conv3 of VGG16.",
)
@click.option(
    "--pooling",
    default=_EXTRACT.pooling,
    show_default=True,
    type=click.Choice(cfg.POOLINGS),
    help="Global pooling of each tap (avgmax concatenates both).",
)
@click.option(
    "--image-size",
    default=_EXTRACT.image_size,
    show_default=True,
    type=click.IntRange(cfg.MIN_IMAGE_SIZE, cfg.MAX_IMAGE_SIZE),
    help="Square input side in pixels.",
)
@click.option(
    "--resize",
    default=_EXTRACT.resize,
    show_default=True,
    type=click.Choice(cfg.RESIZES),
    help="Squash the whole image, or center-crop to square first.",
)
@click.option(
    "--fast-decode/--no-fast-decode",
    default=_EXTRACT.fast_decode,
    show_default=True,
    help="Decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still covers --image-size (faster, features move slightly).",
)
@click.option(
    "--exif-orientation/--no-exif-orientation",
    default=None,
    help="Turn photos upright by their EXIF orientation tag before computing. Default: on (a resumed run keeps what it recorded; runs made before this option had it off).",
)
@click.option(
    "--batch-size", default=_EXTRACT.batch_size, show_default=True, type=click.IntRange(min=1), help="Images per forward pass."
)
@click.option(
    "--precision",
    default=_EXTRACT.precision,
    show_default=True,
    type=click.Choice(cfg.PRECISIONS),
    help="Compute policy; auto = mixed_float16 on a GPU of compute capability 7.0+, mixed_bfloat16 on bf16 CPUs, else float32.",
)
@click.option("--xla/--no-xla", default=_EXTRACT.xla, help="XLA-compile the forward pass. Default: on with a GPU.")
@click.option(
    "--weights", default=_EXTRACT.weights, show_default=True, help="imagenet, random (seeded), or resnet50=PATH,vgg16=PATH."
)
@click.option("--seed", default=_EXTRACT.seed, show_default=True, type=click.IntRange(min=0), help="Seed for --weights random.")
@click.option(
    "--shard-size",
    default=_EXTRACT.shard_size,
    show_default=True,
    type=click.IntRange(min=1),
    help="Listed images per HDF5 shard.",
)
@click.option(
    "--storage-dtype",
    default=_EXTRACT.storage_dtype,
    show_default=True,
    type=click.Choice(cfg.STORAGE_DTYPES),
    help="Dtype of the stored features.",
)
@click.option(
    "--deterministic/--no-deterministic",
    default=_EXTRACT.deterministic,
    show_default=True,
    help="On a GPU: TensorFlow's op determinism, so reruns give the same bytes (cuDNN and XLA do not time kernels to pick the fastest).",
)
@click.option(
    "--on-error",
    default=_EXTRACT.on_error,
    show_default=True,
    type=click.Choice(cfg.ON_ERROR),
    help="An undecodable image: record it and go on, or stop.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace features of a different configuration in --out (refused in a job-array task)."
)
@click.option(
    "--num-workers",
    type=click.IntRange(min=1),
    help="Job arrays: this task computes only shards k with k % N == --worker-index and writes no manifest. Default: $SLURM_ARRAY_TASK_COUNT, else 1.",
)
@click.option(
    "--worker-index",
    type=click.IntRange(min=0),
    help="Job arrays: this task's index, 0..N-1. Default: from $SLURM_ARRAY_TASK_ID (minus $SLURM_ARRAY_TASK_MIN, over $SLURM_ARRAY_TASK_STEP); outside a Slurm array, required with --num-workers above 1.",
)
@click.option(
    "--engine",
    default="local",
    show_default=True,
    type=click.Choice(cfg.ENGINES),
    help="Run shards in this process, or on Ray actors (several GPUs or machines).",
)
@click.option(
    "--ray-address",
    help="--engine ray: `auto` or HOST:PORT of a running Ray cluster. Default: $RAY_ADDRESS, else start a local Ray on this machine.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="--engine ray: actors to start. Default: one per --gpus-per-worker GPUs Ray sees, else one per node (one per --cpus-per-worker CPUs when that is given).",
)
@click.option(
    "--cpus-per-worker",
    type=click.IntRange(min=1),
    help="--engine ray: CPUs per actor (decoding, TensorFlow threads). Default: a GPU node's CPUs shared among its actors; without GPUs, a whole node's, or the most that fit --workers.",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(min=0),
    help="--engine ray: GPUs per actor (a fraction shares one). Default: 1 when Ray sees a GPU, else 0 (CPU actors).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="TOML file with the same keys as these flags; flags win.",
)
@click.pass_context
def extract(
    ctx,
    source,
    out,
    config_file,
    num_workers,
    worker_index,
    engine,
    ray_address,
    workers,
    cpus_per_worker,
    gpus_per_worker,
    **options,
):
    """Run the frozen backbone taps over SOURCE (a folder tree or a CSV) into HDF5 shards."""
    num_workers, worker_index = _job_array(num_workers, worker_index)
    engine_options = _engine_options(
        engine, address=ray_address, workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker
    )
    values = cfg.load_toml(config_file, EXTRACT_KEYS) if config_file else {}
    values.update(given_options(ctx, options))
    try:
        config, overwrite = _extract_config(values)
    except PipelineError as e:
        raise PipelineError(f"config file {config_file}: {e}" if config_file else str(e)) from None

    from pipeline.extract import extract as run_extract
    from pipeline.sources import list_source

    listing = list_source(source)
    for warning in listing.warnings:
        click.echo(f"warning: {warning}", err=True)
    total = len(listing.records)
    click.echo(f"extract: {total} images from {source} -> {out}", err=True)
    # The local engine's worker has loaded TensorFlow (with the device options) when the computing starts.
    progress = Progress("extract", before_computing=warn_unseen_gpus if engine == "local" else None)
    try:
        result = run_extract(
            config,
            listing,
            out,
            overwrite=overwrite,
            progress=progress,
            engine=engine,
            engine_options=engine_options,
            num_workers=num_workers,
            worker_index=worker_index,
        )
    finally:
        progress.close()
    _print_extract_summary(result, num_workers, worker_index)


_RAY_FLAGS = {
    "address": "--ray-address",
    "workers": "--workers",
    "cpus_per_worker": "--cpus-per-worker",
    "gpus_per_worker": "--gpus-per-worker",
}


def _engine_options(engine, **values):
    """The options given for the engine (RayEngine's defaults fill the rest); Ray's flags with --engine local are an error."""
    given = {key: value for key, value in values.items() if value is not None}
    if engine == "local" and given:
        flag = _RAY_FLAGS[next(iter(given))]
        raise click.BadParameter(f"{flag} is an option of --engine ray; add --engine ray or drop it", param_hint=flag)
    return given


def _job_array(num_workers, worker_index):
    """(N, I): N from --num-workers, else $SLURM_ARRAY_TASK_COUNT, else 1; I from --worker-index, else from Slurm's task id.

    Without an index a single worker is task 0, but N > 1 is refused: every task would compute task 0's shards.
    """
    env = os.environ
    if num_workers is None:
        num_workers = _slurm_int("SLURM_ARRAY_TASK_COUNT", minimum=1) if "SLURM_ARRAY_TASK_COUNT" in env else 1
    if worker_index is None and "SLURM_ARRAY_TASK_ID" in env:
        task, first, step = (
            _slurm_int(name, default)
            for name, default in (("SLURM_ARRAY_TASK_ID", None), ("SLURM_ARRAY_TASK_MIN", 0), ("SLURM_ARRAY_TASK_STEP", 1))
        )
        if step < 1 or task < first or (task - first) % step:
            raise PipelineError(
                f"$SLURM_ARRAY_TASK_ID {task} is not $SLURM_ARRAY_TASK_MIN {first} plus a multiple of "
                f"$SLURM_ARRAY_TASK_STEP {step}; pass --worker-index 0..{num_workers - 1} instead"
            )
        worker_index = (task - first) // step
    if worker_index is None:
        if num_workers > 1:
            raise PipelineError(
                f"--num-workers {num_workers} needs this task's index: pass --worker-index 0..{num_workers - 1} "
                "(a Slurm array task takes it from $SLURM_ARRAY_TASK_ID)"
            )
        worker_index = 0
    if worker_index >= num_workers:
        raise click.BadParameter(f"{worker_index} is not below --num-workers {num_workers}", param_hint="--worker-index")
    return num_workers, worker_index


def _slurm_int(name, default=None, minimum=0):
    """An integer Slurm variable (its `default` when unset), or one sentence naming it."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise PipelineError(
            f"${name} is {text!r}, not an integer of at least {minimum}; pass --num-workers and --worker-index instead"
        )
    return value


def _extract_config(values):
    """(ExtractConfig, overwrite) from flags and config-file values; the dataclass supplies every default."""
    values = dict(values)
    backbones, taps = (_as_list(key, values.pop(key, ())) for key in ("backbone", "tap"))
    unknown = [b for b in backbones if b not in cfg.BACKBONES]
    if unknown:
        raise PipelineError(f"backbone {unknown[0]!r} is not one of {', '.join(cfg.BACKBONES)}")
    taps = tuple(cfg.parse_tap(t) for t in taps) or tuple(
        t for t in cfg.DEFAULT_TAPS if not backbones or cfg.tap_backbone(t) in backbones
    )
    outside = [t for t in taps if backbones and cfg.tap_backbone(t) not in backbones]
    if outside:
        raise click.BadParameter(
            f"tap {outside[0]!r} is not on the chosen backbone(s) {', '.join(backbones)}", param_hint="--tap"
        )
    overwrite = values.pop("overwrite", False)
    if not isinstance(overwrite, bool):
        raise PipelineError(f"overwrite {overwrite!r} must be true or false")
    return cfg.ExtractConfig(taps=taps, **values), overwrite


def _as_list(name, value):
    """A repeatable option's values: a tuple from the command line, a string or a list of strings from TOML."""
    items = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(item, str) for item in items):
        raise PipelineError(f"{name} {value!r} must be a string or a list of strings")
    return items


def _print_extract_summary(result, num_workers, worker_index):
    m = result.manifest
    if m is None:
        click.echo(
            f"job-array task {worker_index} of {num_workers}: {result.written} shards written into {result.out_dir}"
            f"{' (all done before)' if result.up_to_date else ''}; when every task has finished, rerun the same "
            "command without --num-workers/--worker-index to write the manifest"
        )
        return
    if result.up_to_date:
        click.echo(f"{result.out_dir} is up to date ({m['rows']} rows); nothing to do")
        return
    click.echo(
        f"extracted {m['rows']} rows, {len(m['errors'])} errors, into {result.out_dir} "
        f"({result.written} shards written, {result.skipped} already done)"
    )
    if result.counts:
        click.echo("update: " + ", ".join(f"{key} {value}" for key, value in result.counts.items()))
    for error in m["errors"][:10]:
        click.echo(f"  error: {error['id']}: {error['reason']}")
    if len(m["errors"]) > 10:
        click.echo(f"  ... {len(m['errors']) - 10} more in manifest.json")
    click.echo("taps: " + ", ".join(f"{t['key']} ({t['dim']})" for t in m["taps"]))
    p = m["precision"]
    click.echo(
        f"precision: {p['policy']}, xla {'on' if p['xla'] else 'off'}; "
        f"min cosine vs float32 {p['min_cosine_vs_float32']:.5f} on {p['rows_checked']} rows"
    )
    t = m["timing"]
    click.echo(f"time: {t['seconds']:.1f} s for {t['images']} images, {t['images_per_second']:.1f} images/s")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command(cls=TensorFlowCommand)
@click.option(
    "--backbone", multiple=True, type=click.Choice(cfg.BACKBONES), help="Only this backbone; repeat for several. Default: all."
)
@click.option(
    "--image-size",
    default=_EXTRACT.image_size,
    show_default=True,
    type=click.IntRange(cfg.MIN_IMAGE_SIZE, cfg.MAX_IMAGE_SIZE),
    help="Input side the shapes are given for.",
)
def taps(backbone, image_size):
    """List every tappable layer: name, output shape and stride."""
    from pipeline.backbones import build_backbone, tap_catalogue

    for name in backbone or cfg.BACKBONES:
        catalogue = tap_catalogue(name, build_backbone(name, image_size))
        width = max(len(info.key) for info in catalogue)
        click.echo(f"{name} at {image_size}x{image_size} ({len(catalogue)} taps; * = default)")
        for info in catalogue:
            mark = "*" if info.key in cfg.DEFAULT_TAPS else " "
            shape = f"{info.height}x{info.width}x{info.channels}"
            click.echo(f" {mark} {info.key.replace('/', ':'):<{width}}  {shape:>12}  stride {info.stride}")


@cli.command()
@click.argument("features", type=click.Path(exists=True, file_okay=False))
@click.option("--verify", is_flag=True, help="Re-read every shard and check it against the manifest; exit 1 on any problem.")
def inspect(features, verify):
    """Summarise a features directory (and optionally verify it)."""
    from pipeline import shards
    from pipeline.features import check_features

    m = shards.read_manifest(features)
    try:
        live = check_features(features)  # the manifest checked against its shards
    except PipelineError as e:
        if not verify:
            raise
        click.echo(f"problem: {e}", err=True)
        raise click.ClickException(f"1 problem(s) in {features}") from None
    c = m["config"]
    click.echo(
        f"{features}: {live.rows} rows in {len(m['shards'])} shards, {len(m['errors'])} errors, {m['listed']} images listed"
    )
    click.echo(f"source: {c['source']} ({len(live.classes)} classes)")
    click.echo(f"image: {c['image_size']} px, {c['resize']}; pooling {c['pooling']}; storage {c['storage_dtype']}")
    for key, dim in live.taps.items():
        click.echo(f"  tap {key}: {dim} dims")
    for name, w in m["weights"].items():
        click.echo(f"  weights {name}: {cfg.WeightSource.from_record(w['source'])} (sha256 {w['sha256'][:12]})")
    p = m["precision"]
    click.echo(f"precision: {p['policy']}, min cosine vs float32 {p['min_cosine_vs_float32']:.5f}")
    for device, count in shards.devices(features, m).items():
        click.echo(f"computed on {device or 'a device not recorded'}: {count} shard{'s' if count != 1 else ''}")
    _echo_generations(m)
    for error in m["errors"][:10]:
        click.echo(f"  error: {error['id']}: {error['reason']}")
    if verify:
        problems = shards.verify(features)
        for problem in problems:
            click.echo(f"problem: {problem}", err=True)
        if problems:
            raise click.ClickException(f"{len(problems)} problem(s) in {features}")
        click.echo(f"verified: {len(m['shards'])} shards, {m['rows']} rows, no problems")


def _echo_generations(m):
    """Shards by generation with their live and retired rows, then the history of updates."""
    by_generation = {}
    for entry in m["shards"]:
        shards_, live, retired = by_generation.get(entry.get("generation", 0), (0, 0, 0))
        by_generation[entry.get("generation", 0)] = (
            shards_ + 1,
            live + entry.get("live", entry["rows"]),
            retired + len(entry.get("retired", [])),
        )
    for generation, (count, live, retired) in sorted(by_generation.items()):
        click.echo(f"  generation {generation}: {count} shard{'s' * (count != 1)}, {live} live rows, {retired} retired")
    for h in m.get("history", [])[-5:]:
        counts = ", ".join(
            f"{key} {h.get(key, 0)}" for key in ("added", "changed", "removed", "restored", "relabeled", "computed")
        )
        click.echo(f"  update {h.get('generation')} at {h.get('time')}: {counts}")


@cli.command()
@click.argument("features", type=click.Path(exists=True, file_okay=False))
def compact(features):
    """Rewrite FEATURES so that no retired rows remain (atomically; live rows keep their feature bytes)."""
    from pipeline.extract import compact as run_compact

    result = run_compact(features)
    if not result.retired:
        click.echo(f"{features} has no retired rows; nothing to compact")
        return
    click.echo(
        f"compacted {features}: {result.rows} live rows kept, {result.retired} retired rows dropped, "
        f"{result.shards_before} -> {result.shards_after} shards"
    )


@cli.command(cls=TensorFlowCommand)
@click.option(
    "--out",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where features would go: its free space is reported.",
)
@click.option("--require-gpu", is_flag=True, help="Exit non-zero when TensorFlow sees no GPU (for a GPU node's job script).")
def doctor(out, require_gpu):
    """Check this machine for stage one: TensorFlow build, GPUs, precision and XLA choices, caches, space.

    Exits 1 when something a GPU run needs is missing (e.g. nvidia-smi lists a GPU that TensorFlow
    cannot see).
    """
    from pipeline.doctor import diagnose, failed

    findings = diagnose(out, require_gpu)
    width = max(len(finding.topic) for finding in findings)
    for finding in findings:
        click.echo(f"{finding.status:<4}  {finding.topic:<{width}}  {finding.value}")
        if finding.hint:
            click.echo(f"{'':<4}  {'':<{width}}  -> {finding.hint}")
    problems = failed(findings)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) for a GPU run: " + "; ".join(p.topic for p in problems))
    click.echo("no problems found")


# --- using a run: predict, export ---

_RUN_WEIGHTS_HELP = (
    "Load backbone weights from here instead of the recorded sources (imagenet, random, or "
    "BACKBONE=PATH,... for moved files); their fingerprints must still match."
)


@cli.command(cls=TensorFlowCommand, gpu_work=True)
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("source", type=click.Path(exists=True))
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="CSV to write: one row per listed image, sorted by id."
)
@click.option(
    "--batch-size", default=_EXTRACT.batch_size, show_default=True, type=click.IntRange(min=1), help="Images per forward pass."
)
@click.option(
    "--top-k",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most likely classes listed per image (at most the run's classes).",
)
@click.option(
    "--precision",
    default="float32",
    show_default=True,
    type=click.Choice(cfg.PRECISIONS),
    help="Compute policy of the backbones; float32 gives the probabilities of `pipeline export`.",
)
@click.option("--weights", help=_RUN_WEIGHTS_HELP)
def predict(run, source, out, **options):
    """Classify the images of SOURCE (a folder tree or a CSV) with the head of RUN into a CSV."""
    from pipeline.predict import predict as run_predict
    from pipeline.sources import list_source

    listing = list_source(source)
    for warning in listing.warnings:
        click.echo(f"warning: {warning}", err=True)
    total = len(listing.records)
    click.echo(f"predict: {total} images from {source} with {run} -> {out}", err=True)
    progress = Progress("predict")
    try:
        result = run_predict(run, listing, out, progress=progress, **options)
    finally:
        progress.close()
    click.echo(f"predicted {result.predicted} images, {len(result.errors)} errors, into {result.out}")
    for error in result.errors[:10]:
        click.echo(f"  error: {error['id']}: {error['reason']}")
    if len(result.errors) > 10:
        click.echo(f"  ... {len(result.errors) - 10} more in the CSV's error column")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.unknown_labels:
        names = ", ".join(f"{name} ({count})" for name, count in sorted(result.unknown_labels.items()))
        click.echo(f"labels the run does not know, left out of the accuracy: {names}")
    if result.labelled:
        click.echo(f"accuracy: {result.accuracy:.3f} on {result.labelled} labelled images")


@cli.command(cls=TensorFlowCommand)
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Where to write: a .keras file, or for saved_model a directory that receives OUT/VERSION/ (point TF Serving at OUT).",
)
@click.option(
    "--format",
    "format_",
    default="keras",
    show_default=True,
    type=click.Choice(cfg.EXPORT_FORMATS),
    help="keras: one .keras file; saved_model: a TensorFlow SavedModel whose signatures take encoded image bytes or uint8 pixels.",
)
@click.option(
    "--version", type=click.IntRange(min=1), help="saved_model only: the version directory to write under OUT. Default: 1."
)
@click.option(
    "--overwrite", is_flag=True, help="saved_model only: replace an existing OUT/VERSION/ (a .keras file is always replaced)."
)
@click.option(
    "--image-size",
    type=click.IntRange(min=32),
    help="Side the model resizes every image to. Default: the extraction's, the only one at which it agrees with predict.",
)
@click.option("--weights", help=_RUN_WEIGHTS_HELP)
def export(run, out, format_, **options):
    """Save RUN as one model: images of any size in, class probabilities and names out."""
    from pipeline.export import export as run_export

    result = run_export(run, out, format=format_, **options)
    inputs = (
        "encoded images (serving_default) or uint8 pixels (pixels)"
        if result.format == "saved_model"
        else "uint8 images (batch, height, width, 3)"
    )
    click.echo(
        f"exported {run} to {result.out}: {inputs} -> {result.resize} to {result.image_size} px -> taps -> "
        f"PCA ({result.components}) -> head -> {len(result.classes)} probabilities"
    )
    click.echo("classes: " + ", ".join(result.classes))
    if result.format == "saved_model":
        click.echo(
            f"load it with: tf.saved_model.load({str(result.out)!r}); or TF Serving with --model_base_path={result.out.parent.absolute()}"
        )
    else:
        click.echo(f"load it with: keras.saving.load_model({str(result.out)!r}); nothing from pipeline is needed")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command(cls=TensorFlowCommand, gpu_work=True)
@click.option(
    "--out",
    default="bench-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for bench.json and bench.md.",
)
@click.option(
    "--quick", is_flag=True, help="A few minutes: 64 px, 32 images, 1 run, tiny stage two; a smoke test, not a measurement."
)
@click.option("--image-size", type=click.IntRange(min=32), help="Model input side. Default: 224 (64 with --quick).")
@click.option(
    "--tap", "taps", multiple=True, help="BACKBONE:LAYER of stage one, as for extract; repeat. Default: extract's default taps."
)
@click.option(
    "--images",
    type=click.IntRange(min=1),
    help="Corpus images for the extract, decode and baseline stages. Default: 64 (32 with --quick).",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass. Default: 32 (16 with --quick).")
@click.option(
    "--repeats", type=click.IntRange(min=1), help="Timed runs per figure, after a warm-up. Default: 3 (1 with --quick)."
)
@click.option(
    "--data",
    envvar="BENCH_DATA",
    type=click.Path(exists=True),
    help="Your images (folder or CSV; the first --images) instead of the generated corpus. Env: BENCH_DATA.",
)
@click.option(
    "--weights",
    default="random",
    show_default=True,
    help="As for extract; speed does not depend on the values, the fidelity check does.",
)
@click.option("--skip", multiple=True, help=f"Stage not to run, repeat for several: {', '.join(BENCH_STAGES)}.")
@click.option(
    "--results",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A results page (e.g. pipeline/bench/RESULTS.md) whose table block, between its bench-table markers, gets this run's tables.",
)
def bench(out, quick, taps, data, weights, skip, results, **sizes):
    """Measure every stage against its bound and a tutorial-style baseline; write bench.json and bench.md."""
    from pipeline.bench.runner import BenchOptions, run_bench

    given = {name: value for name, value in sizes.items() if value is not None}  # unset: the mode's default
    if taps:
        given["taps"] = taps
    make = BenchOptions.quick if quick else BenchOptions
    options = make(out=Path(out), data=Path(data) if data else None, weights=weights, skip=tuple(skip), **given)
    from pipeline.bench.report import replace_results_table

    if results is not None:
        replace_results_table(results.read_text(), "")  # a page without the markers fails before the long run
    run_bench(options, log=lambda line: click.echo(f"bench: {line}", err=True))
    tables = (Path(out) / "bench.md").read_text()
    if results is not None:
        results.write_text(replace_results_table(results.read_text(), tables))
        click.echo(f"bench: wrote the tables into {results}", err=True)
    click.echo(tables, nl=False)


# --- stage two: reduce, train, runs ---


def _components(ctx, param, value):
    """--components: '256' keeps that many components, '0.95' that share of the variance."""
    text = str(value).strip()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    try:
        share = float(text)
    except ValueError:
        share = None
    if share is not None and 0 < share < 1:
        return share
    raise click.BadParameter(
        f"{value!r} is neither a number of components (1, 2, ...) nor a variance share strictly between 0 and 1"
    )


_REDUCE = cfg.ReduceConfig()
_HEAD = cfg.HeadConfig()
_PARALLEL = cfg.ParallelConfig()


def _engine_flags(engine_help):
    """--engine (with `engine_help`) and --ray-address, for the stage-two commands that can use Ray."""

    def add(command):
        command = click.option(
            "--ray-address",
            default=_PARALLEL.ray_address,
            help="With --engine ray: 'auto' or HOST:PORT of a running cluster. Default: start a local Ray.",
        )(command)
        return click.option(
            "--engine", default=_PARALLEL.engine, show_default=True, type=click.Choice(cfg.ENGINES), help=engine_help
        )(command)

    return add


@cli.command("reduce")
@click.argument("features", type=click.Path(file_okay=False))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Reduced directory to write: reduced.h5, transform.joblib, reduce.json, explained_variance.png.",
)
@click.option(
    "--tap", "taps", multiple=True, help="BACKBONE/LAYER of the manifest to use; repeat for several. Default: all of its taps."
)
@click.option(
    "--scaling",
    default=_REDUCE.scaling,
    show_default=True,
    type=click.Choice(cfg.SCALINGS),
    help="standard: every feature to unit variance; block: standard, then every tap to equal total variance; none: as stored.",
)
@click.option(
    "--components",
    default=str(_REDUCE.components),
    show_default=True,
    callback=_components,
    help="Components to keep (an integer), or the share of variance to keep (a number between 0 and 1).",
)
@click.option("--whiten", is_flag=True, help="Rescale every kept component to unit variance.")
@click.option(
    "--solver",
    default=_REDUCE.solver,
    show_default=True,
    type=click.Choice(cfg.SOLVERS),
    help="PCA solver; auto = full or randomized when the train rows fit in memory, else incremental (exact, streams the shards).",
)
@click.option(
    "--batch-rows",
    default=_REDUCE.batch_rows,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rows read at a time; bounds memory.",
)
@click.option(
    "--val-fraction",
    default=_REDUCE.val_fraction,
    show_default=True,
    type=float,
    help="Share of rows hashed to val, each by its id (rows whose source gave no split); a row keeps its split as images come and go.",
)
@click.option(
    "--test-fraction",
    default=_REDUCE.test_fraction,
    show_default=True,
    type=float,
    help="Share of rows hashed to test, each by its id (rows whose source gave no split).",
)
@click.option(
    "--split-seed",
    default=_REDUCE.split_seed,
    show_default=True,
    type=click.IntRange(min=0),
    help="Salt of the id hash that assigns splits.",
)
@click.option("--overwrite", is_flag=True, help="Replace a reduction with other settings in --out.")
@_engine_flags(
    "Where the incremental solver's per-shard sums are computed: here, or as Ray tasks (implies --solver incremental)."
)
def reduce(features, out, overwrite, engine, ray_address, **options):
    """Scale and PCA-reduce the cached taps of FEATURES, fitted on train rows only."""
    from pipeline.reduce import reduce_features

    parallel = cfg.ParallelConfig(engine=engine, ray_address=ray_address)
    result = reduce_features(features, out, cfg.ReduceConfig(**options), overwrite, parallel.engine, parallel.ray_address)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.up_to_date:
        click.echo(f"{out} is up to date (same features manifest and settings); nothing to do")
        return
    report = result.report
    rows, splits = report["splits"]["rows"], report["splits"]
    click.echo(
        f"reduced {report['rows']} rows of {len(report['taps'])} taps ({report['features']} features); "
        f"train {rows['train']}, val {rows['val']}, test {rows['test']} (splits from {splits['source']})"
    )
    click.echo(
        f"PCA ({report['solver']['chosen']}, scaling {report['config']['scaling']}): "
        f"{report['components']} components keep {report['kept_variance']:.1%} of the scaled variance"
    )
    width = max(len(t["key"]) for t in report["taps"])
    click.echo(f"  {'tap':<{width}}  {'dim':>5}  {'input':>6}  {'kept':>6}")
    for tap in report["taps"]:
        click.echo(f"  {tap['key']:<{width}}  {tap['dim']:>5}  {tap['input_share']:>6.1%}  {tap['kept_share']:>6.1%}")
    click.echo(f"wrote {out} in {report['seconds']:.1f} s")


@cli.command("train", cls=TensorFlowCommand, runs_here=lambda params: params["engine"] == "local" and params["jobs"] == 1)
@click.argument("reduced", type=click.Path(file_okay=False))
@click.option(
    "--runs",
    "runs_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Runs directory: one sub-directory per run, plus leaderboard.csv.",
)
@click.option(
    "--hidden",
    multiple=True,
    default=_HEAD.hidden,
    show_default=True,
    type=click.IntRange(min=1),
    help="Units of a hidden ReLU layer; repeat for more layers, input side first.",
)
@click.option(
    "--dropout",
    default=_HEAD.dropout,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Dropout rate after every hidden layer.",
)
@click.option("--l2", default=_HEAD.l2, show_default=True, type=click.FloatRange(min=0), help="L2 penalty on every Dense kernel.")
@click.option(
    "--lr", default=_HEAD.lr, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Adam learning rate."
)
@click.option(
    "--batch-size", default=_HEAD.batch_size, show_default=True, type=click.IntRange(min=1), help="Rows per gradient step."
)
@click.option(
    "--epochs",
    default=_HEAD.epochs,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most epochs; early stopping on val loss usually ends sooner.",
)
@click.option(
    "--patience",
    default=_HEAD.patience,
    show_default=True,
    type=click.IntRange(min=1),
    help="Epochs without a val-loss improvement before stopping.",
)
@click.option(
    "--label-smoothing",
    default=_HEAD.label_smoothing,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Share of target mass spread over all classes.",
)
@click.option(
    "--class-weight",
    default=_HEAD.class_weight,
    show_default=True,
    type=click.Choice(cfg.CLASS_WEIGHTS),
    help="balanced weights each class inversely to its train rows.",
)
@click.option(
    "--seed",
    default=_HEAD.seed,
    show_default=True,
    type=click.IntRange(min=0),
    help="Seeds weight init, dropout and shuffling; a rerun gives the same metrics.",
)
@click.option("--name", help="Run id instead of one made from the config; with --sweep, a prefix of every run id.")
@click.option(
    "--sweep",
    type=click.Path(exists=True, dir_okay=False),
    help="TOML file with a [base] table of head options and a [grid] table of lists; every combination is a run. Options given here override [base].",
)
@click.option(
    "--jobs",
    default=_PARALLEL.jobs,
    show_default=True,
    type=click.IntRange(min=1),
    help="Runs (with --stack: stacks of runs) trained at once, each in its own worker process with cores/jobs threads (1: one after another, here).",
)
@click.option(
    "--stack/--no-stack",
    default=True,
    show_default=True,
    help="Train heads of one shape (hidden sizes, batch size) together as one program; --no-stack fits each alone with Keras.",
)
@click.option(
    "--max-stack",
    type=click.IntRange(min=1),
    help="Most heads in one stack. Default: as many as fit in a quarter of the free memory, at most 64.",
)
@_engine_flags("Where the runs train: on this machine (see --jobs), or on a Ray cluster (--jobs runs at once).")
@click.pass_context
def train_heads(ctx, reduced, runs_dir, name, sweep, jobs, stack, max_stack, engine, ray_address, **options):
    """Train Keras heads on REDUCED into RUNS, after a logistic-regression baseline; update the leaderboard."""
    from pipeline.train import sweep_configs, train

    parallel = cfg.ParallelConfig(engine=engine, jobs=jobs, ray_address=ray_address)
    if sweep:
        given = {key: value for key, value in options.items() if ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE}
        configs = sweep_configs(sweep, given)
    else:
        configs = [cfg.HeadConfig(**options)]
    outcomes = train(
        reduced, runs_dir, configs, name, parallel, lambda w: click.echo(f"warning: {w}", err=True), stack, max_stack
    )
    heads, finished = len(configs), 0
    for outcome in outcomes:
        finished += outcome.kind == "head"
        click.echo(f"{_outcome_line(outcome)} [{finished}/{heads} heads]" if outcome.kind == "head" else _outcome_line(outcome))
    click.echo(f"leaderboard: {os.path.join(runs_dir, 'leaderboard.csv')} (`pipeline runs {runs_dir}` prints it)")


def _outcome_line(outcome):
    if outcome.done_before:
        return f"{outcome.run_id}: already done"
    metrics = outcome.metrics
    test = f"{metrics['test']['accuracy']:.4f}" if metrics["test"] else "-"
    line = f"{outcome.run_id}: val accuracy {metrics['val']['accuracy']:.4f}, test accuracy {test}"
    if outcome.kind == "baseline":
        return f"{line} (linear probe, {metrics['seconds']:.1f} s)"
    return f"{line}, {metrics['epochs']} epochs (best {metrics['best_epoch']}), {metrics['seconds']:.1f} s"


_TABLE_COLUMNS = (
    "run_id",
    "kind",
    "val_accuracy",
    "test_accuracy",
    "val_macro_f1",
    "test_macro_f1",
    "val_log_loss",
    "epochs",
    "seconds",
    "reduced",
)


@cli.command("runs")
@click.argument("runs_dir", metavar="RUNS", type=click.Path(file_okay=False))
@click.option(
    "--sort",
    default="val_accuracy",
    show_default=True,
    help="Leaderboard column to rank by; accuracy and F1 highest first, anything else lowest first.",
)
@click.option("--top", default=20, show_default=True, type=click.IntRange(min=1), help="Rows to show.")
def runs(runs_dir, sort, top):
    """Print the leaderboard of RUNS as a table, best first; the linear-probe baseline is marked."""
    from pipeline.leaderboard import METRIC_COLUMNS, leaderboard, sort_rows

    rows, warnings = leaderboard(runs_dir)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    rows = sort_rows(rows, sort)
    columns = _TABLE_COLUMNS if sort in _TABLE_COLUMNS else (*_TABLE_COLUMNS, sort)
    cells = [[_cell(column, row[column], METRIC_COLUMNS) for column in columns] for row in rows[:top]]
    widths = [max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]
    click.echo("  ".join(column.ljust(width) for column, width in zip(columns, widths)).rstrip())
    for line in cells:
        click.echo("  ".join(_align(value, width) for value, width in zip(line, widths)).rstrip())
    if len(rows) > top:
        click.echo(f"({len(rows) - top} more; raise --top to see them)")


def _cell(column, value, metric_columns):
    if column == "kind" and value == "baseline":
        return "*baseline*"
    if column in metric_columns and value:
        return f"{float(value):.4f}"
    return value


def _align(value, width):
    """Numbers right-aligned, text left-aligned."""
    try:
        float(value)
    except ValueError:
        return value.ljust(width)
    return value.rjust(width)


# --- which taps carry the signal: probe ---


@cli.command("probe")
@click.argument("source", metavar="REDUCED_OR_FEATURES", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for probe.json and probe.png (created if needed; both are replaced).",
)
@click.option(
    "--tap",
    "taps",
    multiple=True,
    help="BACKBONE/LAYER of the manifest to probe; repeat for several. Default: the reduced dir's taps, or all of the manifest's.",
)
@click.option(
    "--scaling", type=click.Choice(cfg.SCALINGS), help=f"As for reduce. Default: the reduced dir's, or {_REDUCE.scaling}."
)
@click.option(
    "--components",
    type=click.IntRange(min=1),
    help=f"PCA components of every group (at most its dims and the train rows). Default: the reduced dir's, or {_REDUCE.components}.",
)
@click.option(
    "--whiten/--no-whiten",
    default=None,
    help="Rescale every kept component to unit variance. Default: as the reduced dir, or off.",
)
@click.option(
    "--batch-rows",
    type=click.IntRange(min=1),
    help=f"Rows read at a time; bounds memory. Default: the reduced dir's, or {_REDUCE.batch_rows}.",
)
@click.option(
    "--val-fraction",
    default=_REDUCE.val_fraction,
    show_default=True,
    type=float,
    help="Features dir only (a reduced dir keeps its split): share of rows hashed to val, as reduce.",
)
@click.option(
    "--test-fraction",
    default=_REDUCE.test_fraction,
    show_default=True,
    type=float,
    help="Features dir only: share of rows hashed to test, as reduce.",
)
@click.option(
    "--split-seed",
    default=_REDUCE.split_seed,
    show_default=True,
    type=click.IntRange(min=0),
    help="Features dir only: salt of the id hash that assigns splits, as reduce.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    help="Groups fitted at once, BLAS threads per job capped at cores / jobs. Default: one per core (one BLAS thread each).",
)
@click.pass_context
def probe(ctx, source, out, jobs, **options):
    """Fit the logistic-regression probe on each tap, each backbone and all taps of REDUCED_OR_FEATURES; rank them."""
    from pipeline.probe import CHART_NAME, PROBE_NAME, ranked
    from pipeline.probe import probe as run_probe

    report = run_probe(source, out, jobs=jobs, **given_options(ctx, options)).report
    splits, settings = report["splits"], report["settings"]
    rows = splits["rows"]
    click.echo(
        f"probed {len(settings['taps'])} taps of {report['inputs']['kind']} dir {source}: train {rows['train']}, "
        f"val {rows['val']}, test {rows['test']} labelled rows (split sha256 {splits['sha256'][:12]}); "
        f"scaling {settings['scaling']}, up to {settings['components']} components"
    )
    header = ("group", "kind", "dims", "pca", "val acc", "test acc", "val F1", "test F1", "val loss", "seconds")
    lines = [header]
    for entry in ranked(report["groups"]):
        val, test = entry["val"], entry["test"]
        lines.append(
            (
                entry["name"],
                entry["kind"],
                str(entry["input_dims"]),
                str(entry["components"]),
                f"{val['accuracy']:.4f}",
                f"{test['accuracy']:.4f}" if test else "-",
                f"{val['macro_f1']:.4f}",
                f"{test['macro_f1']:.4f}" if test else "-",
                f"{val['log_loss']:.4f}",
                f"{entry['seconds']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        click.echo(
            "  ".join(value.ljust(w) if i < 2 else value.rjust(w) for i, (value, w) in enumerate(zip(line, widths))).rstrip()
        )
    click.echo(f"wrote {os.path.join(out, PROBE_NAME)} and {os.path.join(out, CHART_NAME)} in {report['seconds']:.1f} s")
