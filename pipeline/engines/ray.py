"""The Ray engine: pending shards handed to a pool of Ray actors, one ShardWorker each.

Each actor builds the fused tap model once (TensorFlow is imported inside the actor, after Ray
has given the process its CPUs and GPU) and then computes whole shards, writing them straight
into the output directory through the same writer as the local engine, so the bytes are the
same. On a cluster that directory and the images must be on a filesystem every node mounts at
the same path. The driver (this process) never imports TensorFlow: it plans, shows progress,
turns a worker's PipelineError into the same one sentence, and redoes the shard of a worker
that died on another worker (Ray restarts the dead one, which rebuilds its model).
"""

import collections
import contextlib
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import shards
from pipeline.config import ExtractConfig
from pipeline.engines import ray_cluster
from pipeline.engines.pool import tensorflow_thread_env
from pipeline.errors import PipelineError, first_line, worker_error

MAX_ATTEMPTS = 3  # a shard whose worker dies this many times stops the run (a crashing image, too little memory)
REVIVE_SECONDS = 300  # how long the run waits for Ray to restart a worker when none is alive
VISIBLE_SECONDS = 60  # how long a finished shard may take to show up on the driver (NFS attribute caching)
_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class WorkerPlan:
    """The actors to start: each one's node (an index into the planned nodes, or None: wherever Ray fits it) and CPUs; GPUs each."""

    actors: tuple  # ((node index or None, CPUs), ...)
    gpus: float

    @property
    def workers(self):
        return len(self.actors)

    @property
    def cpus(self):
        """The CPUs of the smallest actor (all have the same unless planned node by node)."""
        return min(cpus for _, cpus in self.actors)


