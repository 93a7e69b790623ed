"""Frozen run configurations, their defaults, and the hash that names a configuration."""

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

BACKBONES = ("resnet50", "vgg16")
ENGINES = ("local", "ray")  # where work runs (engines.make_engine builds stage one's); the CLI offers them from here
POOLINGS = ("avg", "max", "avgmax")
RESIZES = ("squash", "center-crop")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STORAGE_DTYPES = ("float32", "float16")
ON_ERROR = ("skip", "fail")
EXPORT_FORMATS = ("keras", "saved_model")
MIN_IMAGE_SIZE = 32  # both backbones downsample 32x
MAX_IMAGE_SIZE = 2048  # 80x ImageNet's pixels; beyond it one image's activations outgrow a GPU
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
            f"tap {text!r} is not BACKBONE:LAYER with BACKBONE one of {', '.join(BACKBONES)} (run `pipeline taps` for the layers)"
        )
    return f"{backbone}/{layer}"


def _resnet50_layers():
    """Keras' ResNet50 (include_top=False) layer names in graph order, the input aside."""
    names = ["conv1_pad", "conv1_conv", "conv1_bn", "conv1_relu", "pool1_pad", "pool1_pool"]
    for stage, blocks in ((2, 3), (3, 4), (4, 6), (5, 3)):
        for block in range(1, blocks + 1):
            middle = ("0_conv", "3_conv", "0_bn", "3_bn") if block == 1 else ("3_conv", "3_bn")  # with the shortcut's conv
            parts = ("1_conv", "1_bn", "1_relu", "2_conv", "2_bn", "2_relu", *middle, "add", "out")
            names += [f"conv{stage}_block{block}_{part}" for part in parts]
    return tuple(names)


# Every layer with a spatial output, as `pipeline taps` lists them from the built trunks (a test
# keeps the two equal), so that a tap can be checked before TensorFlow loads or --out is touched.
TAP_LAYERS = {
    "resnet50": _resnet50_layers(),
    "vgg16": tuple(
        f"block{block}_{kind}"
        for block, convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
        for kind in (*(f"conv{i}" for i in range(1, convs + 1)), "pool")
    ),
}


def check_tap_layers(taps):
    """Refuse a tap ('backbone/layer') whose backbone has no such layer, without building a model."""
    for tap in taps:
        backbone, layer = tap_backbone(tap), tap_layer(tap)
        if layer not in TAP_LAYERS[backbone]:
            raise PipelineError(f"unknown tap {tap!r}; valid {backbone} layers are: {', '.join(TAP_LAYERS[backbone])}")


def tap_backbone(tap):
    return tap.split("/", 1)[0]


def tap_layer(tap):
    return tap.split("/", 1)[1]


WEIGHT_KINDS = ("imagenet", "random", "file")


@dataclass(frozen=True)
class WeightSource:
    """Where one backbone's weights come from, as the manifest records it."""

    kind: str  # imagenet, random (seeded) or file
    seed: int | None = None  # random only
    path: str | None = None  # file only: absolute

    def to_record(self) -> dict:
        extra = {"seed": self.seed} if self.kind == "random" else {"path": self.path} if self.kind == "file" else {}
        return {"kind": self.kind, **extra}

    @classmethod
    def from_record(cls, record: "dict | str") -> "WeightSource":
        """A record from a manifest; manifests before structured records hold 'imagenet', 'random(seed=N)' or a path."""
        if isinstance(record, str):
            if record == "imagenet":
                return cls("imagenet")
            if record.startswith("random(seed=") and record.endswith(")"):
                return cls("random", seed=int(record[len("random(seed=") : -1]))
            return cls("file", path=record)
        return cls(**record)

    def spec(self) -> str:
        """The --weights value that loads these weights again."""
        return self.path if self.kind == "file" else self.kind

    def __str__(self) -> str:
        return f"random (seed {self.seed})" if self.kind == "random" else self.spec()


