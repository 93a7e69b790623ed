"""Process-wide device options, set once before TensorFlow runs its first op; and what GPUs the machine has.

TensorFlow fixes its device options when it initialises its devices (at the first op, variable or
model): asked later, `set_memory_growth` raises RuntimeError and the process keeps the whole GPU.
So every command that runs TensorFlow calls `configure` first (cli.TensorFlowCommand), and so does
every process that computes shards without the CLI (a Ray actor builds a ShardWorker). This module
imports TensorFlow only inside its functions, so importing it is free.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass

# TensorFlow's GPU allocator reads this when it creates a device; child processes (local Ray actors,
# loky workers, subprocesses) inherit it, so they grow their memory too without calling `configure`.
GROWTH_VARIABLE = "TF_FORCE_GPU_ALLOW_GROWTH"
FLOAT16_TENSOR_CORES = (7, 0)  # compute capability from which a GPU has float16 tensor cores (Volta)
NVIDIA_SMI_TIMEOUT_S = 20
_NVIDIA_SMI_FIELDS = ("index", "name", "memory.total", "compute_cap", "driver_version")


def request_memory_growth():
    """Ask for on-demand GPU memory through the environment (unless the user set the variable); imports nothing."""
    os.environ.setdefault(GROWTH_VARIABLE, "true")


def configure() -> list[str]:
    """Set the process-wide device options (XLA's program cache, TF32 off, GPU memory growth); return a sentence per option that could not be set.

    Call it before anything runs a TensorFlow op. Calling it again is harmless: an option already
    set to the same value is not set twice. A user's own `TF_FORCE_GPU_ALLOW_GROWTH=false` wins.
    """
    from pipeline import backbones

    backbones.persist_xla_programs()  # first: listing the devices fixes XLA's flags
    backbones.disable_tf32()  # float32 (the fidelity twin, --precision float32, predict) computes in float32
    request_memory_growth()
    if os.environ[GROWTH_VARIABLE].lower() == "false":
        return []
    import tensorflow as tf

    problems = []
    for gpu in _physical_gpus(tf):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            problems.append(
                f"TensorFlow had initialised {gpu.name} before memory growth could be asked for, so this process may hold all "
                f"of its memory; start the work in a fresh process (or set {GROWTH_VARIABLE}=true before Python starts)"
            )
    return problems


def _physical_gpus(tf):
    return tf.config.list_physical_devices("GPU")


@dataclass(frozen=True)
class TensorFlowGpu:
    """A GPU TensorFlow can use."""

    name: str  # "/physical_device:GPU:0"
    model: str  # "NVIDIA A100-SXM4-80GB", or "" when TensorFlow does not say
    compute_capability: tuple | None  # (major, minor)


def tensorflow_gpus() -> list[TensorFlowGpu]:
    """The GPUs TensorFlow sees, with the model name and compute capability it reports (lists them; initialises nothing)."""
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append(TensorFlowGpu(device.name, details.get("device_name", ""), tuple(capability) if capability else None))
    return gpus


def compute_capability(gpus) -> tuple | None:
    """The lowest compute capability among `gpus` (the slowest decides a shared policy); None when none is known."""
    known = [gpu.compute_capability for gpu in gpus if gpu.compute_capability]
    return min(known) if known else None


@dataclass(frozen=True)
class NvidiaSmi:
    """What `nvidia-smi` says: installed or not, the GPUs it lists, or why it failed."""

    installed: bool
    gpus: tuple = ()  # ({index, name, memory_mib, compute_capability, driver}, ...)
    error: str = ""


def nvidia_smi() -> NvidiaSmi:
    """Ask `nvidia-smi` for its GPUs (older drivers know no compute_cap field: then it is asked without it)."""
    if shutil.which("nvidia-smi") is None:
        return NvidiaSmi(installed=False)
    for fields in (_NVIDIA_SMI_FIELDS, tuple(f for f in _NVIDIA_SMI_FIELDS if f != "compute_cap")):
        try:
            completed = subprocess.run(
                ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=NVIDIA_SMI_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return NvidiaSmi(installed=True, error=str(e))
        if completed.returncode == 0:
            return NvidiaSmi(
                installed=True, gpus=tuple(_parse_gpu(line, fields) for line in completed.stdout.splitlines() if line.strip())
            )
    message = (completed.stdout + completed.stderr).strip().splitlines()
    return NvidiaSmi(installed=True, error=message[0] if message else f"exit status {completed.returncode}")


def _parse_gpu(line, fields):
    values = dict(zip(fields, (value.strip() for value in line.split(","))))
    capability = values.get("compute_cap", "")
    return {
        "index": values["index"],
        "name": values["name"],
        "memory_mib": int(values["memory.total"]) if values["memory.total"].isdigit() else None,
        "compute_capability": tuple(int(part) for part in capability.split("."))
        if capability.replace(".", "").isdigit()
        else None,
        "driver": values["driver_version"],
    }


def unseen_gpus_warning(tensorflow_sees_gpus: bool) -> str | None:
    """A sentence when `nvidia-smi` lists NVIDIA GPUs but TensorFlow sees none (the work would silently run on the CPU)."""
    if tensorflow_sees_gpus:
        return None
    smi = nvidia_smi()
    if not smi.gpus:
        return None
    names = ", ".join(sorted({gpu["name"] for gpu in smi.gpus}))
    return (
        f"nvidia-smi lists {len(smi.gpus)} NVIDIA GPU(s) ({names}) but TensorFlow sees none, so this runs on the CPU, "
        "many times slower; usually the tensorflow-cpu package is installed or TensorFlow's CUDA/cuDNN do not match the "
        "driver: `pipeline doctor` says which (`make install TF_EXTRA=gpu` installs the GPU build)"
    )
