"""The public reader of a features directory: its live rows, checked against the shards, in sorted-id order.

    from pipeline import load_features
    f = load_features("features/")                   # every tap in memory; float16 stays float16
    f.ids, f.labels, f.splits, f.classes, f.features["vgg16/block5_conv3"]
    for batch in open_features("features/").batches(batch_rows=8192):   # a set larger than memory
        batch.ids, batch.features, batch.matrix()
    check_features("features/").rows                 # the checks alone, without reading ids (inspect)

Rows the manifest retires (removed images, the old rows of changed or relabelled ones) never
appear. The manifest is derived from the shards, so what is used from it (taps, classes, row
counts, retired rows, the config hash) is checked against the shards first, and a manifest that
disagrees with them is refused in one sentence: rerunning extract rebuilds it from the shards.
Labels are mapped by class name through each shard's own `classes` attr (older shards, which lack
it, index the manifest's classes). Every reader of the project goes through here.

Each shard's ids are read once, to place its live rows in sorted-id order. Features are read as
contiguous row ranges per shard (h5py's fancy indexing is slow) and picked out in memory; where
a range needs no picking it is read straight into the output.
"""

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline import shards
from pipeline.errors import PipelineError, first_line
from pipeline.lineage import MANIFEST_NAME

BATCH_ROWS = 8192  # rows per batch when iterating
RERUN = "rerun the same `pipeline extract` command, which rebuilds the manifest from the shards"


@dataclass(frozen=True)
class ShardPart:
    """The live rows of one shard: which rows of the file they are, and their places among all live rows."""

    path: Path
    rows: np.ndarray  # ascending indices of the file's live rows
    positions: np.ndarray  # ascending places of those rows in the sorted-id order of all live rows


@dataclass
class Batch:
    """Consecutive live rows (in sorted-id order, or one shard's), with the requested taps."""

    positions: np.ndarray  # the rows' places among all live rows, ascending
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    features: dict  # tap key -> (rows, dim)

    def matrix(self, dtype=np.float32):
        """The taps side by side, in the order they were requested, as one (rows, sum of dims) array."""
        columns = [values.astype(dtype, copy=False) for values in self.features.values()]
        return np.concatenate(columns, axis=1) if columns else np.zeros((len(self.positions), 0), dtype)


@dataclass(frozen=True)
class Features:
    """The live rows of a features directory in sorted-id order; `features` holds what `load_features` read."""

    path: Path
    manifest: dict
    ids: np.ndarray  # str (object array)
    labels: np.ndarray  # int32 index into `classes`, -1 when unlabeled
    splits: np.ndarray  # str: train/val/test as the source gave them, or ""
    classes: list  # index -> class name
    taps: dict  # tap key -> dim, in manifest order
    dtype: np.dtype  # as stored
    parts: tuple  # ShardPart per shard, in manifest order
    features: dict = field(default_factory=dict)  # tap key -> (rows, dim) array

    def __len__(self):
        return len(self.ids)

    def resolve_taps(self, taps=None):
        """`taps` checked (a key or a list of keys; default all, in manifest order)."""
        if taps is None:
            return list(self.taps)
        taps = [taps] if isinstance(taps, str) else list(taps)
        for key in taps:
            if key not in self.taps:
                raise PipelineError(f"tap {key} is not in {self.path}; it has {', '.join(self.taps)}")
        return taps

    def load(self, taps=None, dtype=None):
        """These rows with the features of `taps` in memory (a new Features); `dtype` converts them (default: as stored).

        Each output array is allocated once and filled shard by shard, reading runs of consecutive live
        rows (retired rows are not read): memory beyond the outputs is at most BATCH_ROWS rows of one tap.
        """
        taps = self.resolve_taps(taps)
        dtype = np.dtype(dtype or self.dtype)
        out = {key: np.empty((len(self.ids), self.taps[key]), dtype) for key in taps}
        for part in self.parts:
            with _open_shard(part.path, self.path) as f:
                for a, b in _runs(part.rows):
                    for key in taps:
                        _read_into(f["features"][key], part.rows[a:b], out[key], part.positions[a:b])
        return dataclasses.replace(self, features=out)

    def batches(self, taps=None, batch_rows=BATCH_ROWS, dtype=None) -> Iterator[Batch]:
        """The live rows in sorted-id order, `batch_rows` at a time, with the features of `taps`.

        A batch covers an interval of ids, which in every shard is one contiguous range of rows
        (a shard's ids are sorted): each is read once and the live rows picked out. At most one
        batch is in memory at a time.
        """
        taps = self.resolve_taps(taps)
        dtype = np.dtype(dtype or self.dtype)
        total = len(self.ids)
        handles = {}  # part index -> open file, closed after its last live row
        try:
            for start in range(0, total, batch_rows):
                stop = min(start + batch_rows, total)
                out = {key: np.empty((stop - start, self.taps[key]), dtype) for key in taps}
                for index, part in enumerate(self.parts):
                    a, b = np.searchsorted(part.positions, (start, stop))
                    if a == b:
                        continue
                    with _reading(part.path, self.path):
                        if index not in handles:
                            handles[index] = h5py.File(part.path, "r")
                        for key in taps:
                            _read_into(handles[index]["features"][key], part.rows[a:b], out[key], part.positions[a:b] - start)
                    if b == len(part.positions):
                        handles.pop(index).close()
                yield Batch(np.arange(start, stop), self.ids[start:stop], self.labels[start:stop], self.splits[start:stop], out)
        finally:
            for handle in handles.values():
                handle.close()

    def shard_batches(self, part, taps=None, batch_rows=BATCH_ROWS, dtype=None) -> Iterator[Batch]:
        """The live rows of one shard (one of `parts`) in file order, `batch_rows` at a time."""
        taps = self.resolve_taps(taps)
        columns = (self.ids[part.positions], self.labels[part.positions], self.splits[part.positions])
        return read_part(
            part, {key: self.taps[key] for key in taps}, columns, batch_rows, np.dtype(dtype or self.dtype), self.path
        )


