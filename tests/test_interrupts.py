"""An interrupt that lands where Python swallows exceptions (a __del__, a GC callback) still ends the command."""

import signal
import subprocess
import sys
import textwrap

import pytest

# A process that gets SIGTERM while a __del__ runs: Python prints the exception raised there and
# carries on, so without the re-delivery the loop below runs out and the process exits 0.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from pipeline import cli

    cli.install_interrupt_handlers()

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.{signal})
            time.sleep(0.2)  # the handler runs, and raises, inside __del__

    try:
        SignalledWhileCollected()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except (KeyboardInterrupt, cli.Terminated) as e:
        print(type(e).__name__)
        sys.exit(0)
    sys.exit("the interrupt was lost")
""")


@pytest.mark.parametrize("name, raised", [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")])
def test_an_interrupt_raised_inside_a_finalizer_is_sent_again_and_ends_the_process(name, raised):
    completed = subprocess.run([sys.executable, "-c", SCRIPT.format(signal=name)], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == raised
    assert "Exception ignored" not in completed.stderr


def test_other_unraisable_exceptions_still_reach_the_default_hook():
    script = textwrap.dedent("""
        from pipeline import cli
        cli.install_interrupt_handlers()
        class Broken:
            def __del__(self):
                raise ValueError("from __del__")
        Broken()
        print("carried on")
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0 and completed.stdout.strip() == "carried on"
    assert "Exception ignored" in completed.stderr and "ValueError: from __del__" in completed.stderr


def test_the_cli_entry_point_installs_the_handlers(monkeypatch):
    from pipeline import cli

    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "cli", lambda prog_name: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job of a shell without job control inherits it
    try:
        cli.main()
        assert signal.getsignal(signal.SIGTERM) is cli._raise_terminated
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert sys.unraisablehook is cli._redeliver_swallowed_interrupts
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
