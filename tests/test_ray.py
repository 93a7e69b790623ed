"""`extract --engine ray`: the same bytes as the local engine, on one machine or two nodes, through worker faults."""

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from helpers import FAST, write_image_tree
from pipeline import shards
from pipeline.config import ExtractConfig
from pipeline.engines.ray import RayEngine, WorkerSummary, actor_options, disagreement, plan_workers
from pipeline.errors import PipelineError
from pipeline.extract import extract
from pipeline.sources import list_source
from same_features import assert_same_features

TAPS = ("resnet50/conv2_block1_out", "vgg16/block1_pool")


def test_two_ray_workers_write_the_local_engine_s_features(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=3)
    args = [*FAST[:4], "--tap", "vgg16:block1_pool", "--shard-size", 2]  # one small backbone: the actors build it quicker
    ray_run = run_cli("extract", root, "--out", tmp_path / "ray", *args, "--engine", "ray", "--workers", 2)  # starts a local Ray
    run_cli("extract", root, "--out", tmp_path / "local", *args)
    assert "extracted 6 rows, 0 errors" in ray_run.output and "(3 shards written, 0 already done)" in ray_run.output
    assert_same_features(tmp_path / "ray", tmp_path / "local")
    assert not ray.is_initialized()  # the Ray the command started is shut down


def test_a_missing_ray_extra_is_one_sentence(tmp_path, image_tree, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST, "--engine", "ray", code=1)
    assert "--engine ray needs Ray, which is not installed; install it with pip install -e '.[ray]'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "flag, value", [("--workers", "2"), ("--ray-address", "auto"), ("--cpus-per-worker", "1"), ("--gpus-per-worker", "0")]
)
def test_ray_options_without_engine_ray_are_refused(tmp_path, image_tree, run_cli, flag, value):
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST, flag, value, code=2)
    assert f"{flag} is an option of --engine ray; add --engine ray or drop it" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "0 is not in the range x>=1"),
        (["--cpus-per-worker", "0"], "0 is not in the range x>=1"),
        (["--gpus-per-worker", "-1"], "-1.0 is not in the range x>=0"),
        (["--engine", "spark"], "'spark' is not one of 'local', 'ray'"),
    ],
)
def test_bad_engine_values_are_refused(tmp_path, image_tree, run_cli, args, message):
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", *FAST, *args, code=2)
    assert message in " ".join(result.output.split())


def test_worker_plans():
    one_gpu_nodes = [(0, 0), (8, 2), (8, 2)]  # a head without CPUs for work, two nodes with 8 CPUs and 2 GPUs
    assert (
        plan_workers(one_gpu_nodes) == (plan := plan_workers(one_gpu_nodes, gpus_per_worker=1))
        and plan.workers == 4
        and plan.cpus == 4
    )
    assert plan_workers(one_gpu_nodes, gpus_per_worker=0.5).workers == 8
    assert plan_workers(one_gpu_nodes, workers=2).cpus == 8  # one worker per node can have all its CPUs
    assert plan_workers(one_gpu_nodes, gpus_per_worker=0).workers == 2  # CPU workers, a whole node each
    cpu_nodes = [(2, 0)]
    assert (plan_workers(cpu_nodes).workers, plan_workers(cpu_nodes).cpus, plan_workers(cpu_nodes).gpus) == (1, 2, 0)
    assert (plan_workers(cpu_nodes, workers=2).cpus, plan_workers(cpu_nodes, cpus_per_worker=1).workers) == (1, 2)
    with pytest.raises(
        PipelineError, match=r"--workers 3 with 1 CPUs each do not fit in the Ray cluster \(2 fit on its 1 node\(s\)\)"
    ):
        plan_workers(cpu_nodes, workers=3)
    with pytest.raises(PipelineError, match=r"--cpus-per-worker 4 is more than any Ray node has \(at most 2 CPUs\)"):
        plan_workers(cpu_nodes, cpus_per_worker=4)
    with pytest.raises(
        PipelineError, match=r"--gpus-per-worker 1 needs GPUs, but the Ray cluster has none; pass --gpus-per-worker 0"
    ):
        plan_workers(cpu_nodes, gpus_per_worker=1)
    with pytest.raises(PipelineError, match=r"--gpus-per-worker 4 is more than any Ray node has \(at most 2 GPUs\)"):
        plan_workers(one_gpu_nodes, gpus_per_worker=4)
    with pytest.raises(PipelineError, match=r"--workers 5 with 1 CPUs and 1 GPUs each do not fit"):
        plan_workers(one_gpu_nodes, workers=5)


