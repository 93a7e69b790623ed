"""Ray never hangs a command: unreachable or silent addresses, a head lost mid-run, signals while connecting; and every
Ray started on this machine stays on 127.0.0.1."""

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.engines.ray_cluster import connected

ARGS = ["--weights", "random", "--image-size", "32", "--tap", "vgg16:block1_pool", "--engine", "ray"]
BOUND = 60  # seconds any of these commands may take to give up


@pytest.fixture
def cli():
    """Start the CLI as a subprocess (Ray's client state and stuck threads stay out of the test process); killed if still running at the end.

    `patch`: Python run first.
    """
    started = []

    def start(*args, patch="pass"):
        code = f"import sys; {patch}; from pipeline.cli import main; sys.argv[0] = 'pipeline'; main()"
        started.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_listener():
    """HOST:PORT of a TCP server that accepts connections (the kernel does) but never says a word."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_an_address_where_nothing_listens_is_one_sentence(tmp_path, image_tree, cli):
    address = f"127.0.0.1:{free_port()}"
    run = cli("extract", image_tree(), "--out", tmp_path / "f", *ARGS, "--ray-address", address)
    _, stderr = run.communicate(timeout=BOUND)
    assert run.returncode == 1
    assert f"Error: no Ray cluster answers at {address} (connection refused); start one there" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "f" / "manifest.json").exists()


def test_sigterm_while_connecting_to_a_silent_address_ends_the_command(tmp_path, image_tree, cli):
    with silent_listener() as address:
        run = cli("extract", image_tree(), "--out", tmp_path / "f", *ARGS, "--ray-address", address)
        _wait_for_line(run, "Connecting to existing Ray cluster")  # inside ray.init, which Ray's client would never leave
        time.sleep(1.0)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=BOUND)
    assert run.returncode == 143 and "interrupted; rerun the same command to resume" in stderr


def test_a_silent_address_gives_up_in_bounded_time(tmp_path, image_tree, cli):
    with silent_listener() as address:
        patch = "import pipeline.engines.ray_cluster as c; c.CONNECT_SECONDS = 3"  # 30 s in use
        run = cli("extract", image_tree(), "--out", tmp_path / "f", *ARGS, "--ray-address", address, patch=patch)
        _, stderr = run.communicate(timeout=BOUND)
    assert run.returncode == 1, stderr
    assert f"Error: could not connect to the Ray cluster at {address} (no answer within 3 s); check --ray-address" in stderr


def _wait_for_line(process, text, timeout=BOUND):
    """Read `process`'s stderr until a line holds `text` (the rest is read by communicate)."""
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        if text in line:
            return
        assert time.monotonic() < deadline, f"no {text!r} yet"
    raise AssertionError(f"the process ended without {text!r}")


def _listening_hosts(port):
    """The local addresses of the TCP sockets listening on `port` (IPv4 and IPv6 tables of /proc/net)."""
    hosts = []
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(host)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is little-endian
                hosts.append(socket.inet_ntop(socket.AF_INET if size == 4 else socket.AF_INET6, words))
    return hosts


def _assert_on_loopback(ray_module):
    gcs_host, gcs_port = ray_module.get_runtime_context().gcs_address.rsplit(":", 1)
    assert gcs_host == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray_module.nodes()} == {"127.0.0.1"}
    assert set(_listening_hosts(int(gcs_port))) <= {"127.0.0.1", "::ffff:127.0.0.1"} and _listening_hosts(int(gcs_port))


def test_a_local_ray_the_commands_start_binds_and_advertises_loopback_only():
    with connected() as started:
        _assert_on_loopback(started)
    assert not ray.is_initialized()


@pytest.mark.slow
def test_the_tests_clusters_bind_and_advertise_loopback_only():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        assert cluster.address.startswith("127.0.0.1:")
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        _assert_on_loopback(ray)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_a_head_lost_mid_run_stops_the_driver_in_bounded_time(tmp_path, image_tree, cli):
    root = image_tree(per_class=8)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        run = cli(
            "extract",
            root,
            "--out",
            tmp_path / "f",
            *ARGS,
            "--ray-address",
            cluster.address,
            "--shard-size",
            2,
            "--batch-size",
            1,
        )
        deadline = time.monotonic() + 300
        while not (tmp_path / "f" / "shard-00000.h5").exists():
            assert run.poll() is None and time.monotonic() < deadline, "no shard written"
            time.sleep(0.1)
        cluster.remove_node(cluster.head_node, allow_graceful=False)
        _, stderr = run.communicate(timeout=BOUND)
    finally:
        cluster.shutdown()
    assert run.returncode == 1, stderr
    assert (
        "Error: lost the Ray cluster's head: its GCS at 127.0.0.1:" in stderr
        and "rerun the same command once the cluster is back" in stderr
    )
    assert "Traceback" not in stderr
