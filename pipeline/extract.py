"""Stage one: plan shards over the sorted listing, skip finished ones, run the rest on an engine, write the manifest.

Shard k holds the listed images k*S .. (k+1)*S-1 of the id-sorted listing. Each shard records
what the manifest needs (config hash, weights, taps, errors, fidelity), so the manifest is
rebuilt from the shards alone and written last: by the driver, or by a plain rerun after
job-array tasks (which write shards only). A directory without a manifest is an unfinished run
that a rerun completes. This module does not import TensorFlow: an up-to-date rerun, or one that
only writes the manifest, never loads it or builds a model.
"""

import bisect
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline import shards
from pipeline.config import ExtractConfig, check_tap_layers, parse_weights, sha256_json
from pipeline.errors import PipelineError
from pipeline.files import DIR_LOCK_NAME, check_space, is_temp, leftover_temps, output_guard, read_json, remove
from pipeline.lineage import MANIFEST_NAME, check_fingerprints
from pipeline.sources import Listing

FIDELITY_THRESHOLD = 0.99  # min cosine vs float32 below which a reduced-precision run warns
LOCK_NAME = DIR_LOCK_NAME  # in the features dir: one writer at a time (job-array tasks share it)
_AUTO = {"precision": "auto", "xla": None, "exif_orientation": None}  # requested values that any resolved value satisfies
_SPACE_MARGIN = 1.1  # free disk space wanted beyond the estimated size of the pending shards
# Listings this small run the model eagerly: tracing costs ~2 s, eager calls ~0.1 s more per 224 px image (2 CPU cores).
EAGER_MAX_IMAGES = 16


class ProgressSink(Protocol):
    """What `extract` reports progress to."""

    def start(self, total: int, done: int) -> None:
        """`total` listed images, of which `done` were finished by an earlier run."""

    def __call__(self, images: int) -> None:
        """`images` more were computed (or found undecodable)."""


@dataclass
class ExtractResult:
    manifest: shards.Manifest | None  # None for a job-array task, which writes no manifest
    out_dir: Path
    written: int  # shards computed by this call
    skipped: int  # shards already finished by an earlier call (or left to other job-array tasks)
    up_to_date: bool = False  # the directory already held this run, manifest included
    warnings: list = field(default_factory=list)


@dataclass(frozen=True)
class _Run:
    """A run found in (or planned for) the output directory."""

    config_sha256: str
    config: dict  # resolved config plus source keys, as shards and manifest record it
    manifest: dict | None = None  # manifest.json as found (parsed, not checked)
    manifest_problem: str | None = None  # why manifest.json could not be read, when it could not


