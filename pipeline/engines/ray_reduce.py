"""`reduce --engine ray`: the incremental solver's per-shard passes as Ray tasks, one per shard.

The tasks run the same functions as the local loop (reduce.shard_moments, reduce.shard_grams),
and the driver adds their sums in shard order, so the result equals the local one up to the
order of float64 additions. Each task reads its shard itself: the workers must see the features
directory at the same path (this machine, or a shared filesystem).
"""

import collections
import contextlib

from pipeline.engines.ray_cluster import connected
from pipeline.errors import PipelineError


@contextlib.contextmanager
def ray_map(address=None):
    """Yield a `map(function, *iterables)` that runs every call as a Ray task and yields the results in order.

    All calls are submitted at once; each result is fetched, and released, in turn.
    """
    with connected(address) as ray:

        def run(function, *iterables):
            remote = ray.remote(function)
            pending = collections.deque(remote.remote(*args) for args in zip(*iterables))
            while pending:
                try:
                    yield ray.get(pending.popleft())
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, PipelineError):  # a damaged shard: the sentence, not the remote traceback
                        raise PipelineError(str(e.cause)) from None
                    raise

        yield run