def read_part(part, taps, columns, batch_rows, dtype, features_dir) -> Iterator[Batch]:
    """Batches of the live rows of one shard: `taps` maps tap keys to dims, `columns` are the part's (ids, labels, splits)
    (any of them None: the batches' is None too).

    A function of picklable values, so that a Ray task can read its shard itself.
    """
    with _open_shard(part.path, features_dir) as f:
        for a in range(0, len(part.rows), batch_rows):
            b = min(a + batch_rows, len(part.rows))
            out = {key: np.empty((b - a, dim), dtype) for key, dim in taps.items()}
            for key in taps:
                _read_into(f["features"][key], part.rows[a:b], out[key], np.arange(b - a))
            ids, labels, splits = (None if column is None else column[a:b] for column in columns)
            yield Batch(part.positions[a:b], ids, labels, splits, out)


def load_features(path, taps=None, dtype=None):
    """The live rows of features directory `path` with the features of `taps` in memory (see the module doc)."""
    return open_features(path).load(taps, dtype)


@dataclass(frozen=True)
class Summary:
    """A features directory's manifest, checked against its shards, and what it holds (see check_features)."""

    path: Path
    manifest: dict
    rows: int  # live rows
    classes: list
    taps: dict  # tap key -> dim, in manifest order
    dtype: np.dtype  # as stored


def check_features(path):
    """The manifest of features directory `path` checked against its shards as open_features checks it, but without
    reading ids and splits (the slow part of a large directory): what `inspect` shows. Returns a Summary.
    """
    return _checked(Path(path), read_ids=False)[0]


def _checked(path, read_ids):
    """(Summary, [(live rows, ids, labels, splits) per shard]); ids and splits are None unless `read_ids`."""
    manifest = shards.read_manifest(path)
    manifest_path = path / MANIFEST_NAME
    _check_manifest(manifest, manifest_path)
    taps = {tap["key"]: tap["dim"] for tap in manifest["taps"]}
    found, dtypes = [], set()
    for entry in manifest["shards"]:
        *columns, dtype = _read_shard_rows(path, manifest, manifest_path, entry, taps, read_ids)
        found.append(columns)
        dtypes |= dtype
    live = sum(len(rows) for rows, *_ in found)
    if live != manifest["rows"]:
        raise _refuse(manifest_path, f"says {manifest['rows']} live rows, but its shards leave {live} live")
    if len(dtypes) > 1:
        raise _refuse(
            manifest_path, f"lists shards stored as {' and '.join(sorted(map(str, dtypes)))}, which one extraction never mixes"
        )
    dtype = np.dtype(dtypes.pop() if dtypes else np.float32)
    return Summary(path, manifest, live, list(manifest["classes"]), taps, dtype), found