def plan_workers(nodes, workers=None, cpus_per_worker=None, gpus_per_worker=None):
    """The WorkerPlan for alive Ray `nodes`, given as (CPUs, GPUs) pairs; None means the default.

    GPUs: one worker per `gpus_per_worker` (default 1 when any node has a GPU, else 0: CPU
    workers). By default the plan goes node by node: a GPU node gets as many workers as its GPUs
    allow, sharing its CPUs (decoding needs them); a CPU node gets one worker with all its CPUs
    (each worker already uses every core it gets and holds its own model). With `workers` or
    `cpus_per_worker` given, every worker gets the same CPUs: the given ones, or the most that
    let `workers` fit. Every worker must fit on a node as the cluster is now.
    """
    gpus = gpus_per_worker if gpus_per_worker is not None else (1 if any(g > 0 for _, g in nodes) else 0)
    if gpus > 0 and not any(g > 0 for _, g in nodes):
        raise PipelineError(
            f"--gpus-per-worker {gpus:g} needs GPUs, but the Ray cluster has none; pass --gpus-per-worker 0 for CPU workers"
        )
    # (node index, CPUs, worker slots the GPUs allow; None = unlimited) of each node a worker can use
    usable = [(i, int(c), math.floor(g / gpus + 1e-9) if gpus else None) for i, (c, g) in enumerate(nodes) if c >= 1]
    usable = [(i, c, slots) for i, c, slots in usable if slots != 0]
    if not usable:
        raise PipelineError(
            f"--gpus-per-worker {gpus:g} is more than any Ray node has (at most {max(g for _, g in nodes):g} GPUs)"
        )
    if workers is None and cpus_per_worker is None:
        actors = []
        for index, c, slots in usable:
            count = 1 if slots is None else min(slots, c)
            actors += [(index, c // count)] * count
        return WorkerPlan(tuple(actors), gpus)

    def fit(cpus):
        return sum(c // cpus if slots is None else min(slots, c // cpus) for _, c, slots in usable)

    most = max(c for _, c, _ in usable)
    cpus = cpus_per_worker
    if cpus is None:
        cpus = next((n for n in range(most, 0, -1) if fit(n) >= workers), 1)
    if cpus > most:
        raise PipelineError(f"--cpus-per-worker {cpus} is more than any Ray node has (at most {most} CPUs)")
    workers = workers or fit(cpus)
    if fit(cpus) < workers:
        each = f"{cpus} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
        raise PipelineError(
            f"--workers {workers} with {each} each do not fit in the Ray cluster ({fit(cpus)} fit on its "
            f"{len(nodes)} node(s)); lower --workers or --cpus-per-worker"
        )
    return WorkerPlan(((None, cpus),) * workers, gpus)


def actor_options(plan, node_ids):
    """The Ray options of each planned actor; `node_ids` are the planned nodes' Ray node ids.

    An actor planned for a node prefers it (a soft affinity, so that Ray can restart it on
    another node if that one goes away); its TensorFlow pools are sized to its own CPUs.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options = []
    for node, cpus in plan.actors:
        env = {
            **tensorflow_thread_env(cpus),  # TensorFlow's pools sized to the CPUs Ray gave, not the node's
            "HDF5_USE_FILE_LOCKING": os.environ.get("HDF5_USE_FILE_LOCKING", "FALSE"),  # as h5py advises on NFS
        }
        if not plan.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker on a GPU node stays off the GPUs
        option = {
            "num_cpus": cpus,
            "num_gpus": plan.gpus,
            "max_restarts": -1,
            "max_task_retries": 0,
            "runtime_env": {"env_vars": env},
        }
        if node is not None:
            option["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_ids[node], soft=True)
        options.append(option)
    return options


@dataclass(frozen=True)
class WorkerSummary:
    """What one actor's model resolved to (the driver's `.config`, `.weights`, `.taps`), and where it runs."""

    config: ExtractConfig
    weights: dict
    taps: list
    host: str
    device: dict | None = None  # what computes (backbones.device_record); None where unknown


def disagreement(summaries):
    """One sentence on how the workers' models differ, or None when they all agree."""
    first = summaries[0]
    for other in summaries[1:]:
        where = (first.host, other.host)
        for key in ("precision", "xla"):
            values = (getattr(first.config, key), getattr(other.config, key))
            if values[0] != values[1]:
                return (
                    f"Ray workers resolved {key} differently ({values[0]} on {where[0]}, {values[1]} on {where[1]}); "
                    "pass --precision and --xla explicitly so that every worker computes alike"
                )
        for name, record in first.weights.items():
            theirs = other.weights.get(name, {}).get("sha256", "none")
            if record["sha256"] != theirs:
                return (
                    f"Ray workers loaded different {name} weights (sha256 {record['sha256'][:12]} on {where[0]}, "
                    f"{theirs[:12]} on {where[1]}); give every node the same weights"
                )
        if first.device and other.device and _computing(first.device) != _computing(other.device):
            return (
                f"Ray workers compute on different devices or libraries ({shards.describe_device(first.device)} on {where[0]}, "
                f"{shards.describe_device(other.device)} on {where[1]}), whose features can differ in bytes; run on one kind of GPU "
                "with one installation (or --gpus-per-worker 0 for CPU workers)"
            )
        if (first.config, first.taps) != (other.config, other.taps):
            return f"Ray workers on {where[0]} and {where[1]} built different models; install the same version of this project on every node"
    return None


def _computing(device):
    """What of a device record decides the bytes: on a GPU its model and libraries, on a CPU the TensorFlow build only."""
    kernels = (device["device"], device["cuda"], device["cudnn"]) if device["cuda"] else ()
    return (*kernels, device["tensorflow"], device["forward"])


class ShardActor:
    """One Ray worker process: a ShardWorker built on first use (again after a restart), then fed whole shards."""

    def __init__(self, config, eager=False):
        self.config, self.eager = config, eager
        self._worker = None

    def start(self):
        """Build the model; say what it resolved to, so the driver can check that all workers agree."""
        return self._summary()

    def ping(self):
        return True

    def run_shard(self, task, run, out_dir):
        """Compute and write one shard; yields the images done after each batch (a Ray streaming generator)."""
        self._check_run(run, out_dir)
        yield from self._built().steps([task], run, out_dir)

    def _summary(self):
        worker = self._built()
        return WorkerSummary(worker.config, worker.weights, worker.taps, socket.gethostname(), worker.device)

    def _built(self):
        if self._worker is None:
            from pipeline.engines.worker import ShardWorker  # TensorFlow loads here, in the process Ray set up

            self._worker = ShardWorker(self.config, self.eager)
        return self._worker

    def _check_run(self, run, out_dir):
        """A restarted worker may have landed on other hardware or a node that lacks the files."""
        host = socket.gethostname()
        for what, path in (("source", run.config["source"]), ("--out", out_dir)):
            if not Path(path).exists():
                raise PipelineError(
                    f"{what} {path} does not exist on Ray node {host}; on a cluster the images and --out must be "
                    "on a filesystem every node mounts at the same path"
                )
        settings = ExtractConfig.from_record(run.config, "the run config")
        problem = disagreement([WorkerSummary(settings, run.weights, run.taps, "the run's first workers"), self._summary()])
        if problem:
            raise PipelineError(problem)


class RayEngine:
    """Pending shards on a pool of Ray actors (see the module docstring); options as `pipeline extract` takes them."""

    def __init__(self, address=None, workers=None, cpus_per_worker=None, gpus_per_worker=None):
        ray_cluster.require_ray()  # a missing extra fails before anything starts
        self.address, self.workers, self.cpus_per_worker, self.gpus_per_worker = (
            address,
            workers,
            cpus_per_worker,
            gpus_per_worker,
        )
        self._stack = contextlib.ExitStack()
        self._ray = self._head = None
        self._actors = []

    def start(self, config, eager=False):
        """Connect to Ray, start the actors and build their models; return their (agreed) WorkerSummary."""
        ray = self._ray = self._stack.enter_context(ray_cluster.connected(self.address))
        self._head = ray_cluster.HeadWatch(ray)
        alive = [n for n in ray.nodes() if n["Alive"]]
        nodes = [(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in alive]
        self.plan = plan_workers(nodes, self.workers, self.cpus_per_worker, self.gpus_per_worker)
        actor_class = ray.remote(ShardActor)
        options = actor_options(self.plan, [n["NodeID"] for n in alive])
        self._actors = [actor_class.options(**option).remote(config, eager) for option in options]
        summaries = self._get([actor.start.remote() for actor in self._actors], "building its model")
        problem = disagreement(summaries)
        if problem:
            raise PipelineError(problem)
        return summaries[0]

    def run(self, tasks, run, out_dir, progress):
        """Compute every shard task on the actors, redoing the shard of a worker that dies; `progress(n)` over all of them."""
        pool = _Pool(self._ray, self._actors, tasks, progress)
        while pool.unfinished():
            pool.dispatch(run, str(out_dir))
            ready, _ = self._ray.wait(pool.waiting(), num_returns=1, timeout=_POLL_SECONDS)
            for ref in ready:
                pool.handle(ref)
            self._check_head()
        _wait_until_visible(Path(out_dir), [task.index for task in tasks])

    def close(self):
        """Stop the actors, and the Ray this engine started (a Ray it found running is left running).

        Once the cluster's head is lost nothing more is asked of Ray: every call would wait on it.
        """
        actors, self._actors = self._actors, []
        if self._head is not None and self._head.lost:
            return
        try:
            for actor in actors:
                with contextlib.suppress(Exception):  # a lost head or a dead actor must not keep the others (or Ray) running
                    self._ray.kill(actor)
        finally:
            self._stack.close()

    def _check_head(self):
        if self._head is not None:
            self._head.check()

    def _get(self, refs, doing):
        ray = self._ray
        try:
            while len(ray.wait(refs, num_returns=len(refs), timeout=_POLL_SECONDS)[0]) < len(refs):
                self._check_head()
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            raise worker_error(e) from None
        except ray.exceptions.RayActorError as e:
            raise PipelineError(
                f"a Ray worker died while {doing} ({first_line(e)}); every node needs this project installed "
                "(with its ray extra) and memory for the model"
            ) from None


class _Pool:
    """The driver's view of one run: shards pending, running (a streaming generator each) and done; actors idle or restarting."""

    def __init__(self, ray, actors, tasks, progress):
        self.ray, self.progress = ray, progress
        self.pending = collections.deque(tasks)
        self.idle = collections.deque(actors)
        self.running = {}  # streaming generator of run_shard -> _Attempt
        self.reviving = {}  # ping of a dead actor Ray is restarting -> actor
        self.counted = collections.Counter()  # images of each shard shown so far (a redone shard counts once)
        self.deaths = collections.Counter()  # workers lost while running each shard
        self.down_since = None

    def unfinished(self):
        return bool(self.pending or self.running)

    def waiting(self):
        return [*self.running, *self.reviving]

    def dispatch(self, run, out_dir):
        """Hand pending shards to idle actors; fail when no actor is left, or none came back in time."""
        while self.pending and self.idle:
            actor, task = self.idle.popleft(), self.pending.popleft()
            self.running[actor.run_shard.remote(task, run, out_dir)] = _Attempt(actor, task)
        if self.running or self.idle:
            self.down_since = None
        elif not self.reviving:
            raise PipelineError("every Ray worker died and Ray could not restart any; rerun the same command to resume")
        else:
            self.down_since = self.down_since or time.monotonic()
            if time.monotonic() - self.down_since > REVIVE_SECONDS:
                raise PipelineError(
                    f"no Ray worker has been alive for {REVIVE_SECONDS} s (Ray could not restart them: too few CPUs or GPUs "
                    "left?); rerun the same command to resume"
                )

    def handle(self, ref):
        """Act on a ready ref: a restarted actor's ping, or the next item (progress, end or error) of a shard."""
        if ref in self.reviving:
            self._revived(ref)
            return
        attempt = self.running[ref]
        try:
            images = self.ray.get(next(ref))
        except StopIteration:
            del self.running[ref]
            self.idle.append(attempt.actor)
            return
        except self.ray.exceptions.RayActorError as e:
            del self.running[ref]
            self._lost(attempt, e)
            return
        except self.ray.exceptions.RayTaskError as e:
            raise worker_error(e) from None
        attempt.images += images
        index = attempt.task.index
        if attempt.images > self.counted[index]:
            self.progress(attempt.images - self.counted[index])
            self.counted[index] = attempt.images

    def _lost(self, attempt, error):
        """The actor died mid-shard: its shard goes first in line for another actor, and Ray restarts it."""
        index = attempt.task.index
        self.deaths[index] += 1
        if self.deaths[index] >= MAX_ATTEMPTS:
            raise PipelineError(
                f"{shards.shard_filename(index)} killed its Ray worker {MAX_ATTEMPTS} times (last: {first_line(error)}); "
                "look for an image in it that crashes the decoder or needs more memory than a worker has"
            ) from None
        self.pending.appendleft(attempt.task)
        self.reviving[attempt.actor.ping.remote()] = attempt.actor

    def _revived(self, ref):
        actor = self.reviving.pop(ref)
        try:
            self.ray.get(ref)
            self.idle.append(actor)
        except self.ray.exceptions.ActorDiedError:
            pass  # gone for good; the others carry on
        except self.ray.exceptions.RayActorError:
            time.sleep(1.0)  # still restarting: ask again in a moment
            self.reviving[actor.ping.remote()] = actor


@dataclass
class _Attempt:
    """One shard handed to one actor, and the images it has reported so far."""

    actor: object
    task: object
    images: int = 0


def _wait_until_visible(out_dir, indices):
    """Fail with one sentence when shards the workers wrote do not show up here: --out is not shared."""
    deadline = time.monotonic() + VISIBLE_SECONDS
    while True:
        present = {path.name for path in shards.existing_shards(out_dir)}
        missing = [shards.shard_filename(k) for k in indices if shards.shard_filename(k) not in present]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if missing:
        raise PipelineError(
            f"{missing[0]} was written by a Ray worker but is not in {out_dir} as this machine sees it; on a cluster "
            "--out must be a filesystem every node mounts at the same path"
        )
