"""`pipeline doctor`: what this machine gives stage one, and what a GPU run would miss.

Each check is a Finding (topic, status, value, hint). FAIL means a GPU run, or one the user asked
for, cannot work as it should here: the command then exits non-zero. The compute checks (op
determinism, XLA compile) run a tiny model in a child process, because op determinism cannot be
turned off again in a process and a broken CUDA install may abort the process that tries.
"""

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import devices
from pipeline.errors import first_line

OK, INFO, WARN, FAIL = "ok", "info", "warn", "FAIL"
LOW_SPACE_BYTES = 1 << 30
PROBE_TIMEOUT_S = 300
# The oldest Linux driver each CUDA major version runs on (NVIDIA's minor-version compatibility table).
MIN_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13)}
_REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
_CUDA_WHEELS = ("nvidia-cuda-runtime-cu12", "nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-cuda-nvcc-cu12")


@dataclass(frozen=True)
class Finding:
    topic: str
    status: str  # OK, INFO, WARN or FAIL
    value: str
    hint: str = ""  # what to do about it


def diagnose(out=".", require_gpu=False, probe=None) -> list[Finding]:
    """Every finding about this machine; `probe()` gives the compute checks (default: a child process runs them)."""
    import keras
    import tensorflow as tf

    from pipeline import backbones
    from pipeline.config import ExtractConfig

    findings = [Finding("python", INFO, f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")]
    findings += _tensorflow(tf, keras)
    smi = devices.nvidia_smi()
    build = tf.sysconfig.get_build_info()
    findings += _nvidia_smi(smi, build)
    gpus = devices.tensorflow_gpus()
    findings += _tensorflow_gpus(gpus, smi, require_gpu)

    flags = backbones.cpu_flags()
    shown = [flag for flag in _REPORTED_FLAGS if flag in flags]
    findings.append(Finding("CPU flags", INFO, ", ".join(shown) or "none of " + ", ".join(_REPORTED_FLAGS)))
    capability = devices.compute_capability(gpus)
    resolved = backbones.resolve(ExtractConfig(), bool(gpus), flags, capability)
    findings.append(
        Finding("--precision auto", INFO, resolved.precision, _precision_reason(gpus, capability, flags & backbones.BF16_FLAGS))
    )
    findings.append(
        Finding(
            "--xla default",
            INFO,
            "on" if resolved.xla else "off",
            "on with a GPU" if gpus else "off without a GPU; --xla turns it on",
        )
    )
    growth = os.environ.get(devices.GROWTH_VARIABLE, "")
    findings.append(
        Finding("GPU memory growth", INFO, "on" if growth.lower() != "false" else "off", f"{devices.GROWTH_VARIABLE}={growth}")
    )

    findings += _compute((probe or run_probe)(), bool(gpus))
    findings.append(_ray())
    findings += _weights_cache(backbones.IMAGENET_FILES, backbones.keras_cache_dir())
    findings.append(_free_space(Path(out)))
    return findings


def failed(findings):
    return [finding for finding in findings if finding.status == FAIL]


def _tensorflow(tf, keras):
    installed = {name: _version(name) for name in ("tensorflow", "tensorflow-cpu")}
    present = [f"{name} {version}" for name, version in installed.items() if version]
    findings = [Finding("TensorFlow", OK, f"{tf.__version__} ({', '.join(present) or 'no pip distribution'})")]
    if all(installed.values()):
        findings.append(
            Finding(
                "TensorFlow packages",
                FAIL,
                "tensorflow and tensorflow-cpu are both installed",
                "they overwrite each other's files: `pip uninstall -y tensorflow tensorflow-cpu`, then `make install` (or pip install -e '.[gpu]')",
            )
        )
    build = tf.sysconfig.get_build_info()
    if build.get("is_cuda_build"):
        wheels = ", ".join(f"{name} {_version(name)}" for name in _CUDA_WHEELS if _version(name))
        findings.append(
            Finding(
                "TensorFlow build",
                INFO,
                f"CUDA {build.get('cuda_version', '?')}, cuDNN {build.get('cudnn_version', '?')}",
                f"pip CUDA libraries: {wheels}" if wheels else "no pip CUDA libraries: the system's must match",
            )
        )
    else:
        findings.append(Finding("TensorFlow build", INFO, "CPU only (no CUDA)"))
    findings.append(Finding("Keras", INFO, keras.__version__))
    return findings


def _nvidia_smi(smi, build):
    if not smi.installed:
        return [Finding("nvidia-smi", INFO, "not installed: no NVIDIA driver here, stage one runs on the CPU")]
    if smi.error:
        return [Finding("nvidia-smi", FAIL, f"failed: {smi.error}", "the NVIDIA driver is not working; no GPU run can start")]
    if not smi.gpus:
        return [Finding("nvidia-smi", INFO, "lists no GPU")]
    findings = []
    for gpu in smi.gpus:
        memory = f"{gpu['memory_mib'] / 1024:.0f} GiB" if gpu["memory_mib"] else "memory ?"
        capability = _capability(gpu["compute_capability"])
        findings.append(
            Finding(
                f"nvidia-smi GPU {gpu['index']}", OK, f"{gpu['name']}, {memory}, compute {capability}, driver {gpu['driver']}"
            )
        )
    if not build.get("is_cuda_build"):
        findings.append(
            Finding(
                "TensorFlow for the GPUs",
                FAIL,
                "this TensorFlow is a CPU-only build",
                "install the GPU build: `make install TF_EXTRA=gpu` (it removes tensorflow-cpu first)",
            )
        )
    findings += _driver(smi.gpus[0]["driver"], build.get("cuda_version", ""))
    return findings


def _driver(driver, cuda_version):
    """A WARN when the driver is older than the one the CUDA version TensorFlow was built for needs."""
    try:
        have = tuple(int(part) for part in driver.split("."))
        major = int(cuda_version.split(".")[0])
    except ValueError:
        return []
    need = MIN_DRIVER.get(major)
    if need is None or have >= need:
        return []
    return [
        Finding(
            "NVIDIA driver",
            WARN,
            f"{driver} is older than {'.'.join(map(str, need))}, the oldest CUDA {major} runs on",
            "TensorFlow was built for CUDA " + cuda_version + "; update the driver",
        )
    ]


def _tensorflow_gpus(gpus, smi, require_gpu):
    if not gpus:
        if smi.gpus:
            return [
                Finding(
                    "TensorFlow GPUs",
                    FAIL,
                    f"none, though nvidia-smi lists {len(smi.gpus)}",
                    "stage one would run on the CPU: check the TensorFlow build and CUDA/cuDNN above, and `make install TF_EXTRA=gpu`",
                )
            ]
        status = FAIL if require_gpu else INFO
        return [
            Finding(
                "TensorFlow GPUs", status, "none: stage one runs on the CPU", "--require-gpu asked for one" if require_gpu else ""
            )
        ]
    findings = []
    for gpu in gpus:
        old = gpu.compute_capability is not None and gpu.compute_capability < devices.FLOAT16_TENSOR_CORES
        findings.append(
            Finding(
                f"TensorFlow {gpu.name.removeprefix('/physical_device:')}",
                WARN if old else OK,
                f"{gpu.model or 'unnamed'}, compute {_capability(gpu.compute_capability)}",
                "no float16 tensor cores: --precision auto picks float32" if old else "",
            )
        )
    return findings


def _precision_reason(gpus, capability, bf16_flags):
    if gpus:
        if capability is None:
            return "a GPU of unknown compute capability: taken as one with float16 tensor cores"
        if capability < devices.FLOAT16_TENSOR_CORES:
            return f"the GPU's compute capability {_capability(capability)} is below 7.0: no float16 tensor cores"
        return f"the GPU's compute capability {_capability(capability)} has float16 tensor cores"
    if bf16_flags:
        return f"no GPU; the CPU has bfloat16 units ({', '.join(sorted(bf16_flags))})"
    return "no GPU and no bfloat16 units on the CPU"


def _compute(result, gpu):
    """Findings from the probe's result: {"device", "determinism": {ok, detail}, "xla": {ok, detail}} or {"error"}."""
    if "error" in result:
        return [Finding("compute check", FAIL, "the tiny model did not run", result["error"])]
    findings = []
    memory = result.get("gpu_memory") or {}
    for device, limit in memory.items():
        findings.append(Finding(f"TensorFlow {device} memory", INFO, f"{limit / (1 << 30):.1f} GiB usable by TensorFlow"))
    determinism = result["determinism"]
    findings.append(
        Finding(
            "op determinism",
            OK if determinism["ok"] else FAIL,
            f"{determinism['detail']} on {result['device']}",
            "" if determinism["ok"] else "extract enables op determinism on a GPU; this run would fail or differ between reruns",
        )
    )
    xla = result["xla"]
    if xla["ok"]:
        findings.append(Finding("XLA compile", OK, f"{xla['detail']} on {result['device']}"))
    else:
        needed = "extract uses XLA on a GPU by default: pass --no-xla" if gpu else "only --xla needs it"
        findings.append(Finding("XLA compile", FAIL if gpu else WARN, xla["detail"], needed))
    return findings


def _ray():
    version = _version("ray")
    if version and importlib.util.find_spec("ray"):
        return Finding("Ray", OK, version)
    return Finding("Ray", INFO, "not installed", "--engine ray needs it: pip install -e '.[ray]' (or EXTRAS=ray for make)")


def _weights_cache(files, cache):
    findings = []
    for backbone, name in files.items():
        path = cache / name
        if path.is_file():
            findings.append(Finding(f"{backbone} ImageNet weights", OK, f"{path} ({path.stat().st_size / 1e6:.0f} MB)"))
        else:
            findings.append(
                Finding(
                    f"{backbone} ImageNet weights",
                    INFO,
                    f"not in {cache}",
                    "--weights imagenet downloads them on first use (needs the network); or copy the file there (KERAS_HOME)",
                )
            )
    return findings


def _free_space(out):
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    status = WARN if free < LOW_SPACE_BYTES else OK
    return Finding(
        "free space",
        status,
        f"{free / (1 << 30):.1f} GiB at {existing}",
        "features need room: see README, Formats" if status == WARN else "",
    )


def _capability(capability):
    return ".".join(map(str, capability)) if capability else "?"


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- the compute checks, in a child process --------------------------------------------------


def run_probe():
    """`probe()` in a fresh Python process; its JSON, or {"error": ...} when the process fails."""
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "pipeline.doctor"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {PROBE_TIMEOUT_S} s"}
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr.strip().splitlines() or [f"exit status {completed.returncode}"])[-1]
        return {"error": tail}
    return json.loads(lines[-1])


def probe():
    """Run a tiny conv model twice under op determinism and once XLA-compiled; compare the bytes.

    The determinism check passes when both runs give the same bytes; the XLA one when the compiled
    program runs and agrees with the plain one within float32 rounding.
    """
    devices.configure()
    import keras
    import numpy as np
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4),
        ]
    )
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32))
    result = {"device": "", "gpu_memory": _gpu_memory()}
    started = time.perf_counter()
    try:
        first = model(images, training=False)
        result["device"] = first.device.rsplit("/", 1)[-1].removeprefix("device:")
        same = np.array_equal(first.numpy(), model(images, training=False).numpy())
        detail = f"two runs gave {'the same' if same else 'different'} bytes ({time.perf_counter() - started:.1f} s)"
        result["determinism"] = {"ok": same, "detail": detail}
    except Exception as e:  # a kernel without a deterministic variant raises here: that is the finding
        result["determinism"] = {"ok": False, "detail": f"{type(e).__name__}: {first_line(e)}"}
        first = None
    started = time.perf_counter()
    try:
        compiled = tf.function(lambda x: model(x, training=False), jit_compile=True)(images).numpy()
        reference = first.numpy() if first is not None else compiled
        error = float(np.max(np.abs(compiled - reference)) / max(float(np.max(np.abs(reference))), 1e-30))
        result["xla"] = {
            "ok": error < 1e-3,
            "detail": f"compiled and ran in {time.perf_counter() - started:.1f} s, relative difference {error:.1e}",
        }
    except Exception as e:  # e.g. ptxas or libdevice missing: the compile fails here
        result["xla"] = {"ok": False, "detail": f"{type(e).__name__}: {first_line(e)}"}
    return result


def _gpu_memory():
    """{device: bytes TensorFlow's allocator may use} per GPU (device_lib creates the devices, with growth on)."""
    try:
        from tensorflow.python.client import device_lib  # not public API: without it, no memory figures

        local = device_lib.list_local_devices()
    except Exception:
        return {}
    return {device.name.removeprefix("/device:"): int(device.memory_limit) for device in local if device.device_type == "GPU"}


if __name__ == "__main__":
    print(json.dumps(probe()))
