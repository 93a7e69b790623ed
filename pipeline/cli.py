"""The `pipeline` command line: flags become config objects, results become printed lines.

This is the only module that talks to the user. Heavy imports (TensorFlow) happen inside the
commands so that `pipeline --help` stays fast.
"""

import os
import sys
import time

import click
from click.core import ParameterSource

from pipeline import config as cfg
from pipeline.errors import PipelineError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ info logs off the user's screen


class PipelineGroup(click.Group):
    """Turns a PipelineError from any command into one `Error: ...` line and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def cli():
    """Extract frozen CNN features once, then reduce and train many small heads on them."""


def main():
    cli(prog_name="pipeline")


@cli.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False, writable=True))
@click.option("--size", default=64, show_default=True, type=click.IntRange(8, 1024), help="Side of the written PNGs in pixels.")
def demo_data(out, size):
    """Write the demo set (scikit-learn's digits) as PNGs under OUT/<digit>/."""
    from pipeline.demo import write_digits

    count = write_digits(out, size)
    click.echo(f"wrote {count} digit images ({size}x{size} PNG) to {out}")



def apply_config_file(ctx, path, allowed):
    """Fill options left at their defaults from a TOML file; flags given on the command line win."""
    values = cfg.load_toml(path, allowed)
    params = {p.name: p for p in ctx.command.params}
    for key, value in values.items():
        if ctx.get_parameter_source(key) is ParameterSource.DEFAULT:
            ctx.params[key] = params[key].type_cast_value(ctx, value)
    return ctx.params


class Progress:
    """A tqdm bar on a terminal; a plain line every `interval` seconds otherwise."""

    def __init__(self, total, label, interval=10.0):
        self.total, self.label, self.interval = total, label, interval
        self.done, self.started, self.last = 0, time.monotonic(), time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=label, dynamic_ncols=True)

    def __call__(self, n):
        if not n:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            click.echo(f"{self.label}: {self.done}/{self.total} images, {rate:.1f} images/s, ETA {eta:.0f} s", err=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


EXTRACT_KEYS = (
    "backbone", "tap", "pooling", "image_size", "resize", "batch_size", "precision", "xla",
    "weights", "seed", "shard_size", "storage_dtype", "on_error", "overwrite",
)


@cli.command()
@click.argument("source", type=click.Path(exists=True, path_type=str))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Features directory to write (shards + manifest.json).")
@click.option("--backbone", multiple=True, type=click.Choice(cfg.BACKBONES), help="Backbone to run; repeat for several. Default: both, or those of --tap.")
@click.option("--tap", multiple=True, help="BACKBONE:LAYER to pool and store; repeat. Default: conv4/conv5 of ResNet50, block4/5_conv3 of VGG16.")
@click.option("--pooling", default="avg", show_default=True, type=click.Choice(cfg.POOLINGS), help="Global pooling of each tap (avgmax concatenates both).")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=32), help="Square input side in pixels.")
@click.option("--resize", default="squash", show_default=True, type=click.Choice(cfg.RESIZES), help="Squash the whole image, or center-crop to square first.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(cfg.PRECISIONS), help="Compute policy; auto = mixed_float16 on GPU, mixed_bfloat16 on bf16 CPUs, else float32.")
@click.option("--xla/--no-xla", default=None, help="XLA-compile the forward pass. Default: on with a GPU.")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet, random (seeded), or resnet50=PATH,vgg16=PATH.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for --weights random.")
@click.option("--shard-size", default=4096, show_default=True, type=click.IntRange(min=1), help="Listed images per HDF5 shard.")
@click.option("--storage-dtype", default="float32", show_default=True, type=click.Choice(cfg.STORAGE_DTYPES), help="Dtype of the stored features.")
@click.option("--on-error", default="skip", show_default=True, type=click.Choice(cfg.ON_ERROR), help="An undecodable image: record it and go on, or stop.")
@click.option("--overwrite", is_flag=True, help="Replace features of a different configuration in --out.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML file with the same keys as these flags; flags win.")
@click.pass_context
def extract(ctx, source, out, config_file, **options):
    """Run the frozen backbone taps over SOURCE (a folder tree or a CSV) into HDF5 shards."""
    if config_file:
        options = {k: v for k, v in apply_config_file(ctx, config_file, EXTRACT_KEYS).items() if k in EXTRACT_KEYS}
    backbones = tuple(options.pop("backbone"))
    taps = tuple(cfg.parse_tap(t) for t in options.pop("tap")) or tuple(
        t for t in cfg.DEFAULT_TAPS if not backbones or cfg.tap_backbone(t) in backbones
    )
    outside = [t for t in taps if backbones and cfg.tap_backbone(t) not in backbones]
    if outside:
        raise click.BadParameter(f"tap {outside[0]!r} is not on the chosen backbone(s) {', '.join(backbones)}", param_hint="--tap")
    overwrite = options.pop("overwrite")
    config = cfg.ExtractConfig(taps=taps, **options)

    from pipeline.extract import extract as run_extract
    from pipeline.sources import list_source

    total = len(list_source(source).records)
    click.echo(f"extract: {total} images from {source} -> {out}", err=True)
    progress = Progress(total, "extract")
    try:
        result = run_extract(config, source, out, overwrite=overwrite, progress=progress)
    finally:
        progress.close()
    _print_extract_summary(result)


def _print_extract_summary(result):
    m = result.manifest
    if result.written == 0:
        click.echo(f"{result.out_dir} is up to date ({m['rows']} rows); nothing to do")
        return
    click.echo(
        f"extracted {m['rows']} rows, {len(m['errors'])} errors, into {result.out_dir} "
        f"({result.written} shards written, {result.skipped} already done)"
    )
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


@cli.command()
@click.option("--backbone", multiple=True, type=click.Choice(cfg.BACKBONES), help="Only this backbone; repeat for several. Default: all.")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=32), help="Input side the shapes are given for.")
def taps(backbone, image_size):
    """List every tappable layer: name, output shape and stride."""
    from pipeline.backbones import tap_catalogue

    for name in backbone or cfg.BACKBONES:
        catalogue = tap_catalogue(name, image_size)
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

    m = shards.read_manifest(features)
    c = m["config"]
    click.echo(f"{features}: {m['rows']} rows in {len(m['shards'])} shards, {len(m['errors'])} errors, {m['listed']} images listed")
    click.echo(f"source: {c['source']} ({len(m['classes'])} classes)")
    click.echo(f"image: {c['image_size']} px, {c['resize']}; pooling {c['pooling']}; storage {c['storage_dtype']}")
    for tap in m["taps"]:
        click.echo(f"  tap {tap['key']}: {tap['dim']} dims")
    for name, w in m["weights"].items():
        click.echo(f"  weights {name}: {w['source']} (sha256 {w['sha256'][:12]})")
    p = m["precision"]
    click.echo(f"precision: {p['policy']}, min cosine vs float32 {p['min_cosine_vs_float32']:.5f}")
    for error in m["errors"][:10]:
        click.echo(f"  error: {error['id']}: {error['reason']}")
    if verify:
        problems = shards.verify(features)
        for problem in problems:
            click.echo(f"problem: {problem}", err=True)
        if problems:
            raise click.ClickException(f"{len(problems)} problem(s) in {features}")
        click.echo(f"verified: {len(m['shards'])} shards, {m['rows']} rows, no problems")

# --- stage two: reduce, train, runs ---
