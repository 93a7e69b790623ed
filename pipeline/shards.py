"""The features/ format: HDF5 shards plus manifest.json; written atomically, read and verified here.

A shard carries everything its run knows about it (config hash, weights fingerprints, taps,
errors, the fidelity check, the listed files' sizes and mtimes), so that the manifest can be
rebuilt from the shards alone and any process that ran a shard wrote the same bytes. Files are
written without HDF5 timestamps, so the same content gives the same bytes, and every numeric
dataset carries a fletcher32 checksum, so flipped bytes in the features fail on read.
"""

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import atomic_path, write_json
from pipeline.lineage import FEATURES_FORMAT as FORMAT, MANIFEST_NAME, read_record

SHARD_PATTERN = re.compile(r"^shard-(\d{5})\.h5$")
_STR = h5py.string_dtype("utf-8")
_JSON_ATTRS = ("config", "errors", "fidelity", "weights", "taps", "device")  # attrs stored as JSON text


class Manifest(TypedDict):
    """manifest.json, as `make_manifest` builds it (see the README's file formats)."""

    format: str
    config: dict  # the resolved ExtractConfig plus source and source_sha256
    config_sha256: str
    weights: dict  # backbone -> {source: WeightSource record, sha256}
    taps: list  # {key, backbone, layer, channels, dim, pooling, stride}
    classes: list  # index -> class name
    shards: list  # {file, rows}
    rows: int
    listed: int
    errors: list  # {id, path, reason}
    precision: dict  # policy, xla, min_cosine_vs_float32, rows_checked
    timing: dict  # seconds, images, images_per_second


def shard_filename(index):
    return f"shard-{index:05d}.h5"


@dataclass
class Listed:
    """The listed images a shard covers (rows and errors alike): ids, sizes and mtimes."""

    ids: list
    sizes: np.ndarray  # int64 bytes
    mtimes_ns: np.ndarray  # int64


@dataclass
class ShardData:
    ids: list[str]  # sorted
    labels: np.ndarray  # (N,) int32, -1 when unlabeled
    splits: list[str]  # train/val/test or ""
    features: dict[str, np.ndarray] = field(default_factory=dict)  # tap key "backbone/layer" -> (N, C)
    errors: list[dict] = field(default_factory=list)  # [{id, path, reason}] for images of this shard's range
    fidelity: dict | None = None  # {min_cosine_vs_float32, rows_checked} of this shard's first batch
    listed: Listed | None = None

    @property
    def rows(self):
        return len(self.ids)


def create_h5(path):
    """A new HDF5 file that records no timestamps and keeps insertion order."""
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_obj_track_times(False)
    fcpl.set_link_creation_order(h5py.h5p.CRT_ORDER_TRACKED | h5py.h5p.CRT_ORDER_INDEXED)
    return h5py.File(h5py.h5f.create(str(path).encode(), h5py.h5f.ACC_TRUNC, fcpl=fcpl))


def create_group(parent, name):
    """A group without timestamps (h5py's create_group always records them)."""
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    gcpl.set_link_creation_order(h5py.h5p.CRT_ORDER_TRACKED | h5py.h5p.CRT_ORDER_INDEXED)
    return h5py.Group(h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl))


def create_dataset(group, name, data):
    """A dataset without timestamps; numbers carry a fletcher32 checksum (HDF5 cannot filter strings).

    Object arrays are stored as UTF-8 strings.
    """
    data = np.asarray(data)
    if data.dtype == object:
        return group.create_dataset(name, data=data, dtype=_STR, track_times=False)
    checked = data.size > 0  # the filter needs chunks, and an empty dataset cannot be chunked
    return group.create_dataset(name, data=data, track_times=False, fletcher32=checked, chunks=True if checked else None)


def write_shard(
    path: Path, data: ShardData, *, index: int, config_sha256: str, config: dict, storage_dtype: str = "float32",
    weights: dict | None = None, taps: list[dict] | None = None, device: dict | None = None,
) -> None:
    """Write one shard to `path` through a temp file; the attrs say which run made it."""
    with atomic_path(path) as tmp:
        with create_h5(tmp) as f:
            create_dataset(f, "ids", np.asarray(data.ids, dtype=object))
            create_dataset(f, "labels", np.asarray(data.labels, dtype=np.int32).reshape(-1))
            create_dataset(f, "splits", np.asarray(data.splits, dtype=object))
            features = create_group(f, "features")
            for key, values in data.features.items():
                backbone, layer = key.split("/", 1)
                group = features[backbone] if backbone in features else create_group(features, backbone)
                create_dataset(group, layer, np.asarray(values).astype(storage_dtype, copy=False))
            if data.listed is not None:
                listed = create_group(f, "listed")
                create_dataset(listed, "ids", np.asarray(data.listed.ids, dtype=object))
                create_dataset(listed, "sizes", np.asarray(data.listed.sizes, dtype=np.int64))
                create_dataset(listed, "mtimes_ns", np.asarray(data.listed.mtimes_ns, dtype=np.int64))
            f.attrs["format"] = FORMAT
            f.attrs["config_sha256"] = config_sha256
            f.attrs["shard_index"] = index
            f.attrs["rows"] = data.rows
            named = (("config", config), ("errors", data.errors), ("fidelity", data.fidelity), ("weights", weights), ("taps", taps), ("device", device))
            for name, value in named:
                f.attrs[name] = json.dumps(value, sort_keys=True, allow_nan=False)