def test_default_plans_go_node_by_node():
    """Nodes of different sizes: each gets its own share, not the smallest node's (which put 4 models on the 8-CPU node)."""
    cpu_nodes = [(8, 0), (2, 0)]
    plan = plan_workers(cpu_nodes)
    assert plan.actors == ((0, 8), (1, 2)) and plan.workers == 2 and plan.gpus == 0  # one CPU actor per node, all its CPUs
    gpu_nodes = [(0, 0), (8, 2), (16, 2), (3, 4)]
    assert plan_workers(gpu_nodes).actors == ((1, 4), (1, 4), (2, 8), (2, 8), (3, 1), (3, 1), (3, 1))  # 4 GPUs, only 3 CPUs
    assert plan_workers(gpu_nodes, gpus_per_worker=0).actors == ((1, 8), (2, 16), (3, 3))
    # given --workers or --cpus-per-worker, every actor is alike and Ray places them
    assert plan_workers(cpu_nodes, cpus_per_worker=2).actors == ((None, 2),) * 5
    assert plan_workers(cpu_nodes, workers=2).actors == ((None, 4),) * 2  # the most CPUs that let 2 fit


def test_actor_options_pin_planned_actors_to_their_node_with_their_own_cpus():
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_ids = ["a" * 56, "b" * 56]  # Ray node ids are 28 bytes in hex
    options = actor_options(plan_workers([(8, 0), (2, 0)]), node_ids)
    assert [(o["num_cpus"], o["num_gpus"]) for o in options] == [(8, 0), (2, 0)]
    strategies = [o["scheduling_strategy"] for o in options]
    assert all(isinstance(s, NodeAffinitySchedulingStrategy) and s.soft for s in strategies)  # soft: Ray may restart it elsewhere
    assert [s.node_id for s in strategies] == node_ids
    assert [o["runtime_env"]["env_vars"]["TF_NUM_INTRAOP_THREADS"] for o in options] == ["8", "2"]
    assert all(o["runtime_env"]["env_vars"]["CUDA_VISIBLE_DEVICES"] == "" for o in options)
    uniform = actor_options(plan_workers([(8, 0), (2, 0)], cpus_per_worker=2), node_ids)
    assert len(uniform) == 5 and all("scheduling_strategy" not in o and o["num_cpus"] == 2 for o in uniform)


def test_closing_the_engine_survives_a_lost_head(monkeypatch):
    """ray.kill raising (the head is gone) must not skip the other kills or shutting down the Ray the command started."""
    engine = RayEngine()
    killed, shut = [], []

    def kill(actor):
        killed.append(actor)
        raise ConnectionError("lost the head")

    monkeypatch.setattr(ray, "kill", kill)
    engine._ray, engine._actors = ray, ["actor-1", "actor-2"]
    engine._stack.callback(lambda: shut.append(True))  # what connected() registers for a Ray it started
    with pytest.raises(ValueError, match="the original error"):
        try:
            raise ValueError("the original error")
        finally:
            engine.close()
    assert killed == ["actor-1", "actor-2"] and shut == [True] and engine._actors == []
    engine.close()  # twice is fine


