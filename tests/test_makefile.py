"""`make install` switching TensorFlow flavours, run through make with a fake python and pip (no network, seconds)."""

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A pip that keeps its installed packages in a file and logs every call.
FAKE_PIP = textwrap.dedent("""\
    #!/bin/sh
    here=$(dirname "$0")/..
    touch "$here/installed"
    echo "pip $*" >> "$here/log"
    case "$1" in
    show) grep -qx "$3" "$here/installed";;
    uninstall) shift 3; for name in "$@"; do grep -vx "$name" "$here/installed" > "$here/kept"; mv "$here/kept" "$here/installed"; done;;
    install)
        case "$*" in
        *'.[cpu'*) grep -qx tensorflow-cpu "$here/installed" || echo tensorflow-cpu >> "$here/installed";;
        *'.[gpu'*) grep -qx tensorflow "$here/installed" || echo tensorflow >> "$here/installed";;
        esac;;
    esac
""")
# A python whose `-m venv DIR` makes DIR/bin/pip the fake pip.
FAKE_PYTHON = textwrap.dedent("""\
    #!/bin/sh
    mkdir -p "$3/bin" && cp "$(dirname "$0")/fake-pip" "$3/bin/pip"
""")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


@pytest.fixture
def fake_venv(tmp_path):
    for name, text in (("fake-pip", FAKE_PIP), ("fake-python", FAKE_PYTHON)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    venv = tmp_path / "venv"

    def make(*variables):
        subprocess.run(
            [
                "make",
                "--no-print-directory",
                "-C",
                str(REPO),
                "install",
                f"VENV={venv}",
                f"PYTHON={tmp_path / 'fake-python'}",
                *variables,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        log = (venv / "log").read_text().splitlines()
        (venv / "log").write_text("")
        installed = (venv / "installed").read_text().split()
        stamps = sorted(path.name for path in venv.glob(".installed-*"))
        return log, installed, stamps

    return make


def test_switching_tensorflow_flavours_leaves_one_package(fake_venv):
    log, installed, stamps = fake_venv("TF_EXTRA=cpu")
    assert installed == ["tensorflow-cpu"] and stamps == [".installed-cpu"]
    assert not any(line.startswith("pip uninstall") for line in log)  # a fresh venv: nothing to remove

    log, installed, stamps = fake_venv("TF_EXTRA=gpu")
    assert log[-3:] == [
        "pip show --quiet tensorflow-cpu",
        "pip uninstall --quiet --yes tensorflow-cpu tensorflow",
        "pip install --quiet -e .[gpu]",
    ]
    assert installed == ["tensorflow"] and stamps == [".installed-gpu"]  # the cpu stamp is forgotten

    log, installed, stamps = fake_venv("TF_EXTRA=gpu")
    assert log == []  # up to date: make does nothing

    log, installed, stamps = fake_venv("TF_EXTRA=cpu", "EXTRAS=ray")
    assert "pip uninstall --quiet --yes tensorflow-cpu tensorflow" in log and log[-1] == "pip install --quiet -e .[cpu,ray]"
    assert installed == ["tensorflow-cpu"] and stamps == [".installed-cpu,ray"]


def test_more_extras_of_the_same_flavour_keep_tensorflow(fake_venv):
    fake_venv("TF_EXTRA=cpu")
    log, installed, stamps = fake_venv("TF_EXTRA=cpu", "EXTRAS=ray")
    assert not any(line.startswith("pip uninstall") for line in log)
    assert installed == ["tensorflow-cpu"] and stamps == [".installed-cpu", ".installed-cpu,ray"]
