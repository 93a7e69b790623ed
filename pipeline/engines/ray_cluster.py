"""Connecting to Ray (an optional extra) for every command that offers `--engine ray`."""

import contextlib
import os
import signal
import threading

from pipeline.errors import PipelineError, first_line

INSTALL_HINT = "pip install -e '.[ray]' (or make install EXTRAS=ray)"


def require_ray():
    """The `ray` module, or one sentence saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PipelineError(f"--engine ray needs Ray, which is not installed; install it with {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def connected(address=None, **init_options):
    """Ray connected for the block: to `address` ("auto" or HOST:PORT), else to $RAY_ADDRESS, else a new local Ray.

    A Ray this process is already connected to (a test's cluster, a caller's session) is used as
    it is and left running; one started here is shut down afterwards. A new local Ray never
    joins another one running on the machine.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:  # its workers are this command's work: not at Ray's default nice 15, which loses to any other load
        init_options = {"_system_config": {"worker_niceness": 0}, **init_options}
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, **init_options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise PipelineError(f"could not connect to {where} ({first_line(e)}); check --ray-address") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, on_sigterm)  # ray.init replaces it with sys.exit; the CLI's handler cleans up and says so
    try:
        yield ray
    finally:
        ray.shutdown()
