"""Stage one: plan shards for what the listing changed, skip finished ones, run the rest on an engine, write the manifest.

A features directory follows its collection. Its committed state is the manifest's shards (each
with the rows it retired); a rerun with the same feature settings matches every listed image to
a committed row by id and content (size and mtime; the file's sha256 when only the mtime moved):
unchanged and restored images keep their rows, relabeled ones are copied (same feature bytes)
into a new shard with their new label and split, and new or changed images are computed into new
shards appended after the committed ones. Removed images and the old rows of changed ones are
retired. No committed shard file is rewritten. The plan is a function of the committed state and
the listing alone, so job-array tasks and resumed runs agree on it, and a finished new shard is
known by its index and the images it lists. Only a plain run writes the manifest, last. This
module does not import TensorFlow: a rerun with nothing to compute never loads it or builds a model.
"""

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from pipeline import shards
from pipeline.config import SOURCE_KEYS, ExtractConfig, check_tap_layers, parse_weights
from pipeline.errors import PipelineError
from pipeline.files import (
    DIR_LOCK_NAME,
    check_space,
    file_sha256,
    is_temp,
    leftover_temps,
    locked,
    output_guard,
    read_json,
    remove,
    swap_dir,
    temp_sibling,
)
from pipeline.lineage import MANIFEST_NAME, check_fingerprints
from pipeline.sources import Listing

FIDELITY_THRESHOLD = 0.99  # min cosine vs float32 below which a reduced-precision run warns
LOCK_NAME = DIR_LOCK_NAME  # in the features dir: one writer at a time (job-array tasks share it)
_AUTO = {"precision": "auto", "xla": None, "exif_orientation": None}  # requested values that any resolved value satisfies
_SPACE_MARGIN = 1.1  # free disk space wanted beyond the estimated size of the pending shards
# Updates computing this few images run the model eagerly: tracing costs ~2 s, eager calls ~0.1 s more per 224 px image (2 CPU cores).
EAGER_MAX_IMAGES = 16
COUNTS = ("added", "changed", "removed", "restored", "relabeled", "unchanged", "computed")


class ProgressSink(Protocol):
    """What `extract` reports progress to."""

    def start(self, total: int, done: int) -> None:
        """`total` listed images, of which `done` need no compute (kept, or finished by an earlier run)."""

    def __call__(self, images: int) -> None:
        """`images` more were computed (or found undecodable)."""


@dataclass
class ExtractResult:
    manifest: shards.Manifest | None  # None for a job-array task, which writes no manifest
    out_dir: Path
    written: int  # shards written by this call (computed, or copied for relabeled images)
    skipped: int  # shards already there: committed, finished by an earlier call, or left to other job-array tasks
    up_to_date: bool = False  # the directory already held this listing, manifest included
    warnings: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # COUNTS -> images, for the update this call made (or finished)


@dataclass(frozen=True)
class _Run:
    """A run found in (or planned for) the output directory."""

    config_sha256: str
    config: dict  # resolved config plus source keys, as shards and manifest record it
    manifest: dict | None = None  # manifest.json as found (parsed, not checked)
    manifest_problem: str | None = None  # why manifest.json could not be read, when it could not


def extract(
    config: ExtractConfig,
    listing: Listing,
    out_dir: Path | str,
    *,
    overwrite: bool = False,
    progress: ProgressSink | None = None,
    expected_weights: dict | None = None,
    engine: str = "local",
    engine_options: dict | None = None,
    num_workers: int = 1,
    worker_index: int = 0,
) -> ExtractResult:
    """Run stage one over a `sources.Listing` into `out_dir`, or update the features already there.

    `expected_weights` ({backbone: {source, sha256}}, as a manifest records them) makes loaded
    weights with another fingerprint fail before any image is run. `engine` is "local" or "ray"
    (with `engine_options` for it). With `num_workers` > 1 this process is job-array task
    `worker_index`: it writes only the new shards k with k % num_workers == worker_index and no
    manifest.
    """
    started = time.perf_counter()
    parse_weights(config.weights, config.backbones, config.seed)  # a bad spec fails before the directory is touched,
    check_tap_layers(config.taps)  # and so does an unknown tap (checked by name: no model is built for it)
    if not 0 <= worker_index < num_workers:
        raise PipelineError(f"worker index {worker_index} must be in 0..{num_workers - 1} for {num_workers} workers")
    if overwrite and num_workers > 1:  # each task would delete the shards the others had written
        raise PipelineError(
            f"--overwrite is refused in a job-array task (here task {worker_index} of {num_workers}), whose tasks would "
            f"delete each other's shards; replace the old features with a plain run first, or delete {out_dir}, then run the array"
        )
    progress = progress or _NoProgress()
    out_dir = Path(out_dir)
    with output_guard(out_dir, f"features directory {out_dir}", into=True, shared=num_workers > 1):
        return _extract_locked(
            config,
            listing,
            out_dir,
            overwrite,
            progress,
            expected_weights,
            engine,
            engine_options or {},
            (num_workers, worker_index),
            started,
        )


