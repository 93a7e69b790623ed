"""Where work runs in parallel: stage one's shards (this module's engines) and stage two's tasks.

Stage one: whatever runs a shard builds a `worker.ShardWorker` and writes it through the same
writer (the same features up to FEATURE_RTOL); only the driver (or a plain rerun) writes the
manifest, last. An engine (config.ENGINES) has `start(config)` (returns an object with the
resolved `.config`, `.weights` and `.taps`), `run(tasks, run_identity, out_dir, progress)` and
`close()`. This module does not import TensorFlow, so a driver that hands shards to Ray never loads it.

Stage two: `pool` runs train's runs at once (joblib: here, loky processes or Ray), and
`ray_reduce` runs reduce's per-shard sums as Ray tasks; `ray_cluster` connects to Ray for both stages.
"""

from dataclasses import dataclass

import numpy as np

from pipeline.config import ENGINES
from pipeline.sources import ImageRecord

# How far two computations of one shard's features may differ when only the thread count, the
# engine or the CPU kind differs (same configuration and software): every value within this
# share of the tap's largest absolute value in the shard. oneDNN splits some convolutions by
# thread count and cache size and picks kernels by instruction set, so float32 sums may come out
# in another order: 2e-7 to 6.5e-7 seen between 1 and 2 threads on an AVX2-only EPYC, 1.4e-7
# between AVX2 and AVX-512 kernels here. The same CPU kind with the same thread count gives the same bytes.
FEATURE_RTOL = 1e-5


@dataclass(frozen=True)
class ShardTask:
    """One shard for an engine to compute: its index and the listed images it covers, in id order."""

    index: int
    records: tuple[ImageRecord, ...]


@dataclass(frozen=True)
class RunIdentity:
    """What every shard of a run records about the run (the shard attrs besides its own data)."""

    config_sha256: str
    config: dict  # the resolved config plus source and source_sha256
    weights: dict[str, dict]  # backbone -> {source, sha256}
    taps: list[dict]  # tap entries as the manifest lists them


def make_engine(name, **options):
    """The engine called `name` (one of config.ENGINES); Ray is imported only when asked for."""
    if name == "local":
        from pipeline.engines.local import LocalEngine

        return LocalEngine(**options)
    if name == "ray":
        from pipeline.engines.ray import RayEngine

        return RayEngine(**options)
    raise ValueError(f"unknown engine {name!r}; the engines are {', '.join(ENGINES)}")


def features_agree(ours, reference, rtol=FEATURE_RTOL):
    """Whether one tap's feature arrays of a shard are the same up to FEATURE_RTOL (exact for equal bytes)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        return False
    scale = np.abs(reference).max(initial=0.0)
    return bool(np.all(np.abs(ours - reference) <= rtol * scale))