def test_workers_that_resolved_or_loaded_differently_are_one_sentence():
    config = ExtractConfig(taps=TAPS, precision="mixed_float16", xla=True)
    weights = {"resnet50": {"source": {"kind": "random", "seed": 0}, "sha256": "a" * 64}}
    gpu = WorkerSummary(config, weights, [], "gpu-node")
    assert disagreement([gpu, WorkerSummary(config, weights, [], "gpu-node-2")]) is None
    cpu = WorkerSummary(dataclasses.replace(config, precision="float32"), weights, [], "cpu-node")
    assert disagreement([gpu, cpu]) == (
        "Ray workers resolved precision differently (mixed_float16 on gpu-node, float32 on cpu-node); "
        "pass --precision and --xla explicitly so that every worker computes alike"
    )
    other = WorkerSummary(config, {"resnet50": {**weights["resnet50"], "sha256": "b" * 64}}, [], "old-node")
    assert (
        "Ray workers loaded different resnet50 weights (sha256 aaaaaaaaaaaa on gpu-node, bbbbbbbbbbbb on old-node)"
        in disagreement([gpu, other])
    )


def test_workers_on_other_gpus_or_libraries_are_one_sentence_and_other_cpus_are_not():
    config, weights = ExtractConfig(taps=TAPS, precision="mixed_float16", xla=True), {}
    a100 = {
        "device": "NVIDIA A100-SXM4-80GB (compute capability 8.0)",
        "tensorflow": "2.16.1 (v2.16.1)",
        "cuda": "12.3",
        "cudnn": "8",
        "forward": "xla",
        "op_determinism": True,
    }
    h100 = {**a100, "device": "NVIDIA H100 80GB HBM3 (compute capability 9.0)"}
    one, two = WorkerSummary(config, weights, [], "node-1", a100), WorkerSummary(config, weights, [], "node-2", h100)
    assert disagreement([one, two]) == (
        "Ray workers compute on different devices or libraries (NVIDIA A100-SXM4-80GB (compute capability 8.0), CUDA 12.3, cuDNN 8, "
        "TensorFlow 2.16.1 (v2.16.1), forward xla, op determinism on node-1, NVIDIA H100 80GB HBM3 (compute capability 9.0), "
        "CUDA 12.3, cuDNN 8, TensorFlow 2.16.1 (v2.16.1), forward xla, op determinism on node-2), whose features can differ "
        "in bytes; run on one kind of GPU with one installation (or --gpus-per-worker 0 for CPU workers)"
    )
    assert "cuDNN 9" in disagreement([one, WorkerSummary(config, weights, [], "node-3", {**a100, "cudnn": "9"})])
    assert disagreement([one, WorkerSummary(config, weights, [], "node-4", dict(a100))]) is None
    cpu = {
        "device": "AMD EPYC 9R14",
        "tensorflow": "2.16.1 (v2.16.1)",
        "cuda": None,
        "cudnn": None,
        "forward": "xla",
        "op_determinism": False,
    }
    cpus = [
        WorkerSummary(config, weights, [], "c1", cpu),
        WorkerSummary(config, weights, [], "c2", {**cpu, "device": "Intel Xeon"}),
    ]
    assert disagreement(cpus) is None  # CPU kernels give the same bytes on any x86-64 CPU
    assert disagreement([one, WorkerSummary(config, weights, [], "restarted", None)]) is None  # nothing recorded to compare


# --- the driver's scheduling, on a fake Ray: what happens when workers die ---------------------------


class FakeRay:
    """Just what RayEngine.run uses: wait (the newest ref is ready first), get, and the exception types."""

    class exceptions:
        class RayActorError(Exception):
            pass

        class ActorDiedError(RayActorError):
            pass

        class RayTaskError(Exception):
            cause = None

    def wait(self, refs, num_returns, timeout):
        return refs[-1:], refs[:-1]

    def get(self, item):
        if isinstance(item, BaseException):
            raise item
        return item