def _extract_locked(config, listing, out_dir, overwrite, progress, expected_weights, engine_name, engine_options, array, started):
    num_workers, worker_index = array
    task = num_workers > 1
    if not task:
        _remove_leftovers(out_dir)  # even when up to date: a killed run's temp must not outlive it
    snapshot = _snapshot(out_dir)
    existing = _existing_run(out_dir, snapshot)
    same = existing is not None and _same_run(existing.config, config)
    if existing is not None and not same and not overwrite:
        raise PipelineError(
            f"{out_dir} holds features made with other settings ({_differences(existing.config, config)}); "
            "use another --out or pass --overwrite"
        )
    state = _committed(out_dir, existing, snapshot, listing, drop_damaged=not task) if same else _State.empty()
    plan = _plan(state, listing, config.shard_size)
    done = _finished(out_dir, plan, existing.config_sha256 if same else None)
    mine = {k for k in range(len(plan.new)) if k not in done and plan.new[k].index % num_workers == worker_index}
    compute = [k for k in sorted(mine) if not plan.new[k].copies]
    copies = [k for k in sorted(mine) if plan.new[k].copies]
    counts = plan.counts
    if not compute and not copies:
        if task:
            return ExtractResult(
                None, out_dir, written=0, skipped=len(plan.new) + len(state.shards), up_to_date=True, counts=counts
            )
        progress.start(len(listing.records), len(listing.records))
        return _finish(out_dir, existing, state, plan, listing, expected_weights, started, computed=0, written=0)
    if existing is None or not same or compute:
        return _run_model(
            config,
            listing,
            out_dir,
            overwrite,
            progress,
            expected_weights,
            engine_name,
            engine_options,
            array,
            started,
            snapshot,
            existing,
            same,
            state,
            plan,
            done,
            compute,
            copies,
        )
    progress.start(len(listing.records), len(listing.records))
    _write_copies(out_dir, existing, state, plan, copies, listing)
    if expected_weights is not None:
        check_fingerprints(state.attrs_any()["weights"], expected_weights)
    if task:
        return ExtractResult(None, out_dir, written=len(copies), skipped=len(plan.new) - len(copies), counts=counts)
    return _finish(out_dir, existing, state, plan, listing, None, started, computed=0, written=len(copies))


def _run_model(
    config,
    listing,
    out_dir,
    overwrite,
    progress,
    expected_weights,
    engine_name,
    engine_options,
    array,
    started,
    snapshot,
    existing,
    same,
    state,
    plan,
    done,
    compute,
    copies,
):
    """Compute the pending new shards on an engine (and write this task's copies); then the manifest, unless a job-array task."""
    num_workers, _ = array
    to_run = _run_config_to_extract(existing.config, config, out_dir) if same else config
    from pipeline.engines import (
        RunIdentity,
        ShardTask,
        make_engine,
    )  # the local engine loads TensorFlow, once there is something to compute

    engine = make_engine(engine_name, **engine_options)
    try:
        # The decision is on the whole generation's compute, so a resumed update makes it as the first try did.
        worker = engine.start(to_run, eager=plan.counts["computed"] <= EAGER_MAX_IMAGES)
        resolved = dataclasses.replace(worker.config, on_error=config.on_error)
        run_config = {**resolved.to_dict(), "source": str(Path(listing.root).resolve())}
        run = existing if same else _Run(resolved.sha256(), run_config)
        if expected_weights is not None:
            check_fingerprints(worker.weights, expected_weights)
        if same and state.shards:
            recorded = state.attrs_any()["weights"]
            if recorded is not None:
                check_fingerprints(worker.weights, recorded)
        overwriting = existing is not None and not same
        replaced = [out_dir / MANIFEST_NAME, *snapshot.shards] if overwriting else []
        pending_images = sum(len(plan.new[k].records) for k in compute)
        _check_space(out_dir, pending_images, len(compute), worker.taps, resolved.storage_dtype, freeable=_bytes(replaced))
        if overwriting:  # only now that the new run is known to load and to fit
            _remove_outputs(out_dir, replaced[1:])
        progress.start(len(listing.records), len(listing.records) - pending_images)
        if copies:
            _write_copies(out_dir, run, state, plan, copies, listing)
        jobs = [ShardTask(plan.new[k].index, plan.new[k].records) for k in compute]
        identity = RunIdentity(
            run.config_sha256, run_config, worker.weights, worker.taps, plan.generation, tuple(listing.classes)
        )
        engine.run(jobs, identity, out_dir, progress)
        if num_workers == 1:
            _remove_leftovers(out_dir)  # a worker killed while writing (a Ray actor) leaves its temp file
    finally:
        engine.close()
    if num_workers > 1:
        return ExtractResult(
            None,
            out_dir,
            written=len(compute) + len(copies),
            skipped=len(plan.new) - len(compute) - len(copies),
            counts=plan.counts,
        )
    return _finish(out_dir, run, state, plan, listing, None, started, computed=pending_images, written=len(compute) + len(copies))


class _NoProgress:
    def start(self, total, done):
        pass

    def __call__(self, images):
        pass


def _remove_leftovers(out_dir):
    """Delete the temp files of killed writers (only those provably ours and dead)."""
    for leftover in leftover_temps(out_dir):
        remove(leftover)


