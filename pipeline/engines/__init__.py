"""Where stage one's shards are computed: in this process, on a Ray cluster, or as a job-array task.

Whatever runs a shard builds a `worker.ShardWorker` and writes the same bytes through the same
writer; only the driver (or a plain rerun) writes the manifest, last. An engine has
`start(config)` (returns an object with the resolved `.config`, `.weights` and `.taps`),
`run(jobs, run_identity, out_dir, progress)` and `close()`. This module does not import
TensorFlow, so a driver that hands shards to Ray never loads it.
"""

from dataclasses import dataclass

from pipeline.sources import ImageRecord

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ShardJob:
    """One shard to compute: its index and the listed images it covers, in id order."""

    index: int
    records: tuple[ImageRecord, ...]


@dataclass(frozen=True)
class RunIdentity:
    """What every shard of a run records about the run (the shard attrs besides its own data)."""

    config_sha256: str  # names the feature settings (not the listed images)
    config: dict  # the resolved config plus source
    weights: dict  # backbone -> {source, sha256}
    taps: list  # tap entries as the manifest lists them
    generation: int = 0  # the directory's generation the shards are written for
    classes: tuple | None = None  # the class names the shards' labels index into


def make_engine(name, **options):
    """The engine called `name` (one of ENGINES); Ray is imported only when asked for."""
    if name == "local":
        from pipeline.engines.local import LocalEngine

        return LocalEngine(**options)
    if name == "ray":
        from pipeline.engines.ray import RayEngine

        return RayEngine(**options)
    raise ValueError(f"unknown engine {name!r}")
