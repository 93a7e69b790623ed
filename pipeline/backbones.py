"""Backbones and their taps: the tap catalogue, weights, precision policy and the fused tap model."""

import contextlib
import dataclasses
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.config import WeightSource, tap_backbone, tap_layer
from pipeline.devices import FLOAT16_TENSOR_CORES
from pipeline.errors import PipelineError
from pipeline.errors import first_line as _first_line
from pipeline.layers import caffe_preprocessing

_APPLICATIONS = {"resnet50": keras.applications.ResNet50, "vgg16": keras.applications.VGG16}
IMAGENET_FILES = {
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "vgg16": "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
}
# Random weights: He-normal kernels, identity batch norm, except the last batch norm of each
# ResNet residual branch, damped so 16 stacked additions stay far inside float16's range.
_RESIDUAL_BRANCH_GAMMA = 0.2


@dataclass(frozen=True)
class TapInfo:
    """One tappable layer: its key, output shape at a given image size, and stride."""

    key: str  # "backbone/layer"
    height: int
    width: int
    channels: int
    stride: int  # input pixels per output pixel


def build_backbone(name, image_size, policy="float32"):
    """The full convolutional trunk (no classifier), computing under `policy`, weights not yet loaded."""
    with dtype_policy(policy):
        return _APPLICATIONS[name](include_top=False, weights=None, input_shape=(image_size, image_size, 3))


@contextlib.contextmanager
def dtype_policy(policy):
    """Keras' global dtype policy set to `policy` for the layers built in the block."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def tap_catalogue(name, trunk):
    """Every layer of a built trunk with a spatial (4-D) output, in graph order."""
    image_size = trunk.input.shape[1]
    taps = []
    for layer in trunk.layers[1:]:
        shape = layer.output.shape
        if len(shape) == 4:
            taps.append(TapInfo(f"{name}/{layer.name}", shape[1], shape[2], shape[3], image_size // shape[1]))
    return taps


def check_taps(taps, trunks):
    """Return {key: TapInfo} for the requested taps; an unknown one fails naming the valid ones."""
    found = {}
    for backbone, trunk in trunks.items():
        catalogue = {info.key: info for info in tap_catalogue(backbone, trunk)}
        for tap in (t for t in taps if tap_backbone(t) == backbone):
            if tap not in catalogue:
                valid = ", ".join(tap_layer(k) for k in catalogue)
                raise PipelineError(f"unknown tap {tap!r}; valid {backbone} layers are: {valid}")
            found[tap] = catalogue[tap]
    return {t: found[t] for t in taps}


# --- precision -----------------------------------------------------------------------------


BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # CPU flags of bfloat16 units


def cpu_flags():
    """The CPU feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def choose_policy(requested, gpu, flags, compute_capability=None):
    """`auto`: mixed_float16 on a GPU with float16 tensor cores, mixed_bfloat16 on a CPU with bf16 units, float32 otherwise.

    A GPU below compute capability 7.0 (Pascal and older) has no float16 tensor cores: float16
    would only cost fidelity there. An unknown capability counts as a modern GPU.
    """
    if requested != "auto":
        return requested
    if gpu:
        old = compute_capability is not None and tuple(compute_capability) < FLOAT16_TENSOR_CORES
        return "float32" if old else "mixed_float16"
    if BF16_FLAGS & set(flags):
        return "mixed_bfloat16"
    return "float32"


def resolve(config, gpu, flags, compute_capability=None):
    """An ExtractConfig with `auto` choices replaced by what this machine gets (EXIF orientation: on), so the saved config says what ran."""
    policy = choose_policy(config.precision, gpu, flags, compute_capability)
    xla = gpu if config.xla is None else config.xla
    exif = True if config.exif_orientation is None else config.exif_orientation
    return dataclasses.replace(config, precision=policy, xla=xla, exif_orientation=exif)


def disable_tf32():
    """float32 computes in float32: TF32 (on by default on Ampere and later GPUs) keeps 10 mantissa bits in
    float32 matmuls and convolutions. Process-wide; float16 and bfloat16 compute does not use it."""
    tf.config.experimental.enable_tensor_float_32_execution(False)


XLA_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def persist_xla_programs():
    """Let XLA keep the programs it compiles in the Keras cache dir (`$KERAS_HOME/xla`), where later processes and
    Ray actors on this machine find them instead of compiling again. Takes effect only before TensorFlow reads its
    XLA flags, which listing the devices already does; a directory already set in TF_XLA_FLAGS is kept."""
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if XLA_CACHE_FLAG not in flags:
        os.environ["TF_XLA_FLAGS"] = f"{flags} {XLA_CACHE_FLAG}={keras_cache_dir().parent / 'xla'}".strip()


def device_record(gpu, forward, op_determinism):
    """What computes the features, as a shard records it: another GPU model or library version can give other bytes.

    `forward` says how the forward pass runs: "xla", "traced" or "eager"; `op_determinism` whether TensorFlow's is on.
    """
    build = tf.sysconfig.get_build_info()
    if gpu:
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        capability = details.get("compute_capability")
        name = details.get("device_name", "GPU") + (
            f" (compute capability {capability[0]}.{capability[1]})" if capability else ""
        )
    else:
        name = _cpu_model() or "CPU"
    return {
        "device": name,
        "tensorflow": f"{tf.__version__} ({tf.version.GIT_VERSION})",  # XLA is built into TensorFlow: its version too
        "cuda": build.get("cuda_version") if gpu else None,
        "cudnn": build.get("cudnn_version") if gpu else None,
        "forward": forward,
        "op_determinism": op_determinism,
    }


