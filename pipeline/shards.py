"""The features/ format: HDF5 shards plus manifest.json; written atomically, read and verified here.

A shard carries everything its run knows about it (config hash, weights fingerprints, taps,
errors, the fidelity check, the listed files' sizes, mtimes and content sha256, its generation
and the class names its labels index into), so that the manifest can be rebuilt from the shards
and the listing alone, and any process that ran a shard wrote the same bytes. Shards are never
rewritten (but by `compact`): a row stops being live by being listed in its manifest entry's
`retired`. Files are
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
from pipeline.files import atomic_path, file_sha256, write_json
from pipeline.lineage import FEATURES_FORMAT as FORMAT
from pipeline.lineage import MANIFEST_NAME, read_record

SHARD_PATTERN = re.compile(r"^shard-(\d{5})\.h5$")
_STR = h5py.string_dtype("utf-8")
_JSON_ATTRS = ("config", "errors", "fidelity", "weights", "taps", "device", "classes")  # attrs stored as JSON text


class Manifest(TypedDict):
    """manifest.json, as `make_manifest` builds it (see the README's file formats)."""

    format: str
    config: dict  # the resolved ExtractConfig plus source and source_sha256
    config_sha256: str
    weights: dict  # backbone -> {source: WeightSource record, sha256}
    taps: list  # {key, backbone, layer, channels, dim, pooling, stride}
    classes: list  # index -> class name
    shards: list  # {file, rows, live, generation, retired: [row indices], bytes, mtime_ns}
    rows: int  # live rows
    listed: int
    errors: list  # {id, path, reason}
    precision: dict  # policy, xla, min_cosine_vs_float32, rows_checked
    timing: dict  # seconds, images, images_per_second
    generation: int  # the newest generation
    history: list  # one entry per run that changed the directory: generation, time, added, changed, ... computed


def shard_filename(index):
    return f"shard-{index:05d}.h5"


@dataclass
class Listed:
    """The listed images a shard covers (rows and errors alike): ids, sizes, mtimes and content sha256."""

    ids: list
    sizes: np.ndarray  # int64 bytes
    mtimes_ns: np.ndarray  # int64
    sha256: list | None = None  # hex of each file's bytes, "" when unknown; None: shards written before it was stored
    paths: list | None = None  # files to hash when `sha256` is None (None for a file that is not read); not stored


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
    path: Path,
    data: ShardData,
    *,
    index: int,
    config_sha256: str,
    config: dict,
    storage_dtype: str = "float32",
    weights: dict | None = None,
    taps: list[dict] | None = None,
    device: dict | None = None,
    generation: int = 0,
    classes: Sequence[str] | None = None,
) -> None:
    """Write one shard to `path` through a temp file; the attrs say which run (and generation) made it.

    `classes` are the class names the shard's labels index into. Listed files with `paths` are
    hashed here (on the writer's thread, overlapping compute).
    """
    listed = data.listed
    if listed is not None and listed.sha256 is None and listed.paths is not None:
        listed = Listed(
            listed.ids,
            listed.sizes,
            listed.mtimes_ns,
            [file_sha256(p, size, mtime) if p else "" for p, size, mtime in zip(listed.paths, listed.sizes, listed.mtimes_ns)],
        )
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
            if listed is not None:
                group = create_group(f, "listed")
                create_dataset(group, "ids", np.asarray(listed.ids, dtype=object))
                create_dataset(group, "sizes", np.asarray(listed.sizes, dtype=np.int64))
                create_dataset(group, "mtimes_ns", np.asarray(listed.mtimes_ns, dtype=np.int64))
                if listed.sha256 is not None:
                    create_dataset(group, "sha256", np.asarray(listed.sha256, dtype=object))
            f.attrs["format"] = FORMAT
            f.attrs["config_sha256"] = config_sha256
            f.attrs["shard_index"] = index
            f.attrs["rows"] = data.rows
            f.attrs["generation"] = generation
            named = (
                ("config", config),
                ("errors", data.errors),
                ("fidelity", data.fidelity),
                ("weights", weights),
                ("taps", taps),
                ("device", device),
            )
            if classes is not None:
                named += (("classes", list(classes)),)
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
    attrs["generation"] = int(attrs.get("generation", 0))
    return attrs