def parse_weights(spec: str, backbones: tuple[str, ...], seed: int) -> dict[str, WeightSource]:
    """'imagenet' | 'random' | 'resnet50=PATH,vgg16=PATH' -> {backbone: WeightSource}.

    In the map form each value may also be 'imagenet' or 'random'; files must exist.
    """

    def source(value):
        if value in ("imagenet", "random"):
            return WeightSource(value, seed=seed if value == "random" else None)
        return WeightSource("file", path=str(Path(value).absolute()))

    if spec in ("imagenet", "random"):
        return {b: source(spec) for b in backbones}
    sources = {}
    for item in spec.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or name not in BACKBONES or not value:
            raise PipelineError(
                f"weights {spec!r} is not imagenet, random or BACKBONE=PATH[,BACKBONE=PATH] "
                f"with BACKBONE one of {', '.join(BACKBONES)}"
            )
        sources[name] = source(value)
    missing = [b for b in backbones if b not in sources]
    if missing:
        raise PipelineError(f"weights {spec!r} gives no weights for {', '.join(missing)}; add {missing[0]}=PATH")
    for name, weights in sources.items():
        if weights.kind == "file" and not Path(weights.path).is_file():
            raise PipelineError(f"weights file {weights.path} for {name} does not exist")
    return {b: sources[b] for b in backbones}


class _Config:
    """What every run configuration shares: a JSON-ready dict and a hash that names it."""

    _UNHASHED = ()  # fields that do not change what a run writes
    _NOT_SETTINGS = ()  # keys a record holds beside the fields
    _SETTINGS = "settings"  # what the fields are called in an error
    # Fields added after runs were recorded, with the value that means what such a run did: a record
    # without the field has that value, and the hash leaves the field out while it has it (old hashes stay valid).
    _LEGACY = {}

    def to_dict(self):
        return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()}

    def sha256(self):
        return sha256_json(
            {
                key: value
                for key, value in self.to_dict().items()
                if key not in self._UNHASHED and not (key in self._LEGACY and value == self._LEGACY[key])
            }
        )

    @classmethod
    def from_record(cls, recorded: dict, where: str, *, remedy: str = "use the pipeline version that made it", **changes):
        """The config a record holds (a shard's or manifest's `config`, reduce.json's), with `changes` applied.

        A setting added after the record was made takes its _LEGACY value, else its default, which by
        design keeps the old behaviour; a setting this version does not know cannot be rebuilt: one
        sentence naming `where` (the record) and `remedy`.
        """
        settings = {**cls._LEGACY, **{key: value for key, value in recorded.items() if key not in cls._NOT_SETTINGS}}
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PipelineError(f"{where} records {cls._SETTINGS} this version does not know ({', '.join(unknown)}); {remedy}")
        return cls(**{**settings, **changes})


# Keys of a recorded run config (shard attrs, manifest) that describe the listed images, not the extraction.
SOURCE_KEYS = ("source", "source_sha256")