@dataclass(frozen=True)
class _Snapshot:
    """One listing of the output directory, its names sorted by kind."""

    shards: list  # paths of finished shard files, by name
    temps: list  # paths of this tool's temp files (a writer's, or a killed one's)
    others: list  # names of everything else but the lock and the manifest


def _snapshot(out_dir):
    """The directory as one listing: a second one could disagree, a job-array task having renamed a temp into a shard."""
    snapshot = _Snapshot([], [], [])
    for path in sorted(out_dir.iterdir()):
        if shards.SHARD_PATTERN.match(path.name):
            snapshot.shards.append(path)
        elif is_temp(path.name):
            snapshot.temps.append(path)
        elif path.name not in (LOCK_NAME, MANIFEST_NAME):
            snapshot.others.append(path.name)
    return snapshot


def _existing_run(out_dir, snapshot):
    """The run whose outputs `out_dir` holds, or None when it holds none.

    The shards say which run it is (their attrs carry its config and hash); the manifest names
    the run only when no shard can be read. A directory holding other files and no features is
    refused: it is not ours to fill.
    """
    manifest, problem = _read_manifest(out_dir)
    attrs = next(filter(None, map(shards.read_shard_attrs, snapshot.shards)), None)
    if attrs is not None:
        return _Run(attrs["config_sha256"], attrs["config"], manifest, problem)
    if manifest is not None and isinstance(manifest.get("config_sha256"), str) and isinstance(manifest.get("config"), dict):
        return _Run(manifest["config_sha256"], manifest["config"], manifest, problem)
    if snapshot.others:
        raise PipelineError(
            f"output directory {out_dir} is not empty and holds no features (it has {snapshot.others[0]}); choose an empty or new directory"
        )
    return None


def _read_manifest(out_dir):
    """(manifest.json as parsed, or None when absent or unreadable; why it could not be read, or None)."""
    try:
        manifest = read_json(out_dir / MANIFEST_NAME)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, not JSON
        return None, str(e) if isinstance(e, ValueError) else e.strerror
    if not isinstance(manifest, dict):
        return None, f"a JSON {type(manifest).__name__}, not an object"
    return manifest, None


def _same_run(recorded, config):
    """Whether a recorded run config has the feature settings `config` asks for (`auto` matches what it resolved to)."""
    wanted = config.to_dict()
    return all(
        _recorded(recorded, key) == value or (key in _AUTO and value == _AUTO[key])
        for key, value in wanted.items()
        if key not in ExtractConfig._UNHASHED
    )


def _recorded(recorded, key):
    """A recorded setting; one added since the run was made has the value that means what the run did."""
    return recorded.get(key, ExtractConfig._LEGACY.get(key))


def _run_config_to_extract(recorded, config, out_dir):
    """The recorded run's resolved config, to go on exactly as it began (with this call's on_error and deterministic)."""
    return ExtractConfig.from_record(
        recorded, f"a shard in {out_dir}", on_error=config.on_error, deterministic=config.deterministic
    )


def _differences(recorded, config):
    """Each feature setting that differs, as `key: recorded -> wanted`."""
    wanted = config.to_dict()
    keys = [
        key
        for key in wanted
        if key not in ExtractConfig._UNHASHED
        and _recorded(recorded, key) != wanted[key]
        and not (key in _AUTO and wanted[key] == _AUTO[key])
    ]
    return ", ".join(f"{key}: {_recorded(recorded, key)!r} -> {wanted[key]!r}" for key in keys)


# --- the committed state ---


@dataclass
class _Shard:
    """A shard file of the run, as planning needs it (no features)."""

    index: int
    path: Path
    attrs: dict
    ids: list = None  # row ids
    labels: np.ndarray = None
    splits: list = None
    classes: list = None  # names the labels index into
    explicit_classes: bool = True  # False: an old shard whose labels index the manifest's classes
    listed: shards.Listed | None = None
    content: dict | None = None  # id -> (size, mtime_ns, sha256) from `listed`, once asked for


@dataclass
class _State:
    """What a run starts from: the committed shards, which of their rows were live, and the record so far."""

    shards: dict  # index -> _Shard, committed
    live: set  # (index, row) live per the manifest
    errors: set  # ids of the errors the manifest lists
    generation: int  # the generation new shards are written for
    history: list
    manifest_good: bool  # the manifest named the committed shards (else they were found from the shards' generations)
    next_index: int  # first index for new shards
    trust_unknown: bool  # rows of shards that recorded no file stats count as unchanged (their run listed these very files)
    dropped: list = field(default_factory=list)  # (file name, why): damaged committed shards, whose rows are recomputed

    @classmethod
    def empty(cls):
        return cls({}, set(), set(), 0, [], False, 0, False)

    def attrs_any(self):
        return next(iter(self.shards.values())).attrs