def extract(
    config: ExtractConfig, listing: Listing, out_dir: Path | str, *, overwrite: bool = False,
    progress: ProgressSink | None = None, expected_weights: dict | None = None,
    engine: str = "local", engine_options: dict | None = None, num_workers: int = 1, worker_index: int = 0,
) -> ExtractResult:
    """Run stage one over a `sources.Listing` into `out_dir`.

    `expected_weights` ({backbone: {source, sha256}}, as a manifest records them) makes loaded
    weights with another fingerprint fail before any image is run. `engine` is "local" or "ray"
    (with `engine_options` for it). With `num_workers` > 1 this process is job-array task
    `worker_index`: it computes only the shards k with k % num_workers == worker_index and writes
    no manifest.
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
            config, listing, out_dir, overwrite, progress, expected_weights, engine, engine_options or {},
            (num_workers, worker_index), started,
        )


def _extract_locked(config, listing, out_dir, overwrite, progress, expected_weights, engine_name, engine_options, array, started):
    num_workers, worker_index = array
    source_sha256 = listing.fingerprint()
    ranges = [(start, min(start + config.shard_size, len(listing.records))) for start in range(0, len(listing.records), config.shard_size)]
    snapshot = _snapshot(out_dir)
    existing = _existing_run(out_dir, snapshot)
    resumed = existing is not None and _same_run(existing.config, config, source_sha256)
    if existing is not None and not resumed and not overwrite:
        raise PipelineError(
            f"{out_dir} holds features of a different run ({_differences(existing.config, config, source_sha256, snapshot.shards, listing)}); "
            "use another --out or pass --overwrite"
        )
    finished = _finished(out_dir, existing.config_sha256, len(ranges)) if resumed else {}
    done = set(finished)
    if resumed and len(done) == len(ranges):
        return _finish_without_computing(existing, finished, listing, out_dir, progress, expected_weights, num_workers > 1, started)
    pending = {k for k in range(len(ranges)) if k not in done and k % num_workers == worker_index}
    if not pending:  # a job-array task whose shards are all done, while others' are not
        return ExtractResult(None, out_dir, written=0, skipped=len(ranges), up_to_date=True)

    to_run = _run_config_to_extract(existing.config, config, out_dir) if resumed else config
    from pipeline.engines import RunIdentity, ShardTask, make_engine  # the local engine loads TensorFlow, once there is something to compute

    engine = make_engine(engine_name, **engine_options)
    try:
        # The decision is on the whole listing, so a resumed run makes it as the first did.
        worker = engine.start(to_run, eager=len(listing.records) <= EAGER_MAX_IMAGES)
        resolved = dataclasses.replace(worker.config, on_error=config.on_error)
        run = _Run(
            sha256_json({"config": resolved.sha256(), "source_sha256": source_sha256}),
            {**resolved.to_dict(), "source": str(Path(listing.root).resolve()), "source_sha256": source_sha256},
        )
        if expected_weights is not None:
            check_fingerprints(worker.weights, expected_weights)
        if resumed:
            _check_same_weights(out_dir, done, worker.weights)
        if num_workers == 1:
            _remove_leftovers(out_dir)
        overwriting = existing is not None and not resumed
        replaced = [out_dir / MANIFEST_NAME, *snapshot.shards] if overwriting else []
        _check_space(out_dir, ranges, pending, worker.taps, resolved.storage_dtype, freeable=_bytes(replaced))
        if overwriting:  # only now that the new run is known to load and to fit
            _remove_outputs(out_dir, replaced[1:])
        progress.start(_images(ranges, pending | done), _images(ranges, done))
        jobs = [ShardTask(k, listing.records[slice(*ranges[k])]) for k in sorted(pending)]
        engine.run(jobs, RunIdentity(run.config_sha256, run.config, worker.weights, worker.taps), out_dir, progress)
        if num_workers == 1:
            _remove_leftovers(out_dir)  # a worker killed while writing (a Ray actor) leaves its temp file
    finally:
        engine.close()
    computed = _images(ranges, pending)
    if num_workers > 1:
        return ExtractResult(None, out_dir, written=len(pending), skipped=len(ranges) - len(pending))
    manifest = _write_manifest(out_dir, run, listing, len(ranges), started, computed)
    return ExtractResult(manifest, out_dir, written=len(pending), skipped=len(done), warnings=_warnings(manifest))


class _NoProgress:
    def start(self, total, done):
        pass

    def __call__(self, images):
        pass


def _remove_leftovers(out_dir):
    """Delete the temp files of killed writers; only while this run is the directory's one writer."""
    for leftover in leftover_temps(out_dir):
        remove(leftover)


def _images(ranges, indices):
    return sum(ranges[k][1] - ranges[k][0] for k in indices)


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

    The shards say which run it is (their attrs carry its config and hash); the manifest is data
    derived from them, read here only to compare it with what they say, and it names the run only
    when no shard can be read. A directory holding other files and no features is refused: it is
    not ours to fill.
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


def _same_run(recorded, config, source_sha256):
    """Whether a recorded run config is what `config` asks for on these images (`auto` matches what it resolved to)."""
    if recorded.get("source_sha256") != source_sha256:
        return False
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
    """The recorded run's resolved config, to finish it exactly as it began (with this call's on_error and deterministic)."""
    return ExtractConfig.from_record(recorded, f"a shard in {out_dir}", on_error=config.on_error, deterministic=config.deterministic)