def open_features(path):
    """The live rows of features directory `path` (ids, labels, splits, classes), checked, without reading features."""
    path = Path(path)
    summary, found = _checked(path, read_ids=True)
    manifest, manifest_path = summary.manifest, path / MANIFEST_NAME
    parts_rows = [rows for rows, *_ in found]
    columns = [c for _, *c in found]
    ids = np.concatenate([c[0] for c in columns]) if columns else np.zeros(0, object)
    labels = np.concatenate([c[1] for c in columns]) if columns else np.zeros(0, np.int32)
    splits = np.concatenate([c[2] for c in columns]) if columns else np.zeros(0, object)
    if len(ids) < 2 or (ids[1:] > ids[:-1]).all():  # one generation: the shards' rows are in sorted-id order already
        rank = np.arange(len(ids))
    else:
        order = np.argsort(ids, kind="stable")
        ids, labels, splits = ids[order], labels[order], splits[order]
        duplicate = np.flatnonzero(ids[1:] == ids[:-1])
        if duplicate.size:
            raise _refuse(manifest_path, f"leaves id {ids[duplicate[0]]!r} live in more than one row")
        rank = np.empty(len(ids), np.int64)
        rank[order] = np.arange(len(ids))
    parts, at = [], 0
    for entry, rows in zip(manifest["shards"], parts_rows):
        positions = rank[at : at + len(rows)]
        at += len(rows)
        if (np.diff(positions) <= 0).any():
            raise PipelineError(
                f"the ids of {path / entry['file']} are not sorted, so it was not written by `pipeline extract`; extract again into a new --out"
            )
        parts.append(ShardPart(path / entry["file"], rows, positions))
    return Features(
        path=path,
        manifest=manifest,
        ids=ids,
        labels=labels,
        splits=splits,
        classes=summary.classes,
        taps=summary.taps,
        dtype=summary.dtype,
        parts=tuple(parts),
    )


def _refuse(manifest_path, what):
    return PipelineError(f"{manifest_path} {what}; {RERUN}")


def _check_manifest(manifest, manifest_path):
    """The keys a reader uses are there and well formed, and the classes are in the order extract writes them."""
    kinds = {"config_sha256": str, "taps": list, "classes": list, "shards": list, "rows": int}
    for key, kind in kinds.items():
        if key not in manifest:
            raise _refuse(manifest_path, f"has no {key!r} record")
        if not isinstance(manifest[key], kind):
            raise _refuse(manifest_path, f"has a {key!r} record that is not a {kind.__name__}")
    for key, fields in (("taps", {"key": str, "dim": int}), ("shards", {"file": str, "rows": int})):
        for item in manifest[key]:
            if not isinstance(item, dict) or not all(isinstance(item.get(name), kind) for name, kind in fields.items()):
                raise _refuse(manifest_path, f"has a {key!r} entry without {' and '.join(fields)}: {item!r}")
    classes = manifest["classes"]
    if not all(isinstance(name, str) for name in classes):
        raise _refuse(manifest_path, "lists classes that are not all names")
    if classes != sorted(set(classes)):
        raise _refuse(
            manifest_path,
            f"lists its classes as {classes}, not sorted and unique as extract writes them (edited by hand?), so its class names "
            "cannot be trusted",
        )


def _read_shard_rows(features_dir, manifest, manifest_path, entry, taps, read_ids=True):
    """(live rows, and their ids, labels mapped to the manifest's classes and splits; {dtype of its taps}) of one shard.

    Everything the manifest says of the shard is checked against the shard's attrs and datasets.
    Without `read_ids`, ids and splits are not read (None).
    """
    path = features_dir / entry["file"]
    attrs = shards.read_shard_attrs(path)
    if attrs is None:
        raise PipelineError(f"{path} is listed in the manifest but is missing or not a features shard; rerun `pipeline extract`")
    if attrs["config_sha256"] != manifest["config_sha256"]:
        raise PipelineError(
            f"{path} was written by another extraction (config {attrs['config_sha256'][:12]}) than its manifest describes "
            f"({manifest['config_sha256'][:12]}); the directory mixes two manifests, so extract again into a fresh --out"
        )
    stored = int(attrs["rows"])
    if entry["rows"] != stored:
        raise _refuse(manifest_path, f"says {entry['file']} holds {entry['rows']} rows, but it holds {stored}")
    rows = _live_rows(manifest_path, entry, stored)
    try:
        with h5py.File(path, "r") as f:
            datasets = {key: f["features"][key] for key in shards.list_taps(f)}
            theirs = {key: dataset.shape[1] if dataset.ndim == 2 else None for key, dataset in datasets.items()}
            if theirs != taps:
                raise _refuse(manifest_path, f"lists taps {_taps_text(taps)}, but {entry['file']} holds {_taps_text(theirs)}")
            short = [key for key, dataset in datasets.items() if dataset.shape[0] != stored]
            if short:
                raise damaged_shard(path, features_dir, f"tap {short[0]} has {datasets[short[0]].shape[0]} rows, not {stored}")
            dtypes = {dataset.dtype for dataset in datasets.values()}
            lengths = {name: len(f[name]) for name in ("ids", "labels", "splits")}
            labels = f["labels"][:]
            ids = f["ids"].asstr()[:] if read_ids else None
            splits = f["splits"].asstr()[:] if read_ids else None
    except (OSError, KeyError) as e:
        raise damaged_shard(path, features_dir, e) from None
    if set(lengths.values()) != {stored}:
        raise damaged_shard(path, features_dir, ", ".join(f"{n} {name}" for name, n in lengths.items()) + f" for {stored} rows")
    labels = _mapped_labels(path, manifest_path, attrs.get("classes"), manifest["classes"], labels[rows])
    if not read_ids:
        return rows, None, labels, None, dtypes
    return rows, ids[rows], labels, splits[rows], dtypes