def _committed(out_dir, run, snapshot, listing, drop_damaged):
    """The committed state of `run` in `out_dir`.

    A manifest of this run names the committed shards; a committed shard whose size or mtime is
    not the one the manifest recorded is read in full, and if its bytes are damaged it is dropped
    (deleted when `drop_damaged`) so that its rows are computed again. Without such a manifest,
    the shards of every generation but the newest are committed, and the newest is unfinished
    work that the plan recognises again (or, if the listing changed since, redoes).
    """
    found = {}
    for path in snapshot.shards:
        attrs = shards.read_shard_attrs(path)
        index = int(shards.SHARD_PATTERN.match(path.name).group(1))
        if attrs is None:
            found[index] = None
        elif attrs["config_sha256"] == run.config_sha256 and int(attrs["shard_index"]) == index:
            found[index] = attrs
    manifest = run.manifest
    entries = _manifest_entries(manifest, run)
    old_classes = (
        manifest.get("classes")
        if isinstance(manifest, dict) and isinstance(manifest.get("classes"), list)
        else list(listing.classes)
    )
    history = manifest.get("history") if isinstance(manifest, dict) and isinstance(manifest.get("history"), list) else []
    dropped, committed, live = [], {}, set()
    if entries is not None:
        for entry in entries:
            index = int(shards.SHARD_PATTERN.match(entry["file"]).group(1))
            path = out_dir / entry["file"]
            attrs = found.get(index)
            stat = _stat(path)
            why = None
            if attrs is None:
                why = "missing or not a shard of this run"
            elif attrs["generation"] != entry.get("generation", 0) or int(attrs["rows"]) != entry["rows"]:
                why = "not the shard its manifest entry describes"
            elif stat != (entry.get("bytes"), entry.get("mtime_ns")):
                why = shards.damage(path)
            if why is not None:
                dropped.append((entry["file"], why))
                if drop_damaged and path.exists():
                    path.unlink()
                continue
            committed[index] = _Shard(index, path, attrs)
            retired = set(entry.get("retired", []))
            live.update((index, row) for row in range(entry["rows"]) if row not in retired)
        generation = int(manifest.get("generation", 0)) + 1
        errors = {e["id"] for e in manifest.get("errors", []) if isinstance(e, dict) and "id" in e}
        next_index = max([int(shards.SHARD_PATTERN.match(e["file"]).group(1)) for e in entries], default=-1) + 1
    else:
        generations = [attrs["generation"] for attrs in found.values() if attrs is not None]
        generation = max(generations, default=0)
        for index, attrs in sorted(found.items()):
            if attrs is not None and attrs["generation"] < generation:
                why = shards.damage(out_dir / shards.shard_filename(index))
                if why is None:
                    committed[index] = _Shard(index, out_dir / shards.shard_filename(index), attrs)
                else:
                    dropped.append((shards.shard_filename(index), why))
                    if drop_damaged:
                        (out_dir / shards.shard_filename(index)).unlink(missing_ok=True)
        errors = {e["id"] for shard in committed.values() for e in shard.attrs["errors"]}
        live = {(index, row) for index, shard in committed.items() for row in range(int(shard.attrs["rows"]))}  # refined below
        next_index = max(committed, default=-1) + 1
    for index, shard in sorted(committed.items()):
        try:
            _read_rows(shard, old_classes)
        except (OSError, KeyError) as e:  # damaged where its stats did not show it
            dropped.append((shard.path.name, str(e) or type(e).__name__))
            del committed[index]
            live = {(i, row) for i, row in live if i != index}
            if drop_damaged:
                shard.path.unlink(missing_ok=True)
    if entries is None:  # without a manifest, each id's row in the newest committed shard is taken as the live one
        newest = {}
        for index, row in sorted(live):
            newest[committed[index].ids[row]] = (index, row)
        live = set(newest.values())
    trust = listing.fingerprint() == run.config.get("source_sha256")
    return _State(committed, live, errors, generation, history, entries is not None, next_index, trust, dropped)


def _manifest_entries(manifest, run):
    """The manifest's shard entries when it is a manifest of `run` whose entries are well formed, else None."""
    if (
        not isinstance(manifest, dict)
        or manifest.get("config_sha256") != run.config_sha256
        or not isinstance(manifest.get("shards"), list)
    ):
        return None
    entries = manifest["shards"]
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and shards.SHARD_PATTERN.match(entry["file"])
            and isinstance(entry.get("rows"), int)
            and shards._retired_problem(entry) is None
        ):
            return None
    if not isinstance(manifest.get("generation", 0), int) or not isinstance(manifest.get("errors", []), list):
        return None
    return entries


def _stat(path):
    try:
        info = path.stat()
    except OSError:
        return None, None
    return info.st_size, info.st_mtime_ns


def _read_rows(shard, manifest_classes):
    """Fill in a committed shard's row ids, labels, splits, label names and listed files."""
    with h5py.File(shard.path, "r") as f:
        shard.ids = f["ids"].asstr()[:].tolist()
        shard.labels = f["labels"][:]
        shard.splits = f["splits"].asstr()[:].tolist()
    shard.explicit_classes = shard.attrs["classes"] is not None
    shard.classes = shard.attrs["classes"] if shard.explicit_classes else list(manifest_classes)
    shard.listed = shards.read_listed(shard.path)


# --- the plan ---


@dataclass(frozen=True)
class _NewShard:
    index: int
    records: tuple  # ImageRecords, by id
    copies: tuple = ()  # (committed shard index, row) per record: a relabel copy, no compute


@dataclass
class _Plan:
    live: dict  # (shard index, row) -> ImageRecord, of committed shards: rows that stay live
    errors: list  # error entries of committed shards that stay (their images are listed, unchanged)
    new: list  # _NewShard, by index: computed ones first, then copies
    generation: int
    counts: dict