def damage(path):
    """Why a shard's bytes cannot be read back in full (a failed fletcher32 checksum, a truncated file), or None.

    Reads every dataset, so it costs a full read of the file.
    """

    def read(name, item):
        if isinstance(item, h5py.Dataset):
            item[()]

    try:
        with h5py.File(path, "r") as f:
            f.visititems(read)
    except (OSError, KeyError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


def read_listed(path):
    """The Listed of a shard, or None for shards written before it was stored."""
    with h5py.File(path, "r") as f:
        if "listed" not in f:
            return None
        group = f["listed"]
        sha256 = group["sha256"].asstr()[:].tolist() if "sha256" in group else None
        return Listed(group["ids"].asstr()[:].tolist(), group["sizes"][:], group["mtimes_ns"][:], sha256)


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


def make_manifest(
    *, config, config_sha256, weights, taps, classes, shards, listed, errors, precision, timing, history=(), generation=None
) -> Manifest:
    """The manifest dict; `taps` are dicts with key, backbone, layer, dim, pooling.

    A shard entry without `live`, `generation` or `retired` has every row live, in generation 0.
    """
    shards = [{"live": s["rows"] - len(s.get("retired", [])), "generation": 0, "retired": [], **s} for s in shards]
    if generation is None:
        generation = max([s["generation"] for s in shards] + [h["generation"] for h in history], default=0)
    return Manifest(
        format=FORMAT,
        config=config,
        config_sha256=config_sha256,
        weights=weights,
        taps=taps,
        classes=list(classes),
        shards=shards,
        rows=sum(s["live"] for s in shards),
        listed=listed,
        errors=errors,
        precision=precision,
        timing=timing,
        generation=generation,
        history=list(history),
    )


def without_run_facts(manifest: dict) -> dict:
    """A manifest without what differs between two runs that wrote the same features: timing, update times, shard mtimes."""
    manifest = {key: value for key, value in manifest.items() if key != "timing"}
    manifest["shards"] = [{k: v for k, v in s.items() if k != "mtime_ns"} for s in manifest.get("shards", [])]
    manifest["history"] = [{k: v for k, v in h.items() if k != "time"} for h in manifest.get("history", [])]
    return manifest


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
    """Yield (ids, labels, splits, X float32) over the live rows of all shards in order, `chunk_rows` rows at a time.

    X concatenates `taps` in the given order. Only one chunk is in memory at once, and float16
    shards are upcast chunk by chunk. Retired rows are read (the reads stay contiguous) and dropped.
    """
    for shard in manifest["shards"]:
        path = Path(features_dir) / shard["file"]
        retired = np.asarray(shard.get("retired", []), np.int64)
        for start in range(0, shard["rows"], chunk_rows):
            part = read_shard(path, taps, slice(start, start + chunk_rows))
            keep = ~np.isin(np.arange(start, start + part.rows), retired)
            columns = [part.features[t][keep].astype(np.float32) for t in taps]
            X = np.concatenate(columns, axis=1) if columns else np.zeros((int(keep.sum()), 0), np.float32)
            ids, splits = [i for i, k in zip(part.ids, keep) if k], [s for s, k in zip(part.splits, keep) if k]
            yield ids, part.labels[keep], splits, X


def verify(features_dir: Path | str, chunk_rows: int = 8192) -> list[str]:
    """Re-read every shard against the manifest, retired rows and their bookkeeping included; return the problems (empty when sound)."""
    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    problems = []
    listed = {s["file"] for s in manifest["shards"]}
    for stray in existing_shards(features_dir):
        if stray.name not in listed:
            problems.append(f"{stray.name} is in the directory but not in the manifest")
    state = {"live": set(), "errors": set(), "total": 0}
    for entry in manifest["shards"]:
        try:
            problems.extend(_verify_shard(features_dir, manifest, entry, state, chunk_rows))
        except OSError as e:  # a failed fletcher32 checksum, a truncated file
            problems.append(
                f"{entry['file']} cannot be read ({e}); its bytes are damaged: extract again (the same command) to recompute its rows"
            )
    total = state["total"]
    if total != manifest["rows"]:
        problems.append(f"shards hold {total} live rows, manifest says {manifest['rows']}")
    error_ids = [e["id"] for e in manifest["errors"]]
    overlap = state["live"] & set(error_ids)
    if overlap:
        problems.append(f"{len(overlap)} id(s) are both a row and an error, e.g. {sorted(overlap)[0]!r}")
    unknown = sorted(set(error_ids) - state["errors"])
    if unknown:
        problems.append(f"{len(unknown)} error(s) of the manifest are in no shard, e.g. {unknown[0]!r}")
    if "listed" in manifest and total + len(manifest["errors"]) != manifest["listed"]:
        problems.append(f"{total} live rows + {len(manifest['errors'])} errors != {manifest['listed']} listed images")
    generations = [entry.get("generation", 0) for entry in manifest["shards"]]
    if generations and max(generations) > manifest.get("generation", 0):
        problems.append(
            f"a shard of generation {max(generations)} is newer than the manifest's generation {manifest.get('generation', 0)}"
        )
    return problems


def _retired_problem(entry):
    """What is wrong with a manifest entry's `retired` and `live`, or None."""
    retired, rows = entry.get("retired", []), entry["rows"]
    if not isinstance(retired, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in retired):
        return f"{entry['file']}: retired must be a list of row indices, not {retired!r}"
    if any(b <= a for a, b in zip(retired, retired[1:])) or any(not 0 <= i < rows for i in retired):
        return f"{entry['file']}: retired rows must be ascending, unique and within 0..{rows - 1}"
    if entry.get("live", rows - len(retired)) != rows - len(retired):
        return f"{entry['file']}: {entry.get('live')} live rows, but {rows} rows less {len(retired)} retired are {rows - len(retired)}"
    return None


def _verify_shard(features_dir, manifest, entry, state, chunk_rows):
    """The problems of one shard; `state` carries the live ids and error ids seen and the live row total."""
    problems = []
    taps = {t["key"]: t["dim"] for t in manifest["taps"]}
    path = features_dir / entry["file"]
    attrs = read_shard_attrs(path)
    if attrs is None:
        return [f"{entry['file']} is missing or not a features shard"]
    if attrs["config_sha256"] != manifest["config_sha256"]:
        problems.append(f"{entry['file']} was written by another configuration")
    if attrs["generation"] != entry.get("generation", 0):
        problems.append(f"{entry['file']} is of generation {attrs['generation']}, manifest says {entry.get('generation', 0)}")
    classes = attrs["classes"] if attrs["classes"] is not None else manifest["classes"]
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
    retired_problem = _retired_problem(entry)
    if retired_problem:
        return problems + [retired_problem]
    listed = read_listed(path)
    state["errors"].update(e["id"] for e in attrs["errors"])
    retired = set(entry.get("retired", []))
    state["total"] += n - len(retired)
    ids_in_shard, previous = [], None
    for start in range(0, n, chunk_rows):
        part = read_shard(path, present, slice(start, start + chunk_rows))
        if any(b <= a for a, b in zip([previous] + part.ids, part.ids) if a is not None):
            problems.append(f"{entry['file']}: ids are not unique and sorted")
        previous = part.ids[-1] if part.ids else previous
        ids_in_shard += part.ids
        live = [row for row in range(start, start + part.rows) if row not in retired]
        for row in live:
            image_id = part.ids[row - start]
            if image_id in state["live"]:
                problems.append(f"{entry['file']}: {image_id!r} is live in two rows")
            state["live"].add(image_id)
        labels = part.labels[[row - start for row in live]]
        bad_labels = labels[(labels < -1) | (labels >= len(classes))]
        if bad_labels.size:
            problems.append(f"{entry['file']}: labels {sorted(set(bad_labels.tolist()))} outside -1..{len(classes) - 1}")
        foreign = sorted({classes[label] for label in labels.tolist() if 0 <= label < len(classes)} - set(manifest["classes"]))
        if foreign:
            problems.append(f"{entry['file']}: live rows of class {foreign[0]!r}, which the manifest's classes lack")
        bad_splits = set(part.splits) - {"train", "val", "test", ""}
        if bad_splits:
            problems.append(f"{entry['file']}: unknown splits {sorted(bad_splits)}")
        if not all(np.isfinite(values).all() for values in part.features.values()):
            problems.append(f"{entry['file']}: NaN or Inf in features")
    if listed is not None and sorted(ids_in_shard + [e["id"] for e in attrs["errors"]]) != sorted(listed.ids):
        problems.append(f"{entry['file']}: its rows and errors are not the images it lists")
    return problems
