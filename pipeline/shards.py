"""The features/ format: HDF5 shards plus manifest.json; written atomically, read and verified here."""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import atomic_path, write_json
from pipeline.lineage import FEATURES_FORMAT as FORMAT, MANIFEST_NAME, read_record

SHARD_PATTERN = re.compile(r"^shard-(\d{5})\.h5$")
_STR = h5py.string_dtype("utf-8")


def shard_filename(index):
    return f"shard-{index:05d}.h5"


@dataclass
class ShardData:
    ids: list  # str, sorted
    labels: np.ndarray  # (N,) int32, -1 when unlabeled
    splits: list  # str: train/val/test or ""
    features: dict = field(default_factory=dict)  # tap key "backbone/layer" -> (N, C)
    errors: list = field(default_factory=list)  # [{id, path, reason}] for images of this shard's range

    @property
    def rows(self):
        return len(self.ids)


def write_shard(path, data, *, index, config_sha256, config, storage_dtype="float32"):
    """Write one shard to `path` via a .tmp file; the shard's attrs say which run made it."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.create_dataset("ids", data=np.asarray(data.ids, dtype=object), dtype=_STR)
            f.create_dataset("labels", data=np.asarray(data.labels, dtype=np.int32).reshape(-1))
            f.create_dataset("splits", data=np.asarray(data.splits, dtype=object), dtype=_STR)
            group = f.create_group("features", track_order=True)
            for key, values in data.features.items():
                group.create_dataset(key, data=np.asarray(values).astype(storage_dtype, copy=False))
            f.attrs["format"] = FORMAT
            f.attrs["config_sha256"] = config_sha256
            f.attrs["config"] = json.dumps(config, sort_keys=True)
            f.attrs["shard_index"] = index
            f.attrs["rows"] = data.rows
            f.attrs["errors"] = json.dumps(data.errors)


def read_shard_attrs(path):
    """The shard's attrs as a dict, or None when the file is missing or not a readable shard."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except (OSError, KeyError):
        return None
    if attrs.get("format") != FORMAT:
        return None
    attrs["errors"] = json.loads(attrs.get("errors", "[]"))
    attrs["config"] = json.loads(attrs.get("config", "{}"))
    return attrs


def read_shard(path, taps=None, rows=slice(None)):
    """Read ids, labels, splits and the requested taps (default all) for a row range."""
    with h5py.File(path, "r") as f:
        keys = taps if taps is not None else list_taps(f)
        return ShardData(
            ids=[s.decode() if isinstance(s, bytes) else s for s in f["ids"][rows]],
            labels=f["labels"][rows],
            splits=[s.decode() if isinstance(s, bytes) else s for s in f["splits"][rows]],
            features={k: f["features"][k][rows] for k in keys},
            errors=json.loads(f.attrs.get("errors", "[]")),
        )


def list_taps(h5file):
    """Tap keys under features/ in file order, as 'backbone/layer'."""
    keys = []
    for backbone, group in h5file["features"].items():
        keys.extend(f"{backbone}/{layer}" for layer in group)
    return keys


def make_manifest(*, config, config_sha256, weights, taps, classes, shards, listed, errors, precision, timing):
    """The manifest dict; `taps` are dicts with key, backbone, layer, dim, pooling."""
    return {
        "format": FORMAT,
        "config": config,
        "config_sha256": config_sha256,
        "weights": weights,
        "taps": taps,
        "classes": list(classes),
        "shards": shards,
        "rows": sum(s["rows"] for s in shards),
        "listed": listed,
        "errors": errors,
        "precision": precision,
        "timing": timing,
    }


def write_manifest(features_dir, manifest):
    write_json(Path(features_dir) / MANIFEST_NAME, manifest)


def read_manifest(features_dir):
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
    """Shard files (and leftover .tmp files) in a directory, sorted by name."""
    return sorted(p for p in Path(features_dir).glob("shard-*.h5*"))


def iter_feature_chunks(features_dir, manifest, taps, chunk_rows):
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


def verify(features_dir, chunk_rows=8192):
    """Re-read every shard against the manifest; return a list of problems (empty when sound)."""
    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    problems = []
    taps = {t["key"]: t["dim"] for t in manifest["taps"]}
    n_classes = len(manifest["classes"])
    listed = {s["file"] for s in manifest["shards"]}
    for stray in existing_shards(features_dir):
        if stray.name not in listed:
            problems.append(f"{stray.name} is in the directory but not in the manifest")
    previous_id, seen, total = None, set(), 0
    for entry in manifest["shards"]:
        path = features_dir / entry["file"]
        attrs = read_shard_attrs(path)
        if attrs is None:
            problems.append(f"{entry['file']} is missing or not a features shard")
            continue
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
        total += n
        for ids, labels, splits, X in iter_feature_chunks(features_dir, {"shards": [entry]}, present, chunk_rows):
            if any(b <= a for a, b in zip([previous_id] + ids, ids) if a is not None):
                problems.append(f"{entry['file']}: ids are not unique and sorted")
            previous_id = ids[-1] if ids else previous_id
            seen.update(ids)
            bad_labels = labels[(labels < -1) | (labels >= n_classes)]
            if bad_labels.size:
                problems.append(f"{entry['file']}: labels {sorted(set(bad_labels.tolist()))} outside -1..{n_classes - 1}")
            bad_splits = set(splits) - {"train", "val", "test", ""}
            if bad_splits:
                problems.append(f"{entry['file']}: unknown splits {sorted(bad_splits)}")
            if not np.isfinite(X).all():
                problems.append(f"{entry['file']}: NaN or Inf in features")
    if total != manifest["rows"]:
        problems.append(f"shards hold {total} rows, manifest says {manifest['rows']}")
    overlap = seen & {e["id"] for e in manifest["errors"]}
    if overlap:
        problems.append(f"{len(overlap)} id(s) are both a row and an error, e.g. {sorted(overlap)[0]!r}")
    if "listed" in manifest and total + len(manifest["errors"]) != manifest["listed"]:
        problems.append(f"{total} rows + {len(manifest['errors'])} errors != {manifest['listed']} listed images")
    return problems