class FakeActor:
    """Runs shards by a script: each call of run_shard takes the next behaviour ('ok', 'die'; 'ok' once the script ends)."""

    def __init__(self, out_dir, script=(), revives=True):
        self.out_dir, self.script, self.revives, self.shards = out_dir, list(script), revives, []
        self.run_shard = self.ping = self  # actor.method.remote(...) is self.remote(...)
        self.pings = 0

    def remote(self, *args):
        if not args:  # a ping
            self.pings += 1
            return True if self.revives else FakeRay.exceptions.ActorDiedError("gone")
        task = args[0]
        behaviour = self.script.pop(0) if self.script else "ok"
        if behaviour == "die":
            return iter([1, FakeRay.exceptions.RayActorError("worker died")])
        self.shards.append(task.index)
        (self.out_dir / shards.shard_filename(task.index)).touch()
        return iter([len(task.records)])


def run_fake(tmp_path, actors, shard_count=4, size=3):
    from pipeline.engines import ShardTask
    from pipeline.engines.ray import RayEngine

    engine = RayEngine()
    engine._ray, engine._actors = FakeRay(), actors
    shown = []
    tasks = [ShardTask(k, (None,) * size) for k in range(shard_count)]
    engine.run(tasks, None, tmp_path, shown.append)
    return sum(shown)


def test_a_shard_whose_worker_dies_is_redone_and_counted_once(tmp_path):
    dying, steady = FakeActor(tmp_path, ["die"]), FakeActor(tmp_path)
    assert run_fake(tmp_path, [dying, steady]) == 12  # the lost attempt's image is not counted twice
    assert sorted(dying.shards + steady.shards) == [0, 1, 2, 3] and dying.pings == 1  # asked whether Ray restarted it


def test_a_shard_that_keeps_killing_its_worker_stops_the_run(tmp_path):
    with pytest.raises(
        PipelineError, match=r"shard-00000.h5 killed its Ray worker 3 times \(last: worker died\); look for an image"
    ):
        run_fake(tmp_path, [FakeActor(tmp_path, ["die"] * 3)])


def test_when_no_worker_is_left_the_run_stops(tmp_path):
    with pytest.raises(PipelineError, match="every Ray worker died and Ray could not restart any; rerun the same command"):
        run_fake(tmp_path, [FakeActor(tmp_path, ["die"], revives=False)])


