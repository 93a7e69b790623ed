"""`reduce --engine ray`: the incremental solver's per-shard passes as Ray tasks, one per shard.

The tasks run the same functions as the local loop (reduce.shard_moments, reduce.shard_grams),
and the driver adds their sums in shard order, so the result equals the local one up to the
order of float64 additions. Each task reads its shard itself: the workers must see the features
directory at the same path (this machine, or a shared filesystem).
"""

import collections
import contextlib
import itertools

from pipeline.engines.ray_cluster import HeadWatch, connected
from pipeline.errors import worker_error

TASKS_PER_CPU = 2  # tasks in flight per cluster CPU: enough to keep every CPU busy while the driver fetches
POLL_SECONDS = 2.0  # how often a wait for a result looks whether the cluster's head still answers


@contextlib.contextmanager
def ray_map(address=None, in_flight=None):
    """Yield a `map(function, *iterables)` that runs every call as a Ray task and yields the results in order.

    At most `in_flight` calls (default: TASKS_PER_CPU x the cluster's CPUs) are submitted or
    waiting to be fetched at any time: a second-pass result is a features x features float64
    matrix (128 MB at 4,096 features), so submitting every shard at once would hold them all in
    the object store. Results are fetched, and released, in call order, and a new call is
    submitted for each one fetched; a result that finishes early waits in the store for the
    ones before it, within that bound.
    """
    with connected(address) as ray:
        limit = in_flight or max(1, TASKS_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
        head = HeadWatch(ray)

        def run(function, *iterables):
            remote = ray.remote(function)
            calls = zip(*iterables)
            pending = collections.deque(remote.remote(*args) for args in itertools.islice(calls, limit))
            while pending:
                while not ray.wait([pending[0]], timeout=POLL_SECONDS)[0]:
                    head.check()  # a lost head: one sentence, not Ray's minute of retries
                try:
                    result = ray.get(pending.popleft())
                except ray.exceptions.RayTaskError as e:
                    raise worker_error(e) from None  # a damaged shard: the sentence, not the remote traceback
                pending.extend(remote.remote(*args) for args in itertools.islice(calls, 1))  # keep the window full
                yield result
                del result  # released before the next fetch, not held across it

        yield run