def _differences(recorded, config, source_sha256, shard_paths, listing):
    wanted = config.to_dict()
    keys = [
        key for key in wanted
        if key not in ExtractConfig._UNHASHED and _recorded(recorded, key) != wanted[key] and not (key in _AUTO and wanted[key] == _AUTO[key])
    ]
    if keys:
        return ", ".join(f"{key}: {_recorded(recorded, key)!r} -> {wanted[key]!r}" for key in keys)
    return _changed_images(shard_paths, listing, recorded.get("shard_size")) or "same settings, other images"


def _changed_images(shard_paths, listing, shard_size):
    """A sentence naming the first image (by id) listed now or then but not both, or changed since the shards were made.

    Each shard lists the images of its range, so all of them list every image of the old run
    up to the last id of the last full shard they know; an image listed now in a stretch that no
    readable shard covers is not called new. None when the shards cannot tell.
    """
    then = {}  # id -> (size, mtime_ns) when the shards were made
    covered = []  # (after, until): ids strictly between them were all listed by some readable shard ("" and None: no bound)
    previous = None  # (index, last id) of the readable shard before
    for path in shard_paths:
        index = int(shards.SHARD_PATTERN.match(path.name).group(1))
        try:
            listed = shards.read_listed(path)
        except (OSError, KeyError):  # an unreadable or damaged shard tells nothing
            continue
        if listed is None:
            return None  # shards written before listings were stored: nothing to compare
        if not listed.ids:
            continue
        then.update((i, (int(size), int(mtime))) for i, size, mtime in zip(listed.ids, listed.sizes, listed.mtimes_ns))
        after = "" if index == 0 else previous[1] if previous is not None and previous[0] == index - 1 else listed.ids[0]
        until = None if shard_size is None or len(listed.ids) < shard_size else listed.ids[-1]
        covered.append((after, until))
        previous = (index, listed.ids[-1])
    if not then:
        return None
    now = {record.id: record for record in listing.records}
    found = {}  # id -> sentence
    for image_id in then.keys() - now.keys():
        found[image_id] = f"{image_id} was listed then but not now"
    starts = [after for after, _ in covered]
    for image_id in now.keys() - then.keys():
        k = bisect.bisect_left(starts, image_id) - 1  # the last stretch that begins before the id
        if k >= 0 and (covered[k][1] is None or image_id < covered[k][1]):
            found[image_id] = f"{image_id} is listed now but was not then"
    for image_id in then.keys() & now.keys():
        (size, mtime), record = then[image_id], now[image_id]
        if (size, mtime) != (record.size, record.mtime_ns):
            found[image_id] = (
                f"{image_id} changed since: {size} -> {record.size} bytes, modified {_when(mtime)} -> {_when(record.mtime_ns)}"
            )
    return found[min(found)] if found else None


def _when(mtime_ns):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(mtime_ns) / 1e9))


def _finished(out_dir, run_sha, count):
    """{index: attrs} of the shards of this run that are complete on disk."""
    done = {}
    for k in range(count):
        attrs = shards.read_shard_attrs(out_dir / shards.shard_filename(k))
        if attrs is not None and attrs["config_sha256"] == run_sha and int(attrs["shard_index"]) == k:
            done[k] = attrs
    return done


def _finish_without_computing(existing, finished, listing, out_dir, progress, expected_weights, task, started):
    """Every shard is done (`finished`: their attrs by index): report up to date, or (re)write the manifest, without a model."""
    progress.start(len(listing.records), len(listing.records))
    count, attrs = len(finished), [finished[k] for k in sorted(finished)]
    if expected_weights is not None and attrs:
        check_fingerprints(attrs[0]["weights"], expected_weights)
    if task:
        return ExtractResult(None, out_dir, written=0, skipped=count, up_to_date=True)
    manifest = _make_manifest(out_dir, existing, listing, count, attrs, started, computed=0)
    if existing.manifest is not None and _same_manifest(existing.manifest, manifest):
        return ExtractResult(existing.manifest, out_dir, written=0, skipped=count, up_to_date=True)
    path = out_dir / MANIFEST_NAME
    if existing.manifest_problem is not None:
        warnings = [f"{path} could not be read ({existing.manifest_problem}), so it was rebuilt from the shards"]
    elif existing.manifest is not None:
        warnings = [f"{path} did not match its shards, so it was rebuilt from them"]
    else:
        warnings = []  # killed between the last shard and the manifest
    shards.write_manifest(out_dir, manifest)
    return ExtractResult(manifest, out_dir, written=0, skipped=count, warnings=warnings + _warnings(manifest))