def _plan(state, listing, shard_size):
    """What this listing makes of the committed state: a deterministic function of both."""
    candidates = {}  # id -> [(kind, shard, row or error entry, (size, mtime, sha256))]
    for index in sorted(state.shards):
        shard = state.shards[index]
        for row, image_id in enumerate(shard.ids):
            candidates.setdefault(image_id, []).append(("row", index, row, _content_of(shard, image_id)))
        for error in shard.attrs["errors"]:
            candidates.setdefault(error["id"], []).append(("error", index, error, _content_of(shard, error["id"])))
    live_ids = {state.shards[i].ids[r] for i, r in state.live if i in state.shards}
    live, errors, compute, copy, hashes = {}, [], [], [], {}
    counts = dict.fromkeys(COUNTS, 0)
    for record in listing.records:
        hashed = {}  # "sha256" -> the file's, once hashed
        matching = [c for c in candidates.get(record.id, ()) if _same_content(c[3], record, hashed, state.trust_unknown)]
        rows = [c for c in matching if c[0] == "row"]
        was = record.id in live_ids or record.id in state.errors
        if rows:
            best = max(
                rows,
                key=lambda c: (_same_labels(state.shards[c[1]], c[2], record, listing), (c[1], c[2]) in state.live, c[1], c[2]),
            )
            _, index, row, _ = best
            if _same_labels(state.shards[index], row, record, listing):
                live[(index, row)] = record
                counts["unchanged" if (index, row) in state.live else "restored"] += 1
            else:
                copy.append((record, index, row))
                counts["relabeled"] += 1
        elif matching:
            errors.append(matching[-1][2])
            counts["unchanged" if record.id in state.errors else "restored"] += 1
        else:
            compute.append(record)
            counts["changed" if was else "added"] += 1
        if "sha256" in hashed:
            hashes[record.id] = hashed["sha256"]
    compute = _copy_known_content(state, candidates, compute, copy, hashes)
    listed_now = {r.id for r in listing.records}
    counts["removed"] = len((live_ids | state.errors) - listed_now)
    counts["computed"] = len(compute)
    changes = any(counts[key] for key in COUNTS if key != "unchanged")
    generation = state.generation if changes or not state.manifest_good else state.generation - 1
    new, index = [], state.next_index
    for start in range(0, len(compute), shard_size):
        new.append(_NewShard(index, tuple(compute[start : start + shard_size])))
        index += 1
    for start in range(0, len(copy), shard_size):
        part = copy[start : start + shard_size]
        new.append(_NewShard(index, tuple(r for r, _, _ in part), tuple((i, row) for _, i, row in part)))
        index += 1
    return _Plan(live, sorted(errors, key=lambda e: e["id"]), new, max(generation, 0), counts)


def _copy_known_content(state, candidates, compute, copy, hashes):
    """The records of `compute` whose bytes no committed row was made from; the others go to `copy`.

    A file moved to another class folder has a new id, but the bytes of a row made before: its
    features are copied, not computed. Only files whose size some row's file had are hashed.
    """
    known = {}  # (size, sha256) -> (shard index, row), the newest row
    for found in candidates.values():
        for kind, index, row, content in found:
            if kind == "row" and content is not None and content[2]:
                known[(content[0], content[2])] = (index, row)
    sizes = {size for size, _ in known}
    remaining = []
    for record in compute:
        if record.size in sizes and not record.problem:
            sha = hashes.get(record.id) or file_sha256(record.path, record.size, record.mtime_ns)
            if (record.size, sha) in known:
                copy.append((record, *known[(record.size, sha)]))
                continue
        remaining.append(record)
    copy.sort(key=lambda item: item[0].id)
    return remaining


def _same_content(recorded, record, hashed, trust_unknown):
    """Whether a listed file is the one a committed row (or error) was made from: same size and mtime, or same size and sha256."""
    if recorded is None:
        return trust_unknown
    size, mtime, sha = recorded
    if size != record.size:
        return False
    if mtime == record.mtime_ns:
        return True
    if not sha:
        return False
    if "sha256" not in hashed:
        hashed["sha256"] = file_sha256(record.path, record.size, record.mtime_ns) if not record.problem else ""
    return hashed["sha256"] == sha


def _same_labels(shard, row, record, listing):
    """Whether a committed row says what the listing says of its image: class (by name) and split."""
    label = int(shard.labels[row])
    name = shard.classes[label] if 0 <= label < len(shard.classes) else None
    wanted = listing.classes[record.label] if record.label >= 0 else None
    if shard.splits[row] != record.split or name != wanted:
        return False
    return shard.explicit_classes or label == record.label  # an old shard's labels index the manifest's classes


def _finished(out_dir, plan, run_sha):
    """Indices into plan.new of the new shards already on disk: this run's, this generation's, listing the planned files."""
    done = set()
    if run_sha is None:
        return done
    for k, new in enumerate(plan.new):
        path = out_dir / shards.shard_filename(new.index)
        attrs = shards.read_shard_attrs(path)
        if attrs is None or attrs["config_sha256"] != run_sha or attrs["generation"] != plan.generation:
            continue
        try:
            listed = shards.read_listed(path)
        except (OSError, KeyError):
            continue
        planned = [(r.id, r.size, r.mtime_ns) for r in new.records]
        if listed is not None and list(zip(listed.ids, listed.sizes.tolist(), listed.mtimes_ns.tolist())) == planned:
            done.add(k)
    return done


