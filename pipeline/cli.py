"""The `pipeline` command line: flags become config objects, results become printed lines.

This is the only module that talks to the user. Heavy imports (TensorFlow) happen inside the
commands so that `pipeline --help` stays fast.
"""

import click

from pipeline.errors import PipelineError


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