def describe_device(device):
    """A device record (see backbones.device_record) as one line."""
    libraries = f", CUDA {device['cuda']}, cuDNN {device['cudnn']}" if device.get("cuda") else ""
    determinism = ", op determinism" if device.get("op_determinism") else ""
    return f"{device['device']}{libraries}, TensorFlow {device['tensorflow']}, forward {device['forward']}{determinism}"


def devices(features_dir, manifest):
    """{device line: shards computed there} over the manifest's shards; shards that record none count under None."""
    found = {}
    for entry in manifest["shards"]:
        attrs = read_shard_attrs(Path(features_dir) / entry["file"]) or {}
        line = describe_device(attrs["device"]) if attrs.get("device") else None
        found[line] = found.get(line, 0) + 1
    return found


def read_shard_attrs(path):
    """The shard's attrs as a dict (JSON ones parsed), or None when the file is missing or not a readable shard."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except (OSError, KeyError):
        return None
    if attrs.get("format") != FORMAT:
        return None
    for name in _JSON_ATTRS:
        attrs[name] = json.loads(attrs[name]) if name in attrs else None
    attrs["errors"] = attrs["errors"] or []
    return attrs


def read_listed(path):
    """The Listed of a shard, or None for shards written before it was stored."""
    with h5py.File(path, "r") as f:
        if "listed" not in f:
            return None
        group = f["listed"]
        return Listed(group["ids"].asstr()[:].tolist(), group["sizes"][:], group["mtimes_ns"][:])


def read_shard(path: Path, taps: Sequence[str] | None = None, rows: slice = slice(None)) -> ShardData:
    """Read ids, labels, splits and the requested taps (default all) for a row range."""
    with h5py.File(path, "r") as f:
        keys = taps if taps is not None else list_taps(f)
        return ShardData(
            ids=f["ids"].asstr()[rows].tolist(),
            labels=f["labels"][rows],
            splits=f["splits"].asstr()[rows].tolist(),
            features={k: f["features"][k][rows] for k in keys},
            errors=json.loads(f.attrs.get("errors", "[]")),
        )


def list_taps(h5file):
    """Tap keys under features/ in file order, as 'backbone/layer'."""
    keys = []
    for backbone, group in h5file["features"].items():
        keys.extend(f"{backbone}/{layer}" for layer in group)
    return keys


def make_manifest(*, config, config_sha256, weights, taps, classes, shards, listed, errors, precision, timing) -> Manifest:
    """The manifest dict; `taps` are dicts with key, backbone, layer, dim, pooling."""
    return Manifest(
        format=FORMAT,
        config=config,
        config_sha256=config_sha256,
        weights=weights,
        taps=taps,
        classes=list(classes),
        shards=shards,
        rows=sum(s["rows"] for s in shards),
        listed=listed,
        errors=errors,
        precision=precision,
        timing=timing,
    )


def write_manifest(features_dir: Path, manifest: Manifest) -> None:
    write_json(Path(features_dir) / MANIFEST_NAME, manifest)


def read_manifest(features_dir: Path | str) -> Manifest:
    """Load manifest.json, failing with a clear sentence if this is not a finished features dir."""
    features_dir = Path(features_dir)
    path = features_dir / MANIFEST_NAME
    if not features_dir.is_dir():
        raise PipelineError(f"features directory {features_dir} does not exist")
    if not path.exists():
        hint = " (shards without a manifest: the extraction did not finish; rerun it)" if existing_shards(features_dir) else ""
        raise PipelineError(f"{features_dir} is not a features directory: it has no {MANIFEST_NAME}{hint}")
    return read_record(path, FORMAT, "extract again into a new --out")


def existing_shards(features_dir):
    """Finished shard files in a directory, sorted by name."""
    return sorted(p for p in Path(features_dir).iterdir() if SHARD_PATTERN.match(p.name))


def iter_feature_chunks(
    features_dir: Path | str, manifest: Manifest, taps: Sequence[str], chunk_rows: int
) -> Iterator[tuple[list[str], np.ndarray, list[str], np.ndarray]]:
    """Yield (ids, labels, splits, X float32) over all shards in order, `chunk_rows` rows at a time.

    X concatenates `taps` in the given order. Only one chunk is in memory at once, and float16
    shards are upcast chunk by chunk.
    """
    for shard in manifest["shards"]:
        path = Path(features_dir) / shard["file"]
        for start in range(0, shard["rows"], chunk_rows):
            part = read_shard(path, taps, slice(start, start + chunk_rows))
            columns = [part.features[t].astype(np.float32) for t in taps]
            X = np.concatenate(columns, axis=1) if columns else np.zeros((part.rows, 0), np.float32)
            yield part.ids, part.labels, part.splits, X


def verify(features_dir: Path | str, chunk_rows: int = 8192) -> list[str]:
    """Re-read every shard against the manifest; return a list of problems (empty when sound)."""
    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    problems = []
    listed = {s["file"] for s in manifest["shards"]}
    for stray in existing_shards(features_dir):
        if stray.name not in listed:
            problems.append(f"{stray.name} is in the directory but not in the manifest")
    state = {"previous_id": None, "seen": set(), "total": 0}
    for entry in manifest["shards"]:
        try:
            problems.extend(_verify_shard(features_dir, manifest, entry, state, chunk_rows))
        except OSError as e:  # a failed fletcher32 checksum, a truncated file
            problems.append(f"{entry['file']} cannot be read ({e}); its bytes are damaged, so extract it again")
    total = state["total"]
    if total != manifest["rows"]:
        problems.append(f"shards hold {total} rows, manifest says {manifest['rows']}")
    overlap = state["seen"] & {e["id"] for e in manifest["errors"]}
    if overlap:
        problems.append(f"{len(overlap)} id(s) are both a row and an error, e.g. {sorted(overlap)[0]!r}")
    if "listed" in manifest and total + len(manifest["errors"]) != manifest["listed"]:
        problems.append(f"{total} rows + {len(manifest['errors'])} errors != {manifest['listed']} listed images")
    return problems


def _verify_shard(features_dir, manifest, entry, state, chunk_rows):
    """The problems of one shard; `state` carries the running id order, ids seen and row total."""
    problems = []
    taps = {t["key"]: t["dim"] for t in manifest["taps"]}
    n_classes = len(manifest["classes"])
    path = features_dir / entry["file"]
    attrs = read_shard_attrs(path)
    if attrs is None:
        return [f"{entry['file']} is missing or not a features shard"]
    if attrs["config_sha256"] != manifest["config_sha256"]:
        problems.append(f"{entry['file']} was written by another configuration")
    with h5py.File(path, "r") as f:
        n = len(f["ids"])
        counts = {"attrs": int(attrs["rows"]), "manifest": entry["rows"], "labels": len(f["labels"]), "splits": len(f["splits"])}
        for key in list_taps(f):
            counts[key] = f["features"][key].shape[0]
        for what, count in counts.items():
            if count != n:
                problems.append(f"{entry['file']}: {n} ids but {count} rows in {what}")
        present = [key for key in taps if key in f["features"]]
        for key, dim in taps.items():
            if key not in f["features"]:
                problems.append(f"{entry['file']} lacks tap {key}")
            elif f["features"][key].shape[1] != dim:
                problems.append(f"{entry['file']}: tap {key} has {f['features'][key].shape[1]} columns, manifest says {dim}")
    listed = read_listed(path)
    error_ids = [e["id"] for e in attrs["errors"]]
    state["total"] += n
    ids_in_shard = []
    for ids, labels, splits, X in iter_feature_chunks(features_dir, {"shards": [entry]}, present, chunk_rows):
        previous = state["previous_id"]
        if any(b <= a for a, b in zip([previous] + ids, ids) if a is not None):
            problems.append(f"{entry['file']}: ids are not unique and sorted")
        state["previous_id"] = ids[-1] if ids else previous
        state["seen"].update(ids)
        ids_in_shard += ids
        bad_labels = labels[(labels < -1) | (labels >= n_classes)]
        if bad_labels.size:
            problems.append(f"{entry['file']}: labels {sorted(set(bad_labels.tolist()))} outside -1..{n_classes - 1}")
        bad_splits = set(splits) - {"train", "val", "test", ""}
        if bad_splits:
            problems.append(f"{entry['file']}: unknown splits {sorted(bad_splits)}")
        if not np.isfinite(X).all():
            problems.append(f"{entry['file']}: NaN or Inf in features")
    if listed is not None and sorted(ids_in_shard + error_ids) != sorted(listed.ids):
        problems.append(f"{entry['file']}: its rows and errors are not the images it lists")
    return problems