def _write_copies(out_dir, run, state, plan, copies, listing):
    """Write the relabel shards `copies` (indices into plan.new): the committed rows' feature bytes with their new label and split."""
    attrs = state.attrs_any()
    for k in copies:
        new = plan.new[k]
        features = _copied_features(state, new.copies)
        hashes = [file_sha256(r.path, r.size, r.mtime_ns) if not r.problem else "" for r in new.records]
        data = shards.ShardData(
            ids=[r.id for r in new.records],
            labels=np.array([r.label for r in new.records], np.int32),
            splits=[r.split for r in new.records],
            features=features,
            errors=[],
            fidelity={"min_cosine_vs_float32": 1.0, "rows_checked": 0},
            listed=shards.Listed(
                [r.id for r in new.records],
                np.array([r.size for r in new.records], np.int64),
                np.array([r.mtime_ns for r in new.records], np.int64),
                hashes,
            ),
        )
        config = {key: value for key, value in run.config.items() if key not in SOURCE_KEYS}
        shards.write_shard(
            out_dir / shards.shard_filename(new.index),
            data,
            index=new.index,
            config_sha256=run.config_sha256,
            config={**config, "source": str(Path(listing.root).resolve())},
            storage_dtype=run.config["storage_dtype"],
            weights=attrs["weights"],
            taps=attrs["taps"],
            generation=plan.generation,
            classes=list(listing.classes),
            device=_common_device(state, {index for index, _ in new.copies}),
        )


def _copied_features(state, sources):
    """{tap key: rows} of committed rows `sources` ((shard index, row), in order), read one shard at a time."""
    by_shard = {}
    for position, (index, row) in enumerate(sources):
        by_shard.setdefault(index, []).append((row, position))
    parts = {}
    for index, wanted in by_shard.items():
        rows = np.array(sorted(row for row, _ in wanted))
        with h5py.File(state.shards[index].path, "r") as f:
            for key in shards.list_taps(f):
                values = f["features"][key][rows[0] : rows[-1] + 1][rows - rows[0]]  # one contiguous read
                parts.setdefault(key, [None] * len(sources))
                order = {row: i for i, row in enumerate(rows.tolist())}
                for row, position in wanted:
                    parts[key][position] = values[order[row]]
    return {key: np.stack(values) for key, values in parts.items()}


# --- the manifest ---


def _finish(out_dir, run, state, plan, listing, expected_weights, started, computed, written):
    """Write the manifest the committed and new shards make (or report the directory up to date); delete shard files it drops."""
    entries = _entries(out_dir, state, plan)
    all_attrs = [attrs for _, attrs in entries]
    if expected_weights is not None and all_attrs:
        check_fingerprints(all_attrs[0]["weights"], expected_weights)
    new_errors = [e for _, attrs in entries[len(state.shards) :] for e in attrs["errors"]]
    changed = any(plan.counts[key] for key in COUNTS if key != "unchanged")
    history = list(state.history)
    if changed and not any(isinstance(h, dict) and h.get("generation") == plan.generation for h in history):
        rows = sum(entry["live"] for entry, _ in entries)
        history.append(
            {
                "generation": plan.generation,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **plan.counts,
                "rows": rows,
            }
        )
    manifest = _make_manifest(
        run,
        listing,
        entries,
        sorted(plan.errors + new_errors, key=lambda e: e["id"]),
        plan.generation,
        history,
        started,
        computed,
    )
    path = out_dir / MANIFEST_NAME
    kept = {entry["file"] for entry, _ in entries}
    for shard in shards.existing_shards(out_dir):
        if shard.name not in kept:  # uncommitted work of an earlier plan, or a damaged shard
            shard.unlink(missing_ok=True)
    warnings = [f"{out_dir / name} was damaged ({why}), so its rows were computed again" for name, why in state.dropped]
    result = dict(out_dir=out_dir, written=written, skipped=len(entries) - written, counts=plan.counts)
    quiet = not changed and not written and not state.dropped  # nothing changed (a manifest may still be brought up to date)
    if run.manifest is not None and _same_manifest(run.manifest, manifest, stats=True):
        return ExtractResult(run.manifest, up_to_date=quiet, warnings=warnings, **result)
    if run.manifest_problem is not None:
        warnings.append(f"{path} could not be read ({run.manifest_problem}), so it was rebuilt from the shards")
    elif (
        run.manifest is not None
        and "generation" in run.manifest
        and (not state.manifest_good or not changed)
        and not _same_manifest(run.manifest, manifest, stats=False)
    ):
        warnings.append(f"{path} did not match its shards, so it was rebuilt from them")
    shards.write_manifest(out_dir, manifest)
    return ExtractResult(manifest, up_to_date=quiet and not warnings, warnings=warnings + _warnings(manifest), **result)


