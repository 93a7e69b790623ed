"""Device options set once before TensorFlow's first op; GPUs as nvidia-smi and TensorFlow see them; auto precision by GPU."""

import os
import subprocess
import sys
import textwrap

import pytest

from pipeline import backbones, devices
from pipeline.config import ExtractConfig

# predict in a fresh process, with a fake GPU whose set_memory_growth does what TensorFlow's does (nothing
# when already set; refuses once the devices are initialised); it records the growth request and the head load.
PREDICT_WITH_A_FAKE_GPU = textwrap.dedent("""
    import atexit, sys
    import tensorflow as tf
    from tensorflow.python.eager import context
    from pipeline import devices, lineage

    events = []
    fake = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    devices._physical_gpus = lambda tf: [fake]

    growth = {}

    def set_memory_growth(device, enable):
        if growth.get(device.name) == enable:
            return
        events.append("growth")
        if context.context()._context_handle is not None:
            raise RuntimeError("Physical devices cannot be modified after being initialized")
        growth[device.name] = enable

    tf.config.experimental.set_memory_growth = set_memory_growth
    load_head = lineage.Lineage.load_head

    def recording_load_head(self):
        events.append("head")
        return load_head(self)

    lineage.Lineage.load_head = recording_load_head
    atexit.register(lambda: print("EVENTS " + ",".join(events)))
    from pipeline.cli import main
    sys.argv = ["pipeline", *sys.argv[1:]]
    main()
""")


