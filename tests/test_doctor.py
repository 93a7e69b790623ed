"""`pipeline doctor` on a GPU box, a box whose TensorFlow cannot see its GPU, an old GPU and a CPU box (mocked devices)."""

import re

import pytest

from pipeline import devices, doctor

A100 = {"index": "0", "name": "NVIDIA A100-SXM4-80GB", "memory_mib": 81920, "compute_capability": (8, 0), "driver": "550.54.15"}
P4 = {"index": "0", "name": "Tesla P4", "memory_mib": 7680, "compute_capability": (6, 1), "driver": "550.54.15"}
CUDA_BUILD = {"is_cuda_build": True, "cuda_version": "12.5.1", "cudnn_version": "9"}
CPU_BUILD = {"is_cuda_build": False}


def probe_result(device="GPU:0", determinism=True, xla=True):
    return {
        "device": device,
        "gpu_memory": {"GPU:0": 79 << 30} if device.startswith("GPU") else {},
        "determinism": {
            "ok": determinism,
            "detail": "two runs gave the same bytes (0.1 s)" if determinism else "UnimplementedError: no deterministic kernel",
        },
        "xla": {"ok": xla, "detail": "compiled and ran in 0.5 s" if xla else "InternalError: Couldn't get ptxas version"},
    }


@pytest.fixture
def machine(monkeypatch):
    """Factory: mock what doctor asks the machine (nvidia-smi, TensorFlow's GPUs and build, packages, the probe)."""
    import tensorflow as tf

    def make(smi=devices.NvidiaSmi(installed=False), gpus=(), build=CPU_BUILD, probe=None, packages=None):
        monkeypatch.setattr(devices, "nvidia_smi", lambda: smi)
        monkeypatch.setattr(devices, "tensorflow_gpus", lambda: list(gpus))
        monkeypatch.setattr(tf.sysconfig, "get_build_info", lambda: build)
        monkeypatch.setattr(doctor, "run_probe", lambda: probe or probe_result(device="CPU:0"))
        installed = packages or {"tensorflow-cpu": "2.21.0", "ray": "2.60.0"}
        monkeypatch.setattr(doctor, "_version", lambda name: installed.get(name))

    return make


def row(output, topic):
    """The status and value of the table row about `topic`."""
    match = re.search(rf"^(\S+)\s+{re.escape(topic)}\s+(.*)$", output, re.MULTILINE)
    assert match, f"no {topic!r} row in:\n{output}"
    return match.group(1), match.group(2)


def test_a_gpu_box_passes_and_says_what_auto_picks(machine, run_cli, tmp_path):
    machine(
        smi=devices.NvidiaSmi(installed=True, gpus=(A100,)),
        gpus=[devices.TensorFlowGpu("/physical_device:GPU:0", "NVIDIA A100-SXM4-80GB", (8, 0))],
        build=CUDA_BUILD,
        probe=probe_result(),
        packages={"tensorflow": "2.21.0", "nvidia-cudnn-cu12": "9.3.0.75"},
    )
    out = run_cli("doctor", "--out", tmp_path).output
    assert row(out, "nvidia-smi GPU 0") == ("ok", "NVIDIA A100-SXM4-80GB, 80 GiB, compute 8.0, driver 550.54.15")
    assert row(out, "TensorFlow GPU:0") == ("ok", "NVIDIA A100-SXM4-80GB, compute 8.0")
    assert row(out, "TensorFlow build") == ("info", "CUDA 12.5.1, cuDNN 9")
    assert "nvidia-cudnn-cu12 9.3.0.75" in out
    assert row(out, "--precision auto") == ("info", "mixed_float16")
    assert "the GPU's compute capability 8.0 has float16 tensor cores" in out
    assert row(out, "--xla default") == ("info", "on")
    assert row(out, "op determinism")[0] == "ok" and row(out, "XLA compile")[0] == "ok"
    assert row(out, "TensorFlow GPU:0 memory") == ("info", "79.0 GiB usable by TensorFlow")
    assert row(out, "free space")[1].endswith(str(tmp_path))
    assert "no problems found" in out


def test_a_gpu_tensorflow_cannot_see_fails(machine, run_cli):
    machine(smi=devices.NvidiaSmi(installed=True, gpus=(A100,)), gpus=[], build=CPU_BUILD)
    result = run_cli("doctor", code=1)
    assert row(result.output, "TensorFlow GPUs") == ("FAIL", "none, though nvidia-smi lists 1")
    assert row(result.output, "TensorFlow for the GPUs") == (
        "FAIL",
        "this TensorFlow is a CPU-only build",
    )  # the cause, with the fix
    assert "make install TF_EXTRA=gpu" in result.output
    assert "Error: 2 problem(s) for a GPU run: TensorFlow for the GPUs; TensorFlow GPUs" in result.output