def _all_attrs(shard_paths, run_sha):
    attrs = []
    for path in shard_paths:
        found = shards.read_shard_attrs(path)
        if found is not None and found["config_sha256"] == run_sha:
            attrs.append(found)
    return sorted(attrs, key=lambda a: int(a["shard_index"]))


def _same_manifest(on_disk, rebuilt):
    """Whether a manifest read from disk says all that the one rebuilt from the shards says (its timing aside)."""
    def comparable(manifest):
        return {key: value for key, value in manifest.items() if key != "timing"}

    return isinstance(on_disk.get("timing"), dict) and comparable(on_disk) == json.loads(json.dumps(comparable(rebuilt)))


def _write_manifest(out_dir, run, listing, count, started, computed):
    """The manifest from the shards now in `out_dir`, written last and atomically."""
    attrs = _all_attrs(shards.existing_shards(out_dir), run.config_sha256)
    manifest = _make_manifest(out_dir, run, listing, count, attrs, started, computed)
    shards.write_manifest(out_dir, manifest)
    return manifest


def _make_manifest(out_dir, run, listing, count, attrs, started, computed):
    """The manifest that the shards' `attrs` (every one of the run's `count` must be there) make."""
    if [int(a["shard_index"]) for a in attrs] != list(range(count)):
        raise PipelineError(f"{out_dir} lacks shards of this run; rerun the same command to compute them")
    checked = [a["fidelity"] for a in attrs if a["fidelity"] and a["fidelity"]["rows_checked"]]
    seconds = time.perf_counter() - started
    return shards.make_manifest(
        config=run.config,
        config_sha256=run.config_sha256,
        weights=attrs[0]["weights"],
        taps=attrs[0]["taps"],
        classes=listing.classes,
        shards=[{"file": shards.shard_filename(int(a["shard_index"])), "rows": int(a["rows"])} for a in attrs],
        listed=len(listing.records),
        errors=[e for a in attrs for e in a["errors"]],
        precision={
            "policy": run.config["precision"],
            "xla": run.config["xla"],
            "min_cosine_vs_float32": min((f["min_cosine_vs_float32"] for f in checked), default=1.0),
            "rows_checked": sum(f["rows_checked"] for f in checked),
        },
        timing={"seconds": round(seconds, 3), "images": computed, "images_per_second": round(computed / seconds, 2)},
    )


def _warnings(manifest):
    precision = manifest["precision"]
    if precision["min_cosine_vs_float32"] < FIDELITY_THRESHOLD:
        return [
            f"{precision['policy']} features differ from float32: min cosine "
            f"{precision['min_cosine_vs_float32']:.4f} < {FIDELITY_THRESHOLD}; consider --precision float32"
        ]
    return []


def _check_same_weights(out_dir, done, weights):
    """A resumed run must load the weights its finished shards were computed with (a weights file may have changed)."""
    for k in sorted(done)[:1]:
        recorded = shards.read_shard_attrs(out_dir / shards.shard_filename(k))["weights"]
        if recorded is not None:
            check_fingerprints(weights, recorded)


def _remove_outputs(out_dir, shard_paths):
    """Delete a previous run's manifest (first, so it is never stale) and its shards; one already gone is fine."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for path in shard_paths:
        path.unlink(missing_ok=True)


def _check_space(out_dir, ranges, pending, taps, storage_dtype, freeable=0):
    """Fail before computing when the pending shards cannot fit on the output's filesystem.

    `freeable` bytes (the old outputs --overwrite replaces, still on disk) count as free.
    """
    row_bytes = sum(tap["dim"] for tap in taps) * np.dtype(storage_dtype).itemsize + 256  # plus ids and bookkeeping
    needed = int(_images(ranges, pending) * row_bytes * _SPACE_MARGIN)
    check_space(out_dir, needed, f"{len(pending)} shards need", freeable, "the old features")


def _bytes(paths):
    """The total size of the files at `paths` (one already gone counts 0)."""
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total