def _entries(out_dir, state, plan):
    """[(manifest shard entry, attrs)] by index: the committed shards with their retired rows, then the new ones."""
    live = {}
    for index, row in plan.live:
        live.setdefault(index, set()).add(row)
    entries = []
    for index in sorted(state.shards):
        shard = state.shards[index]
        rows = len(shard.ids)
        retired = [row for row in range(rows) if row not in live.get(index, ())]
        entries.append((_entry(shard.path, shard.attrs, rows, retired), shard.attrs))
    for new in plan.new:
        path = out_dir / shards.shard_filename(new.index)
        attrs = shards.read_shard_attrs(path)
        if attrs is None:
            raise PipelineError(f"{out_dir} lacks shards of this update ({path.name}); rerun the same command to compute them")
        entries.append((_entry(path, attrs, int(attrs["rows"]), []), attrs))
    return entries


def _entry(path, attrs, rows, retired):
    size, mtime = _stat(path)
    return {
        "file": path.name,
        "rows": rows,
        "live": rows - len(retired),
        "generation": attrs["generation"],
        "retired": retired,
        "bytes": size,
        "mtime_ns": mtime,
    }


def _same_manifest(on_disk, rebuilt, stats):
    """Whether a manifest read from disk says all that the rebuilt one says (its timing aside).

    Without `stats`, what the shards cannot contradict is set aside too: the shard files' stats
    and where the listing was and what it looked like (a copied collection, a touched file).
    """

    def comparable(manifest):
        manifest = {key: value for key, value in manifest.items() if key != "timing"}
        if not stats and isinstance(manifest.get("config"), dict):
            manifest["config"] = {key: value for key, value in manifest["config"].items() if key not in SOURCE_KEYS}
        if not stats and isinstance(manifest.get("shards"), list):
            manifest["shards"] = [
                {k: v for k, v in s.items() if k not in ("bytes", "mtime_ns")} if isinstance(s, dict) else s
                for s in manifest["shards"]
            ]
        return manifest

    return isinstance(on_disk.get("timing"), dict) and comparable(on_disk) == json.loads(json.dumps(comparable(rebuilt)))


def _make_manifest(run, listing, entries, errors, generation, history, started, computed):
    """The manifest of `entries` ([(shard entry, attrs)]) for this listing."""
    attrs = [a for _, a in entries]
    if not attrs:
        raise PipelineError("no shards of this run to describe; rerun the same command")
    checked = [a["fidelity"] for a in attrs if a["fidelity"] and a["fidelity"]["rows_checked"]]
    seconds = time.perf_counter() - started
    config = {key: value for key, value in run.config.items() if key not in SOURCE_KEYS}
    return shards.make_manifest(
        config={**config, "source": str(Path(listing.root).resolve()), "source_sha256": listing.fingerprint()},
        config_sha256=run.config_sha256,
        weights=attrs[0]["weights"],
        taps=attrs[0]["taps"],
        classes=listing.classes,
        shards=[entry for entry, _ in entries],
        listed=len(listing.records),
        errors=errors,
        precision={
            "policy": run.config["precision"],
            "xla": run.config["xla"],
            "min_cosine_vs_float32": min((f["min_cosine_vs_float32"] for f in checked), default=1.0),
            "rows_checked": sum(f["rows_checked"] for f in checked),
        },
        timing={"seconds": round(seconds, 3), "images": computed, "images_per_second": round(computed / seconds, 2)},
        history=history,
        generation=generation,
    )


def _warnings(manifest):
    precision = manifest["precision"]
    if precision["min_cosine_vs_float32"] < FIDELITY_THRESHOLD:
        return [
            f"{precision['policy']} features differ from float32: min cosine "
            f"{precision['min_cosine_vs_float32']:.4f} < {FIDELITY_THRESHOLD}; consider --precision float32"
        ]
    return []


