"""Frozen run configurations, their defaults, and the hash that names a configuration."""

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

BACKBONES = ("resnet50", "vgg16")
POOLINGS = ("avg", "max", "avgmax")
RESIZES = ("squash", "center-crop")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STORAGE_DTYPES = ("float32", "float16")
ON_ERROR = ("skip", "fail")
DEFAULT_TAPS = (
    "resnet50/conv4_block6_out",
    "resnet50/conv5_block3_out",
    "vgg16/block4_conv3",
    "vgg16/block5_conv3",
)


def parse_tap(text):
    """'resnet50:conv4_block6_out' or 'resnet50/conv4_block6_out' -> 'resnet50/conv4_block6_out'."""
    backbone, sep, layer = text.replace(":", "/", 1).partition("/")
    if not sep or not layer or backbone not in BACKBONES:
        raise PipelineError(
            f"tap {text!r} is not BACKBONE:LAYER with BACKBONE one of {', '.join(BACKBONES)} "
            "(run `pipeline taps` for the layers)"
        )
    return f"{backbone}/{layer}"


def tap_backbone(tap):
    return tap.split("/", 1)[0]


def tap_layer(tap):
    return tap.split("/", 1)[1]


class _Config:
    """What every run configuration shares: a JSON-ready dict and a hash that names it."""

    _UNHASHED = ()  # fields that do not change what a run writes

    def to_dict(self):
        return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()}

    def sha256(self):
        return sha256_json({key: value for key, value in self.to_dict().items() if key not in self._UNHASHED})


@dataclass(frozen=True)
class ExtractConfig(_Config):
    """Everything that decides the bytes stage one writes."""

    _UNHASHED = ("on_error",)  # it only decides whether a run stops

    taps: tuple[str, ...] = DEFAULT_TAPS  # "backbone/layer"; each backbone is cut at its deepest tap
    pooling: str = "avg"  # global pooling of each tap: avg, max, or both concatenated
    image_size: int = 224  # square input side in pixels (ImageNet size)
    resize: str = "squash"  # squash to square, or center-crop to square first
    fast_decode: bool = False  # decode large JPEGs at the smallest DCT scale (1/2..1/8) covering image_size
    batch_size: int = 64  # images per forward pass
    precision: str = "auto"  # compute policy; auto picks by hardware (see backbones.choose_policy)
    xla: bool | None = None  # XLA-compile the forward; None = on when a GPU is present
    weights: str = "imagenet"  # imagenet, random (seeded) or "resnet50=PATH,vgg16=PATH"
    seed: int = 0  # seed for random weights
    shard_size: int = 4096  # listed images per HDF5 shard
    storage_dtype: str = "float32"  # dtype of stored features; pooling is always float32
    on_error: str = "skip"  # undecodable image: record and go on, or stop the run

    def __post_init__(self):
        taps = tuple(dict.fromkeys(parse_tap(t) for t in self.taps))
        object.__setattr__(self, "taps", taps)
        if not taps:
            raise PipelineError("at least one tap is needed")
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_choice("resize", self.resize, RESIZES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        _check_choice("on_error", self.on_error, ON_ERROR)
        if self.image_size < 32:
            raise PipelineError(f"image_size {self.image_size} is too small; both backbones need at least 32")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} {getattr(self, name)} must be a positive integer")

    @property
    def backbones(self):
        return tuple(b for b in BACKBONES if any(tap_backbone(t) == b for t in self.taps))



def _check_choice(name, value, allowed):
    if value not in allowed:
        raise PipelineError(f"{name} {value!r} is not one of {', '.join(allowed)}")


def sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_toml(path, allowed_keys):
    """Read a TOML config file whose keys must be among `allowed_keys` (dashes or underscores)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise PipelineError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"config file {path} is not valid TOML: {e}") from None
    normalized = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(normalized) - set(allowed_keys))
    if unknown:
        raise PipelineError(
            f"config file {path} has unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(allowed_keys))}"
        )
    return normalized


SCALINGS = ("standard", "block", "none")
SOLVERS = ("auto", "full", "randomized", "incremental")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class ReduceConfig(_Config):
    """Everything that decides the bytes stage two (a) writes: splits, scaling and PCA."""

    taps: tuple[str, ...] = ()  # "backbone/layer" subset of the manifest's taps; empty = all of them
    scaling: str = "block"  # standard: per feature; block: standard, then each tap / sqrt(dim); none
    components: int | float = 256  # an int keeps that many components; a float in (0, 1) that variance share
    whiten: bool = False  # rescale every kept component to unit variance
    solver: str = "auto"  # PCA solver; auto = full/randomized in memory, incremental (streaming) when too big
    batch_rows: int = 8192  # rows read per chunk; bounds memory
    val_fraction: float = 0.1  # share of each class hashed to val when the source gave no splits
    test_fraction: float = 0.1  # share of each class hashed to test when the source gave no splits
    split_seed: int = 0  # salt of the id hash that assigns splits

    def __post_init__(self):
        object.__setattr__(self, "taps", tuple(dict.fromkeys(parse_tap(t) for t in self.taps)))
        _check_choice("scaling", self.scaling, SCALINGS)
        _check_choice("solver", self.solver, SOLVERS)
        components = self.components
        if isinstance(components, bool) or not (
            (isinstance(components, int) and components >= 1)
            or (isinstance(components, float) and 0 < components < 1)
        ):
            raise PipelineError(
                f"components {components!r} must be a positive integer or a variance share strictly between 0 and 1"
            )
        if self.batch_rows < 1:
            raise PipelineError(f"batch_rows {self.batch_rows} must be a positive integer")
        for name in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise PipelineError(f"{name} {getattr(self, name)} must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise PipelineError(
                f"val_fraction {self.val_fraction} + test_fraction {self.test_fraction} = "
                f"{self.val_fraction + self.test_fraction:g} leaves no rows for train; the sum must be below 1"
            )



@dataclass(frozen=True)
class HeadConfig(_Config):
    """One head experiment: the Keras classifier on the reduced features and how it is fitted."""

    hidden: tuple[int, ...] = (512, 128)  # units of each ReLU layer, input side first; () = softmax regression
    dropout: float = 0.3  # dropout rate after every hidden layer
    l2: float = 1e-4  # L2 penalty on every Dense kernel
    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 256  # rows per gradient step
    epochs: int = 100  # upper bound; early stopping on val loss usually ends sooner
    patience: int = 8  # epochs without a val-loss improvement before stopping
    label_smoothing: float = 0.0  # share of target mass spread evenly over all classes
    class_weight: str = "none"  # balanced: weight each class by rows / (classes * its train rows)
    seed: int = 0  # seeds weight init, dropout and shuffling

    def __post_init__(self):
        _check_scalar_types(self)
        hidden = (self.hidden,) if isinstance(self.hidden, int) else self.hidden
        if not isinstance(hidden, (list, tuple)) or not all(isinstance(units, int) and not isinstance(units, bool) and units >= 1 for units in hidden):
            raise PipelineError(f"hidden {self.hidden!r} must be a list of positive integers (units per layer)")
        object.__setattr__(self, "hidden", tuple(hidden))
        _check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        for name, low, high in (("dropout", 0, 1), ("label_smoothing", 0, 1)):
            if not low <= getattr(self, name) < high:
                raise PipelineError(f"{name} {getattr(self, name)} must be in [{low}, {high})")
        if self.l2 < 0:
            raise PipelineError(f"l2 {self.l2} must be zero or positive")
        if self.lr <= 0:
            raise PipelineError(f"lr {self.lr} must be positive")
        for name in ("batch_size", "epochs", "patience"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} {getattr(self, name)} must be a positive integer")

    @classmethod
    def option_names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))



def _check_scalar_types(config):
    """Fail on a value of the wrong type (say, from a TOML file); ints become floats in float fields."""
    names = {int: "an integer", float: "a number", str: "a string"}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type not in names:
            continue
        if f.type is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, f.name, float(value))
        elif not isinstance(value, f.type) or isinstance(value, bool):
            raise PipelineError(f"{f.name} {value!r} must be {names[f.type]}")
