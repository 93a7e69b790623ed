"""Connecting to Ray (an optional extra) for every command that offers `--engine ray`.

Connecting to a cluster never hangs: an address where nothing answers is refused after a plain
TCP connect, and `ray.init` runs on a helper thread that the command stops waiting for after
CONNECT_SECONDS, or at once on Ctrl-C or SIGTERM (Ray's own client would retry forever, deaf to
signals). A local Ray started here binds and advertises this machine's loopback interface only.
"""

import contextlib
import os
import signal
import socket
import threading
import time
from unittest import mock

from pipeline.errors import PipelineError, first_line

INSTALL_HINT = "pip install -e '.[ray]' (or make install EXTRAS=ray)"
LOOPBACK = "127.0.0.1"
CONNECT_SECONDS = 30  # the longest connecting to a running cluster may take (seconds when it is up)
PROBE_SECONDS = 5.0  # the TCP connect that checks an address before Ray is asked to use it
HEAD_LOST_SECONDS = 15  # how long a cluster's head may not answer before a run stops (Ray's client ends the process after 60)
# Ray treats a node as one of a cluster unless this is 0: it then advertises 127.0.0.1 instead of the machine's address.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def require_ray():
    """The `ray` module, or one sentence saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PipelineError(f"--engine ray needs Ray, which is not installed; install it with {INSTALL_HINT}") from None
    return ray


def probe(address, timeout=PROBE_SECONDS):
    """Refuse a HOST:PORT where no TCP server answers within `timeout`, in one sentence; "auto" is left to Ray."""
    if address == "auto":
        return
    problem = unanswered(address, timeout)
    if problem:
        raise PipelineError(
            f"no Ray cluster answers at {address} ({problem}); start one there (`ray start --head`) or fix --ray-address"
        )


def unanswered(address, timeout=PROBE_SECONDS):
    """Why nothing accepts a TCP connection at HOST:PORT `address` within `timeout` (a few words), or None when something does."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise PipelineError(f"--ray-address {address!r} is neither 'auto' nor HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        return "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e)).lower()
    return None


class HeadWatch:
    """Notices a cluster head (its GCS) that stopped answering, which Ray's client would wait on for a minute or forever.

    `check()` is called by a loop waiting on Ray, as often as it likes (it connects at most every
    CHECK_SECONDS); it raises one sentence once the GCS has not answered for HEAD_LOST_SECONDS.
    """

    CHECK_SECONDS = 2.0

    def __init__(self, ray):
        self.address = ray.get_runtime_context().gcs_address
        self.silent_since = None
        self.checked = time.monotonic()
        self.lost = False

    def check(self):
        if time.monotonic() - self.checked < self.CHECK_SECONDS:
            return
        problem = unanswered(self.address, timeout=self.CHECK_SECONDS)
        self.checked = time.monotonic()
        if problem is None:
            self.silent_since = None
            return
        now = time.monotonic()
        self.silent_since = self.silent_since or now
        if now - self.silent_since >= HEAD_LOST_SECONDS:
            self.lost = True
            raise PipelineError(
                f"lost the Ray cluster's head: its GCS at {self.address} has not answered for {HEAD_LOST_SECONDS} s ({problem}); "
                "what was finished is kept, so rerun the same command once the cluster is back"
            )


@contextlib.contextmanager
def connected(address=None, **init_options):
    """Ray connected for the block: to `address` ("auto" or HOST:PORT), else to $RAY_ADDRESS, else a new local Ray.

    A Ray this process is already connected to (a test's cluster, a caller's session) is used as
    it is and left running; one started here is shut down afterwards. A new local Ray never
    joins another one running on the machine, and binds and advertises 127.0.0.1 only.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        probe(address)
        options = {"address": address, **init_options}
    else:  # its workers are this command's work: not at Ray's default nice 15, which loses to any other load
        options = {"address": "local", "_node_ip_address": LOOPBACK, "_system_config": {"worker_niceness": 0}, **init_options}
    where = f"the Ray cluster at {address}" if address else "a local Ray"
    with _loopback_only(ray, enabled=not address), _as_sentence(where):
        if address:
            _init_bounded(ray, include_dashboard=False, log_to_driver=False, **options)
        else:  # on this thread: Ray's processes die with the thread that started them
            _init_here(ray, include_dashboard=False, log_to_driver=False, **options)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _loopback_only(ray, enabled):
    """While a local Ray starts: Ray's single-machine mode, so that it resolves "this node" to 127.0.0.1 (and binds there)."""
    if not enabled:
        yield
        return
    before = os.environ.get(SINGLE_MACHINE_ENV)
    os.environ[SINGLE_MACHINE_ENV] = "0"  # for the processes Ray starts, which read it at import
    try:
        with mock.patch.object(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False):  # this process read it already
            yield
    finally:
        if before is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = before


@contextlib.contextmanager
def _as_sentence(where):
    try:
        yield
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        raise PipelineError(f"could not connect to {where} ({first_line(e)}); check --ray-address") from None


def _init_here(ray, **options):
    """`ray.init` on this thread, keeping the SIGTERM handler it replaces with sys.exit (the CLI's cleans up and says so)."""
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        ray.init(**options)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, on_sigterm)


def _init_bounded(ray, **options):
    """`ray.init(**options)` connecting to a cluster, on a helper thread waited for at most CONNECT_SECONDS and interruptible all along.

    On a timeout or an interrupt the helper thread is left behind (a daemon, blocked inside Ray's
    client, which retries forever); the process is on its way out anyway. Connecting starts no
    process, so nothing depends on the helper thread living on.
    """
    outcome = {}

    def start():
        try:
            outcome["context"] = ray.init(**options)
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e

    helper = threading.Thread(target=start, name="ray-init", daemon=True)
    helper.start()
    deadline = time.monotonic() + CONNECT_SECONDS
    while helper.is_alive() and time.monotonic() < deadline:
        helper.join(0.2)  # short waits: a signal is handled between them
    if helper.is_alive():
        raise TimeoutError(f"no answer within {CONNECT_SECONDS} s")
    if "error" in outcome:
        raise outcome["error"]
