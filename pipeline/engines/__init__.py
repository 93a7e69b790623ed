"""Where stage one's shards are computed: in this process, on a Ray cluster, or as a job-array task.

Whatever runs a shard builds a `worker.ShardWorker` and writes the same bytes through the same
writer; only the driver (or a plain rerun) writes the manifest, last.
"""

ENGINES = ("local", "ray")


def make_engine(name, **options):
    """The engine called `name` (one of ENGINES); Ray is imported only when asked for."""
    if name == "local":
        from pipeline.engines.local import LocalEngine

        return LocalEngine(**options)
    if name == "ray":
        from pipeline.engines.ray import RayEngine

        return RayEngine(**options)
    raise ValueError(f"unknown engine {name!r}")
