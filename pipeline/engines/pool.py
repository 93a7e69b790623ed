"""Independent stage-two tasks run at once through joblib: in this process, in loky worker processes, or on Ray.

A task is a module-level function with picklable arguments. Each worker process caps its
TensorFlow and BLAS threads so that jobs x threads stays within the cores it may use (this
machine's, or the CPUs Ray reserves for each worker). The thread caps of every command are
decided here (`cores`, `worker_threads`, `tensorflow_thread_env`, `limit_threads`). A PipelineError in a task comes back as
its sentence, whatever the backend, so the user never sees a remote traceback for it.
"""

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass

from pipeline.config import ParallelConfig
from pipeline.errors import PipelineError


def cores():
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_threads(jobs, cpus):
    """Threads per worker so that `jobs` workers fit in `cpus` (at least one each)."""
    return max(1, cpus // jobs)


def tensorflow_thread_env(threads):
    """The environment that sizes TensorFlow's thread pools to `threads` in a process that has not run an op yet."""
    return {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": str(threads)}


def limit_threads(threads):
    """Cap this process's BLAS and TensorFlow threads; TensorFlow reads its cap when it first runs an op."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    os.environ.update(tensorflow_thread_env(threads))
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        with contextlib.suppress(RuntimeError):  # TensorFlow already ran in this reused worker, capped by an earlier task
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)


@dataclass(frozen=True)
class _Failed:
    message: str


ORPHAN_POLL_SECONDS = 0.1  # how often a loky worker looks whether the command that started it is still alive
_parent = None  # in a loky worker: the pid of the command it works for, once the watch has started


def die_with(parent):
    """In a worker process: exit at once (within ORPHAN_POLL_SECONDS) when `parent`, the command, is no longer our parent.

    However the command ends (even `kill -9`, which runs no cleanup), loky's workers would finish
    their task and publish it; this watch, started by a worker's first task, ends them instead.
    """
    global _parent
    if _parent is not None:
        return
    _parent = parent
    exit_if_orphaned()
    threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()


def _watch_parent():
    while True:
        exit_if_orphaned()
        time.sleep(ORPHAN_POLL_SECONDS)


def exit_if_orphaned():
    """End this worker process now if the command it works for has died (its temp files are left for the next run to remove).

    Called once more right before anything is published, so that nothing appears after the command was killed.
    """
    if _parent is not None and os.getppid() != _parent:
        os._exit(1)


def _call(function, threads, args, parent=None):
    """Run one task in a worker; a PipelineError becomes a value, so any backend returns it intact."""
    if parent is not None:
        die_with(parent)
    if threads is not None:
        limit_threads(threads)
    try:
        return function(*args)
    except PipelineError as e:
        return _Failed(str(e))


def _raising(results):
    for result in results:
        if isinstance(result, _Failed):
            raise PipelineError(result.message)
        yield result


@contextlib.contextmanager
def task_runner(parallel: ParallelConfig):
    """Yield `run(function, tasks)`, an iterator of function(*task) for every task.

    jobs=1 on the local engine runs the tasks here, in order, one at a time. More jobs run them in
    loky processes and yield each result as it finishes. On Ray (joblib's Ray backend, connected
    through ray_cluster) the results come back together when the last task ends.
    """
    from joblib import Parallel, delayed

    if parallel.engine == "ray":
        from pipeline.engines.ray_cluster import connected

        with connected(parallel.ray_address) as ray:
            from ray.util.joblib import register_ray

            register_ray()
            threads = worker_threads(parallel.jobs, int(ray.cluster_resources().get("CPU", 1)))
            # max_nbytes=None: no memmapped arguments, which workers on other machines could not open
            pool = Parallel(
                n_jobs=parallel.jobs, backend="ray", ray_remote_args={"num_cpus": threads}, max_nbytes=None, batch_size=1
            )
            yield lambda function, tasks: _raising(pool(delayed(_call)(function, threads, task) for task in tasks))
    elif parallel.jobs == 1:
        yield lambda function, tasks: _raising(_call(function, None, task) for task in tasks)
    else:
        threads = worker_threads(parallel.jobs, cores())
        pool = Parallel(n_jobs=parallel.jobs, backend="loky", return_as="generator_unordered", batch_size=1)
        yield lambda function, tasks: _raising(pool(delayed(_call)(function, threads, task, os.getpid()) for task in tasks))