def _remove_outputs(out_dir, shard_paths):
    """Delete a previous run's manifest (first, so it is never stale) and its shards; one already gone is fine."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for path in shard_paths:
        path.unlink(missing_ok=True)


# --- compact ---


@dataclass
class CompactResult:
    out_dir: Path
    shards_before: int
    shards_after: int
    rows: int  # live rows, all kept
    retired: int  # retired rows dropped


def compact(out_dir: Path | str) -> CompactResult:
    """Rewrite a features directory's live rows (and errors) into fresh shards with nothing retired; swap it in atomically.

    The new shards are what a first run over the same listing would lay out (ids sorted,
    `shard_size` listed images each), every live row keeping its feature bytes, labels mapped to
    the manifest's classes; they keep the directory's generation and its history. The old
    directory stays whole until the new one replaces it in one step.
    """
    out_dir = Path(out_dir)
    shards.read_manifest(out_dir)  # a clear sentence for what is not a features directory
    with locked(out_dir / LOCK_NAME, f"features directory {out_dir}"):
        for leftover in leftover_temps(out_dir.absolute().parent, out_dir.absolute().name):  # a killed compact's
            remove(leftover)
        manifest = shards.read_manifest(out_dir)
        problems = shards.verify(out_dir)
        if problems:
            raise PipelineError(
                f"{out_dir} has {len(problems)} problem(s) ({problems[0]}); rerun `pipeline extract` to repair it, then compact"
            )
        retired = sum(len(entry.get("retired", [])) for entry in manifest["shards"])
        if not retired:
            return CompactResult(out_dir, len(manifest["shards"]), len(manifest["shards"]), manifest["rows"], 0)
        staging = temp_sibling(out_dir.absolute())
        staging.mkdir()
        try:
            entries = _write_compacted(out_dir, manifest, staging)
            shards.write_manifest(staging, {**manifest, "shards": entries, "rows": sum(e["live"] for e in entries)})
            swap_dir(staging, out_dir)
        finally:
            remove(staging)
    return CompactResult(out_dir, len(manifest["shards"]), len(entries), manifest["rows"], retired)


def _write_compacted(out_dir, manifest, staging):
    """Write the compacted shards into `staging`; return their manifest entries."""
    state = _State({}, set(), set(), manifest.get("generation", 0), [], True, 0, False)
    items = []  # (id, "row", shard index, row) or (id, "error", shard index, error entry)
    errors = {e["id"] for e in manifest["errors"]}
    for entry in manifest["shards"]:
        index = int(shards.SHARD_PATTERN.match(entry["file"]).group(1))
        shard = _Shard(index, out_dir / entry["file"], shards.read_shard_attrs(out_dir / entry["file"]))
        _read_rows(shard, manifest["classes"])
        state.shards[index] = shard
        retired = set(entry.get("retired", []))
        items += [(image_id, "row", index, row) for row, image_id in enumerate(shard.ids) if row not in retired]
        items += [(e["id"], "error", index, e) for e in shard.attrs["errors"] if e["id"] in errors]
    chosen = {}
    for item in items:  # an error listed by several shards: the newest
        chosen[(item[0], item[1])] = item
    items = sorted(chosen.values(), key=lambda item: item[0])
    first = state.attrs_any()
    size = int(manifest["config"].get("shard_size", 4096))
    precision = manifest["precision"]
    class_index = {name: i for i, name in enumerate(manifest["classes"])}
    entries = []
    for k, start in enumerate(range(0, len(items), size)):
        part = items[start : start + size]
        rows = [item for item in part if item[1] == "row"]
        features = (
            _copied_features(state, [(index, row) for _, _, index, row in rows])
            if rows
            else {tap["key"]: np.zeros((0, tap["dim"]), manifest["config"]["storage_dtype"]) for tap in first["taps"]}
        )
        labels = []
        for _, _, index, row in rows:
            shard, label = state.shards[index], int(state.shards[index].labels[row])
            labels.append(class_index[shard.classes[label]] if label >= 0 else -1)
        content = [_content_of(state.shards[item[2]], item[0]) for item in part]
        listed = (
            None
            if None in content
            else shards.Listed(
                [item[0] for item in part],
                np.array([c[0] for c in content], np.int64),
                np.array([c[1] for c in content], np.int64),
                [c[2] for c in content],
            )
        )
        data = shards.ShardData(
            ids=[item[0] for item in rows],
            labels=np.array(labels, np.int32),
            splits=[state.shards[index].splits[row] for _, _, index, row in rows],
            features=features,
            errors=[item[3] for item in part if item[1] == "error"],
            fidelity={
                "min_cosine_vs_float32": precision["min_cosine_vs_float32"] if k == 0 else 1.0,
                "rows_checked": precision.get("rows_checked", 0) if k == 0 else 0,
            },
            listed=listed,
        )
        path = staging / shards.shard_filename(k)
        shards.write_shard(
            path,
            data,
            index=k,
            config_sha256=manifest["config_sha256"],
            config=first["config"],
            storage_dtype=manifest["config"]["storage_dtype"],
            weights=first["weights"],
            taps=first["taps"],
            generation=state.generation,
            classes=manifest["classes"],
            device=_common_device(state, {item[2] for item in part}),
        )
        entries.append(_entry(path, {"generation": state.generation}, data.rows, []))
    return entries


def _common_device(state, indices):
    """The `device` record of the shards `indices` when they all have the same one, else None (not recorded)."""
    devices = {json.dumps(state.shards[index].attrs.get("device"), sort_keys=True) for index in indices}
    return json.loads(devices.pop()) if len(devices) == 1 else None


def _content_of(shard, image_id):
    """(size, mtime_ns, sha256) a shard's listing recorded for an image, or None."""
    if shard.listed is None:
        return None
    if shard.content is None:
        listed = shard.listed
        sha = listed.sha256 or [""] * len(listed.ids)
        shard.content = {i: (int(n), int(t), h) for i, n, t, h in zip(listed.ids, listed.sizes, listed.mtimes_ns, sha)}
    return shard.content.get(image_id)


def _check_space(out_dir, images, shard_count, taps, storage_dtype, freeable=0):
    """Fail before computing when the pending shards cannot fit on the output's filesystem.

    `freeable` bytes (the old outputs --overwrite replaces, still on disk) count as free.
    """
    row_bytes = sum(tap["dim"] for tap in taps) * np.dtype(storage_dtype).itemsize + 256  # plus ids and bookkeeping
    needed = int(images * row_bytes * _SPACE_MARGIN)
    check_space(out_dir, needed, f"{shard_count} shards need", freeable, "the old features")


def _bytes(paths):
    """The total size of the files at `paths` (one already gone counts 0)."""
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total