def test_shards_a_worker_wrote_elsewhere_are_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.engines.ray.VISIBLE_SECONDS", 0)
    actor = FakeActor(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(
        PipelineError, match=r"shard-00000.h5 was written by a Ray worker but is not in .* as this machine sees it"
    ):
        run_fake(tmp_path, [actor], shard_count=1)


# --- slow: errors from inside actors, two nodes, faults --------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """12 images and their features from the local engine, in 6 shards of 2 (as FAST with --shard-size 2 --batch-size 1)."""
    root = tmp_path_factory.mktemp("ray-reference")
    write_image_tree(root / "images", per_class=6, seed=1)
    config = ExtractConfig(taps=TAPS, weights="random", image_size=32, shard_size=2, batch_size=1)
    extract(config, list_source(root / "images"), root / "local")
    return root / "images", root / "local", config


def _in_background(function):
    """Run `function` on a thread; return a callable that joins it and returns its value or raises its error."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as e:  # handed to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout=600):
        thread.join(timeout)
        assert not thread.is_alive(), "extract did not finish"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return join


def _wait_for(condition, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_pipeline_error_inside_an_actor_is_the_same_one_sentence(tmp_path, image_tree, run_cli, local_ray):
    root = image_tree()
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    failed = run_cli("extract", root, "--out", tmp_path / "f", *FAST, "--engine", "ray", "--on-error", "fail", code=1)
    assert (
        f"Error: cannot decode {root / 'cat' / 'broken.png'}:" in failed.output
        and "(--on-error fail stops here)" in failed.output
    )
    assert "Traceback" not in failed.output and "RayTaskError" not in failed.output
    bad_tap = run_cli(
        "extract", root, "--out", tmp_path / "g", *FAST[:4], "--tap", "vgg16:block9_conv9", "--engine", "ray", code=1
    )
    assert "Error: unknown tap 'vgg16/block9_conv9'; valid vgg16 layers are: block1_conv1" in bad_tap.output
    assert "Traceback" not in bad_tap.output


@pytest.mark.slow
def test_an_actor_killed_mid_run_still_gives_complete_identical_output(tmp_path, reference, local_ray):
    images, local, config = reference
    out = tmp_path / "f"
    join = _in_background(lambda: extract(config, list_source(images), out, engine="ray", engine_options={"workers": 2}))
    _wait_for(lambda: (out / "shard-00000.h5").exists())
    busy = _actor_pids("ray::ShardActor.run_shard")
    assert busy and len(shards.existing_shards(out)) < 6, "nothing left to kill"
    os.kill(busy[0], signal.SIGKILL)
    # what a worker killed while writing leaves behind; the driver may remove it once the run is done
    from pipeline.files import temp_sibling

    gone = subprocess.Popen(["true"])
    gone.wait()
    temp_sibling(out / "shard-00005.h5", pid=gone.pid).write_bytes(b"half a shard")
    result = join()
    assert result.written == 6 and busy[0] not in _actor_pids("ray::ShardActor")
    assert_same_features(out, local)


def _actor_pids(title):
    """PIDs of the processes whose title (Ray sets it to ray::Class.method) starts with `title`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(title.encode()):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_two_nodes_and_a_node_removed_mid_run_give_the_local_bytes(tmp_path, reference):
    images, local, config = reference
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1)
    try:

        def run(out):
            return extract(
                config, list_source(images), out, engine="ray", engine_options={"address": cluster.address, "workers": 2}
            )

        assert run(tmp_path / "both").written == 6  # one worker on each node: the plan needs both
        assert_same_features(tmp_path / "both", local)

        ray.init(address=cluster.address, log_to_driver=False)  # so the engine keeps using it while this thread removes a node
        join = _in_background(lambda: run(tmp_path / "removed"))
        _wait_for(lambda: (tmp_path / "removed" / "shard-00000.h5").exists())
        assert len(shards.existing_shards(tmp_path / "removed")) < 6, "nothing left to lose"
        cluster.remove_node(second, allow_graceful=False)
        assert join().written == 6  # the head node's worker redid the lost shard
        assert_same_features(tmp_path / "removed", local)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_default_actors_land_one_per_node_with_that_node_s_cpus():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        alive = [n for n in ray.nodes() if n["Alive"]]
        plan = plan_workers([(n["Resources"]["CPU"], 0) for n in alive])

        class Where:
            def where(self):
                context = ray.get_runtime_context()
                return context.get_node_id(), context.get_assigned_resources().get("CPU"), os.environ["TF_NUM_INTRAOP_THREADS"]

        actors = [ray.remote(Where).options(**o).remote() for o in actor_options(plan, [n["NodeID"] for n in alive])]
        found = sorted(ray.get([actor.where.remote() for actor in actors]), key=lambda w: w[1])
        by_cpus = sorted(
            ((n["NodeID"], n["Resources"]["CPU"], str(int(n["Resources"]["CPU"]))) for n in alive), key=lambda w: w[1]
        )
        assert found == by_cpus  # one actor on each node, holding all of its CPUs
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_a_driver_stopped_mid_run_is_resumed_by_either_engine(tmp_path, reference):
    images, local, _ = reference
    args = [str(images), "--out", str(tmp_path / "f"), *FAST, "--shard-size", "2", "--batch-size", "1"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "extract", *args, "--engine", "ray", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: (tmp_path / "f" / "shard-00000.h5").exists() or driver.poll() is not None)
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 143, stderr
    assert not (tmp_path / "f" / "manifest.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "pipeline", "extract", *args], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "already done" in resumed.stdout, resumed.stderr
    assert_same_features(tmp_path / "f", local)