def test_a_broken_driver_fails(machine, run_cli):
    machine(
        smi=devices.NvidiaSmi(
            installed=True, error="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
        )
    )
    result = run_cli("doctor", code=1)
    assert row(result.output, "nvidia-smi")[0] == "FAIL"


def test_an_old_driver_for_the_cuda_build_is_a_warning(machine, run_cli):
    old = {**A100, "driver": "470.82.01"}
    machine(
        smi=devices.NvidiaSmi(installed=True, gpus=(old,)),
        gpus=[devices.TensorFlowGpu("/physical_device:GPU:0", "A100", (8, 0))],
        build=CUDA_BUILD,
        probe=probe_result(),
    )
    out = run_cli("doctor").output
    assert row(out, "NVIDIA driver") == ("warn", "470.82.01 is older than 525.60.13, the oldest CUDA 12 runs on")


def test_a_gpu_without_float16_tensor_cores_gets_float32(machine, run_cli):
    machine(
        smi=devices.NvidiaSmi(installed=True, gpus=(P4,)),
        gpus=[devices.TensorFlowGpu("/physical_device:GPU:0", "Tesla P4", (6, 1))],
        build=CUDA_BUILD,
        probe=probe_result(),
    )
    out = run_cli("doctor").output
    assert row(out, "TensorFlow GPU:0")[0] == "warn" and "no float16 tensor cores" in out
    assert row(out, "--precision auto") == ("info", "float32")
    assert "compute capability 6.1 is below 7.0" in out


def test_failing_compute_checks_fail_on_a_gpu(machine, run_cli):
    machine(
        smi=devices.NvidiaSmi(installed=True, gpus=(A100,)),
        gpus=[devices.TensorFlowGpu("/physical_device:GPU:0", "A100", (8, 0))],
        build=CUDA_BUILD,
        probe=probe_result(determinism=False, xla=False),
    )
    result = run_cli("doctor", code=1)
    assert row(result.output, "op determinism") == ("FAIL", "UnimplementedError: no deterministic kernel on GPU:0")
    assert row(result.output, "XLA compile") == ("FAIL", "InternalError: Couldn't get ptxas version")
    assert "pass --no-xla" in result.output


def test_a_probe_that_dies_fails(machine, run_cli):
    machine(probe={"error": "Fatal Python error: Aborted"})
    assert row(run_cli("doctor", code=1).output, "compute check") == ("FAIL", "the tiny model did not run")


def test_both_tensorflow_packages_fail(machine, run_cli):
    machine(packages={"tensorflow": "2.21.0", "tensorflow-cpu": "2.21.0"})
    result = run_cli("doctor", code=1)
    assert row(result.output, "TensorFlow packages") == ("FAIL", "tensorflow and tensorflow-cpu are both installed")


def test_require_gpu_fails_on_a_cpu_box(machine, run_cli):
    machine()
    assert row(run_cli("doctor", "--require-gpu", code=1).output, "TensorFlow GPUs")[0] == "FAIL"


def test_the_weights_cache_lists_what_is_there(machine, run_cli, tmp_path, monkeypatch):
    machine()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"\0" * 3_000_000)
    out = run_cli("doctor").output
    assert row(out, "vgg16 ImageNet weights")[0] == "ok" and "(3 MB)" in out
    assert row(out, "resnet50 ImageNet weights") == ("info", f"not in {tmp_path / 'models'}")


def test_a_cpu_box_passes_with_the_real_compute_checks(run_cli, monkeypatch, tmp_path):
    """No mocks but nvidia-smi's absence: the probe really runs a tiny model in a child process here."""
    monkeypatch.setattr(devices, "nvidia_smi", lambda: devices.NvidiaSmi(installed=False))
    out = run_cli("doctor", "--out", tmp_path / "not-yet" / "features").output
    assert row(out, "TensorFlow GPUs") == ("info", "none: stage one runs on the CPU")
    assert row(out, "op determinism")[1].startswith("two runs gave the same bytes")
    assert row(out, "XLA compile")[0] == "ok"
    assert row(out, "--xla default") == ("info", "off")
    assert row(out, "free space")[1].endswith(str(tmp_path))
    assert "no problems found" in out
