"""Connecting to Ray (an optional extra) for every command that offers `--engine ray`."""

import contextlib

from pipeline.errors import PipelineError

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
    """Ray connected for the block: to `address` ("auto" or HOST:PORT), or a new local Ray when None.

    A Ray this process is already connected to (a test's cluster, a caller's session) is used as
    it is and left running; one started here is shut down afterwards.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, **init_options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise PipelineError(f"could not connect to {where} ({str(e).strip().splitlines()[0]}); check --ray-address") from None
    try:
        yield ray
    finally:
        ray.shutdown()