def _taps_text(taps):
    return ", ".join(f"{key} ({dim})" for key, dim in taps.items()) or "none"


def _live_rows(manifest_path, entry, stored):
    """The ascending indices of a shard's live rows: all but those its manifest entry retires (checked)."""
    retired = entry.get("retired", [])
    if not isinstance(retired, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in retired):
        raise _refuse(manifest_path, f"retires rows of {entry['file']} that are not a list of row numbers")
    retired = np.asarray(retired, dtype=np.int64)
    if retired.size and (retired[0] < 0 or retired[-1] >= stored or (np.diff(retired) <= 0).any()):
        raise _refuse(
            manifest_path, f"retires rows of {entry['file']} that are not ascending row numbers below its {stored} rows"
        )
    live = np.ones(stored, dtype=bool)
    live[retired] = False
    if "live" in entry and entry["live"] != int(live.sum()):
        raise _refuse(
            manifest_path, f"says {entry['file']} has {entry['live']} live rows, but it retires {retired.size} of {stored}"
        )
    return np.flatnonzero(live)


def _mapped_labels(path, manifest_path, shard_classes, classes, labels):
    """A shard's labels as indices into the manifest's `classes`, through the class names the shard recorded."""
    labels = np.asarray(labels, dtype=np.int32)
    if shard_classes is None:  # a shard from before shards recorded their classes: it indexes the manifest's
        bad = labels[(labels < -1) | (labels >= len(classes))]
        if bad.size:
            raise _refuse(manifest_path, f"lists {len(classes)} classes, but {path.name} has rows labelled {int(bad[0])}")
        return labels
    shard_classes = json.loads(shard_classes) if isinstance(shard_classes, str) else list(shard_classes)
    bad = labels[(labels < -1) | (labels >= len(shard_classes))]
    if bad.size:
        raise PipelineError(
            f"{path} has rows labelled {int(bad[0])} but records {len(shard_classes)} classes; the shard is damaged, so extract again"
        )
    index = {name: i for i, name in enumerate(classes)}
    used = np.unique(labels[labels >= 0])
    missing = [shard_classes[i] for i in used if shard_classes[i] not in index]
    if missing:
        raise _refuse(manifest_path, f"lacks class {missing[0]!r}, which live rows of {path.name} are labelled with")
    mapping = np.array([index.get(name, -1) for name in shard_classes] + [-1], dtype=np.int32)  # [-1]: unlabeled stays -1
    return mapping[labels]


@contextlib.contextmanager
def _reading(path, features_dir):
    """A read of shard `path` that fails (a failed checksum, a truncated file) becomes one sentence."""
    try:
        yield
    except (OSError, KeyError) as e:
        raise damaged_shard(path, features_dir, e) from None


@contextlib.contextmanager
def _open_shard(path, features_dir):
    """A shard open for reading, its read failures one sentence."""
    with _reading(path, features_dir), h5py.File(path, "r") as f:
        yield f


def damaged_shard(path, features_dir, error):
    reason = error if isinstance(error, str) else first_line(error)
    return PipelineError(
        f"cannot read {path} ({reason}); the features are damaged: `pipeline inspect {features_dir} --verify` lists the problems, "
        "then extract again"
    )


def _runs(rows):
    """(a, b) pieces of `rows` that are each a contiguous range of file rows, at most BATCH_ROWS long."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    for a, b in zip(edges[:-1], edges[1:]):
        for start in range(a, b, BATCH_ROWS):
            yield start, min(start + BATCH_ROWS, b)


def _read_into(dataset, rows, out, positions):
    """out[positions] = dataset[rows], reading the one contiguous range of file rows that covers `rows`.

    `rows` and `positions` are ascending; when both are contiguous and `out` has the stored dtype, the range is read
    straight into `out`. A conversion (float16 to float32) is numpy's: HDF5's own is many times slower.
    """
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    p0 = int(positions[0])
    consecutive = hi - lo == len(rows)
    if consecutive and int(positions[-1]) - p0 + 1 == len(rows):
        if out.dtype == dataset.dtype:
            dataset.read_direct(out, np.s_[lo:hi], np.s_[p0 : p0 + len(rows)])
        else:
            out[p0 : p0 + len(rows)] = dataset[lo:hi]
        return
    block = dataset[lo:hi]
    out[positions] = block if consecutive else block[rows - lo]