def test_predict_asks_for_memory_growth_before_tensorflow_initialises_its_devices(head_run, tmp_path):
    env = {**os.environ}
    env.pop(devices.GROWTH_VARIABLE, None)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            PREDICT_WITH_A_FAKE_GPU,
            "predict",
            str(head_run.run),
            str(head_run.root / "images"),
            "--out",
            str(tmp_path / "p.csv"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "EVENTS growth,head\n" in done.stdout  # asked once, first, and not refused
    assert "memory growth" not in done.stderr


def test_a_late_growth_request_is_said_not_swallowed(monkeypatch):
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # TensorFlow's devices are initialised in this process now
    fake = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(devices, "_physical_gpus", lambda tf: [fake])
    refused = []

    def set_memory_growth(device, enable):
        refused.append(device)
        raise RuntimeError("Physical devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", set_memory_growth)
    monkeypatch.delenv(devices.GROWTH_VARIABLE, raising=False)
    problems = devices.configure()
    assert refused == [fake]
    assert len(problems) == 1 and "initialised /physical_device:GPU:0 before memory growth" in problems[0]
    assert os.environ[devices.GROWTH_VARIABLE] == "true"  # children still grow


def test_a_user_s_growth_false_is_respected(monkeypatch):
    monkeypatch.setenv(devices.GROWTH_VARIABLE, "false")
    monkeypatch.setattr(devices, "_physical_gpus", lambda tf: pytest.fail("growth asked for against the user's setting"))
    assert devices.configure() == []


def test_the_command_prints_what_could_not_be_set(monkeypatch, run_cli):
    monkeypatch.setattr(
        devices, "configure", lambda: ["TensorFlow had initialised GPU:0 before memory growth could be asked for"]
    )
    result = run_cli("taps", "--backbone", "vgg16", "--image-size", 32)
    assert "warning: TensorFlow had initialised GPU:0 before memory growth" in result.output


def test_every_command_that_runs_tensorflow_sets_the_device_options_first():
    from pipeline.cli import TensorFlowCommand, cli

    runs_tensorflow = {name for name, command in cli.commands.items() if isinstance(command, TensorFlowCommand)}
    assert runs_tensorflow == {"predict", "export", "train", "taps", "bench", "doctor"}  # extract: in its worker
    assert not cli.commands["train"].runs_here({"engine": "local", "jobs": 2})


def test_the_worker_sets_the_device_options_before_it_builds_anything(monkeypatch):
    from pipeline.engines import worker

    order = []
    monkeypatch.setattr(devices, "configure", lambda: order.append("configure") or [])
    monkeypatch.setattr(worker.backbones, "build_backbone", lambda *args: order.append("build") or pytest.fail("built"))
    with pytest.raises(pytest.fail.Exception):
        worker.ShardWorker(ExtractConfig(taps=("vgg16/block1_pool",), image_size=32, weights="random"))
    assert order == ["configure", "build"]


UP_TO_DATE_RERUN = textwrap.dedent("""
    import atexit, sys
    atexit.register(lambda: print("TENSORFLOW", "tensorflow" in sys.modules))
    from pipeline.cli import main
    sys.argv = ["pipeline", *sys.argv[1:]]
    main()
""")


def test_an_up_to_date_extract_still_loads_no_tensorflow(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=1)
    args = ["extract", root, "--out", tmp_path / "f", "--weights", "random", "--image-size", "32", "--tap", "vgg16:block1_pool"]
    run_cli(*args)
    done = subprocess.run([sys.executable, "-c", UP_TO_DATE_RERUN, *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout and "TENSORFLOW False" in done.stdout


def test_tests_ask_for_memory_growth_too():
    """Two pytest-xdist workers share a GPU: conftest asks for growth in every worker (and its children)."""
    assert os.environ.get(devices.GROWTH_VARIABLE) == "true"


# --- what the GPUs are


def fake_nvidia_smi(tmp_path, monkeypatch, script):
    """Put an `nvidia-smi` shell script first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + script)
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_nvidia_smi_gpus_are_parsed(tmp_path, monkeypatch):
    fake_nvidia_smi(
        tmp_path,
        monkeypatch,
        'echo "0, NVIDIA A100-SXM4-80GB, 81920, 8.0, 550.54.15"\necho "1, Tesla P4, 7680, 6.1, 550.54.15"\n',
    )
    smi = devices.nvidia_smi()
    assert smi.installed and not smi.error
    assert [(g["name"], g["memory_mib"], g["compute_capability"]) for g in smi.gpus] == [
        ("NVIDIA A100-SXM4-80GB", 81920, (8, 0)),
        ("Tesla P4", 7680, (6, 1)),
    ]


def test_an_old_driver_without_compute_cap_is_asked_again_without_it(tmp_path, monkeypatch):
    fake_nvidia_smi(
        tmp_path,
        monkeypatch,
        textwrap.dedent("""\
        case "$1" in *compute_cap*) echo 'Field "compute_cap" is not a valid field to query.'; exit 2;; esac
        echo "0, Tesla K80, 11441, 470.82.01"
    """),
    )
    (gpu,) = devices.nvidia_smi().gpus
    assert (gpu["name"], gpu["compute_capability"], gpu["driver"]) == ("Tesla K80", None, "470.82.01")


def test_a_broken_driver_is_an_error_not_a_gpu_list(tmp_path, monkeypatch):
    fake_nvidia_smi(
        tmp_path, monkeypatch, 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9\n'
    )
    smi = devices.nvidia_smi()
    assert smi.installed and smi.gpus == () and "couldn't communicate with the NVIDIA driver" in smi.error


def test_no_nvidia_smi_means_no_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert devices.nvidia_smi() == devices.NvidiaSmi(installed=False)
    assert devices.unseen_gpus_warning(False) is None


def test_extract_warns_loudly_when_nvidia_smi_lists_a_gpu_tensorflow_cannot_see(tmp_path, monkeypatch, image_tree, run_cli):
    fake_nvidia_smi(tmp_path, monkeypatch, 'echo "0, Tesla T4, 15360, 7.5, 535.104.05"\n')
    root = image_tree(per_class=1)
    result = run_cli(
        "extract",
        root,
        "--out",
        tmp_path / "f",
        "--weights",
        "random",
        "--image-size",
        32,
        "--precision",
        "float32",
        "--tap",
        "vgg16:block1_pool",
    )
    assert (
        "WARNING: nvidia-smi lists 1 NVIDIA GPU(s) (Tesla T4) but TensorFlow sees none, so this runs on the CPU" in result.output
    )


@pytest.mark.parametrize(
    "details, expected",
    [
        ({"device_name": "Tesla P4", "compute_capability": (6, 1)}, "float32"),
        ({"device_name": "Tesla V100", "compute_capability": (7, 0)}, "mixed_float16"),
        ({"device_name": "NVIDIA H100", "compute_capability": (9, 0)}, "mixed_float16"),
        ({}, "mixed_float16"),  # unknown capability: taken as a modern GPU
    ],
)
def test_auto_precision_follows_the_gpu_s_compute_capability(monkeypatch, details, expected):
    import tensorflow as tf

    fake = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [fake] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: details)
    gpus = devices.tensorflow_gpus()
    config = backbones.resolve(ExtractConfig(), bool(gpus), frozenset({"avx512_bf16"}), devices.compute_capability(gpus))
    assert (config.precision, config.xla) == (expected, True)


def test_the_slowest_gpu_decides():
    gpus = [devices.TensorFlowGpu("a", "", (8, 0)), devices.TensorFlowGpu("b", "", (6, 1)), devices.TensorFlowGpu("c", "", None)]
    assert devices.compute_capability(gpus) == (6, 1)
    assert devices.compute_capability([]) is None