@dataclass(frozen=True)
class ExtractConfig(_Config):
    """Everything that decides the bytes stage one writes."""

    _UNHASHED = ("on_error", "deterministic")  # whether a run stops; whether a GPU's kernels are picked reproducibly
    _NOT_SETTINGS = SOURCE_KEYS
    _SETTINGS = "extraction settings"
    _LEGACY = {"exif_orientation": False}

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
    deterministic: bool = True  # on a GPU: TensorFlow's op determinism (no timed kernel picking), so reruns give the same bytes
    exif_orientation: bool | None = None  # turn images upright by their EXIF orientation; None: on (a resumed run: as recorded)

    def __post_init__(self):
        _check_types(self)
        taps = tuple(dict.fromkeys(parse_tap(t) for t in self.taps))
        object.__setattr__(self, "taps", taps)
        if not taps:
            raise PipelineError("at least one tap is needed")
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_choice("resize", self.resize, RESIZES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        _check_choice("on_error", self.on_error, ON_ERROR)
        _check_range("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        _check_range("batch_size", self.batch_size, 1)
        _check_range("shard_size", self.shard_size, 1)
        _check_range("seed", self.seed, 0)

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
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise PipelineError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"config file {path} is not UTF-8 text (byte {e.start}); TOML files must be UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"config file {path} is not valid TOML: {e}") from None
    normalized = normalize_keys(data, f"config file {path}")
    unknown = sorted(set(normalized) - set(allowed_keys))
    if unknown:
        raise PipelineError(
            f"config file {path} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed_keys))}"
        )
    return normalized


def normalize_keys(table, where):
    """A TOML table with dashes in its keys turned to underscores; a key given both ways is an error."""
    normalized, spelled = {}, {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in normalized:
            raise PipelineError(f"{where} sets {name} twice (as {spelled[name]} and as {key}); keep one")
        normalized[name], spelled[name] = value, key
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
    val_fraction: float = 0.1  # share of rows hashed to val (each by its id) when the source gave no split
    test_fraction: float = 0.1  # share of rows hashed to test (each by its id) when the source gave no split
    split_seed: int = 0  # salt of the id hash that assigns splits

    def __post_init__(self):
        _check_types(self)
        object.__setattr__(self, "taps", tuple(dict.fromkeys(parse_tap(t) for t in self.taps)))
        _check_choice("scaling", self.scaling, SCALINGS)
        _check_choice("solver", self.solver, SOLVERS)
        components = self.components
        if isinstance(components, bool) or not (
            (isinstance(components, int) and components >= 1) or (isinstance(components, float) and 0 < components < 1)
        ):
            raise PipelineError(
                f"components {components!r} must be a positive integer or a variance share strictly between 0 and 1"
            )
        _check_range("batch_rows", self.batch_rows, 1)
        _check_range("split_seed", self.split_seed, 0)
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
        if isinstance(self.hidden, int) and not isinstance(self.hidden, bool):
            object.__setattr__(self, "hidden", (self.hidden,))
        _check_types(self)
        if not all(units >= 1 for units in self.hidden):
            raise PipelineError(f"hidden {list(self.hidden)!r} must be a list of positive integers (units per layer)")
        _check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        for name, low, high in (("dropout", 0, 1), ("label_smoothing", 0, 1)):
            if not low <= getattr(self, name) < high:
                raise PipelineError(f"{name} {getattr(self, name)} must be in [{low}, {high})")
        if self.l2 < 0:
            raise PipelineError(f"l2 {self.l2} must be zero or positive")
        if self.lr <= 0:
            raise PipelineError(f"lr {self.lr} must be positive")
        for name in ("batch_size", "epochs", "patience"):
            _check_range(name, getattr(self, name), 1)
        _check_range("seed", self.seed, 0)

    @classmethod
    def option_names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class ParallelConfig:
    """Where stage two computes. It changes no output beyond the order of float64 additions, so it is not hashed."""

    engine: str = "local"  # local: this machine; ray: a Ray cluster (reduce: per-shard sums; train: the sweep's runs)
    jobs: int = 1  # train: runs trained at once, each in its own process (1 = in this process)
    ray_address: str | None = None  # engine ray: "auto", HOST:PORT, or None to start a local Ray

    def __post_init__(self):
        _check_types(self)
        _check_choice("engine", self.engine, ENGINES)
        _check_range("jobs", self.jobs, 1)
        if self.ray_address is not None and self.engine != "ray":
            raise PipelineError(f"--ray-address {self.ray_address} is for --engine ray; add --engine ray or leave it out")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_types(config):
    """Fail with one sentence on a value of the wrong type (say, from a TOML file).

    An int is accepted where a float is expected (and becomes one); a list where a tuple is.
    A bool is never taken for a number, nor a float for an int (`seed = 1.5` is refused, not cut to 1).
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        allowed = typing.get_args(f.type) if isinstance(f.type, types.UnionType) else (f.type,)
        if value is None and type(None) in allowed:
            continue
        if typing.get_origin(f.type) is tuple:
            item_type = typing.get_args(f.type)[0]
            if isinstance(value, (list, tuple)) and all(_is_a(item, item_type) for item in value):
                object.__setattr__(config, f.name, tuple(value))
                continue
            raise PipelineError(
                f"{f.name} {value!r} must be a list of {_TYPE_NAMES[item_type].removeprefix('a ').removeprefix('an ')}s"
            )
        if float in allowed and int not in allowed and _is_a(value, int):
            object.__setattr__(config, f.name, float(value))
        elif not any(_is_a(value, t) for t in allowed):
            raise PipelineError(f"{f.name} {value!r} must be {' or '.join(_TYPE_NAMES[t] for t in allowed if t in _TYPE_NAMES)}")


def _is_a(value, kind):
    """isinstance, except that a bool is not an int."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _check_range(name, value, low, high=None):
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise PipelineError(f"{name} {value} must be an integer {bound}")
