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


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides the bytes stage one writes."""

    taps: tuple[str, ...] = DEFAULT_TAPS  # "backbone/layer"; each backbone is cut at its deepest tap
    pooling: str = "avg"  # global pooling of each tap: avg, max, or both concatenated
    image_size: int = 224  # square input side in pixels (ImageNet size)
    resize: str = "squash"  # squash to square, or center-crop to square first
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

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["taps"] = list(self.taps)
        return d

    def sha256(self):
        """Hash of the fields that decide the output bytes (on_error only decides whether to stop)."""
        d = self.to_dict()
        del d["on_error"]
        return sha256_json(d)


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