def _cpu_model():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)


# --- weights -------------------------------------------------------------------------------


def keras_cache_dir():
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def load_weights(model, name, source: WeightSource):
    """Fill `model` (a full trunk from build_backbone) with weights from `source`."""
    if source.kind == "random":
        _randomize(model, name, source.seed)
    elif source.kind == "imagenet":
        try:
            reference = _APPLICATIONS[name](include_top=False, weights="imagenet", input_shape=model.input.shape[1:])
        except Exception as e:  # keras raises a bare Exception when the download fails
            raise PipelineError(
                f"could not get ImageNet weights for {name} ({_first_line(e)}); put {IMAGENET_FILES[name]} "
                f"in {keras_cache_dir()} (KERAS_HOME), or pass --weights {name}=PATH, or use --weights random"
            ) from None
        model.set_weights(reference.get_weights())
    else:
        try:
            model.load_weights(source.path)
        except Exception as e:
            raise PipelineError(f"could not load {name} weights from {source.path}: {_first_line(e)}") from None


def _randomize(model, name, seed):
    """Seeded, deterministic weights (numpy's PCG64, independent of Keras' initialisers)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    for weight in model.weights:
        shape = tuple(weight.shape)
        if weight.path.endswith("/kernel"):
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        elif weight.path.endswith("_3_bn/gamma"):
            value = np.full(shape, _RESIDUAL_BRANCH_GAMMA, np.float32)
        else:
            continue  # biases 0, batch-norm identity: as built
        weight.assign(value)


def weights_fingerprint(model):
    """sha256 over every weight array of the model (names, shapes and float32 bytes)."""
    h = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight), dtype=np.float32)
        h.update(f"{weight.path}:{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def load_trunk_weights(trunks, weight_sources):
    """Fill every trunk from its WeightSource; return {backbone: {source, sha256}} as the manifest records it."""
    record = {}
    for name, source in weight_sources.items():
        load_weights(trunks[name], name, source)
        record[name] = {"source": source.to_record(), "sha256": weights_fingerprint(trunks[name])}
    return record


# --- the fused tap model --------------------------------------------------------------------

_POOLERS = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}


def tap_dim(channels, pooling):
    return 2 * channels if pooling == "avgmax" else channels


def build_tap_model(trunks, taps, pooling, image_size):
    """One model: RGB 0..255 images -> {tap key: pooled float32 (B, dim)}.

    `trunks` maps backbone -> full trunk (from build_backbone) with weights loaded; the model
    computes in the trunks' policy. Each is cut at its deepest requested tap (a functional model
    holds only the layers its outputs need). The shared caffe preprocessing runs once.
    """
    images = keras.Input((image_size, image_size, 3), dtype="float32", name="images")
    shared = caffe_preprocessing(images)
    outputs = {}
    for backbone, trunk in trunks.items():
        keys = [t for t in taps if tap_backbone(t) == backbone]
        cut = keras.Model(trunk.input, [trunk.get_layer(tap_layer(k)).output for k in keys], name=f"{backbone}_taps")
        for key, tensor in zip(keys, cut(shared)):
            outputs[key] = _pool(tensor, pooling, key.replace("/", "__"))
    return keras.Model(images, outputs, name="taps")


def float32_twin(trunks, config):
    """The float32 tap model with the same taps and weights as `trunks`, for the fidelity check.

    It runs eagerly on a few rows per shard, so it is not traced.
    """
    twins = {}
    for name, trunk in trunks.items():
        twins[name] = build_backbone(name, config.image_size)
        twins[name].set_weights(trunk.get_weights())
    return build_tap_model(twins, config.taps, config.pooling, config.image_size)


def compile_forward(model, image_size, xla, batch_size=None, trace=False):
    """`model(x, training=False)` as one tf.function over float32 (B, S, S, 3) batches.

    Without XLA the batch size is free, so the last, shorter batch of a shard reuses the trace.
    XLA compiles one program per shape, so with XLA every batch is padded to `batch_size` and
    the padding's rows are cut from the outputs. `trace` traces now rather than at the first call.
    """
    if not xla:
        signature = [tf.TensorSpec((None, image_size, image_size, 3), tf.float32)]
        forward = tf.function(lambda images: model(images, training=False), input_signature=signature, autograph=False)
        if trace:
            forward.get_concrete_function()
        return forward
    signature = [tf.TensorSpec((batch_size, image_size, image_size, 3), tf.float32)]
    fixed = tf.function(
        lambda images: model(images, training=False), jit_compile=True, input_signature=signature, autograph=False
    )
    if trace:
        fixed.get_concrete_function()

    def padded(images):
        rows = int(images.shape[0])
        if rows == batch_size:
            return fixed(images)
        filler = tf.zeros((batch_size - rows, image_size, image_size, 3), tf.float32)
        return {key: value[:rows] for key, value in fixed(tf.concat([images, filler], axis=0)).items()}

    return padded


def _pool(tensor, pooling, name):
    """Global pooling computed in float32 whatever the compute policy."""
    if pooling == "avgmax":
        parts = [_POOLERS[p](dtype="float32", name=f"{name}_{p}")(tensor) for p in ("avg", "max")]
        return keras.layers.Concatenate(dtype="float32", name=f"{name}_avgmax")(parts)
    return _POOLERS[pooling](dtype="float32", name=f"{name}_{pooling}")(tensor)
