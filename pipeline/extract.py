"""Stage one: plan shards over the sorted listing, skip finished ones, run the fused taps, write.

The forward pass runs on the main thread over a prefetched tf.data stream; finished shards go
to a one-thread background writer so HDF5 writing overlaps compute. The manifest is written
last, so a directory without one is an unfinished run that a rerun completes.
"""

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline import backbones, shards
from pipeline.config import sha256_json, tap_backbone, tap_layer
from pipeline.errors import PipelineError
from pipeline.inputs import UndecodableImage, decode_with_pillow, image_batches, resize_image

FIDELITY_THRESHOLD = 0.99  # min cosine vs float32 below which a reduced-precision run warns
_MAX_PENDING_WRITES = 2  # shards buffered for the writer before compute waits


@dataclass
class ExtractResult:
    manifest: dict
    out_dir: Path
    written: int  # shards computed by this call
    skipped: int  # shards already finished by an earlier call
    up_to_date: bool = False  # the directory already held this run, manifest included
    warnings: list = field(default_factory=list)


def resolve(config, gpu, flags):
    """Replace `auto` choices by what this machine gets, so the saved config says what ran."""
    policy = backbones.choose_policy(config.precision, gpu, flags)
    xla = gpu if config.xla is None else config.xla
    return dataclasses.replace(config, precision=policy, xla=xla)


def extract(config, listing, out_dir, *, overwrite=False, progress=None, expected_weights=None):
    """Run stage one over a `sources.Listing`; `progress(n)` is called as images are done.

    `expected_weights` ({backbone: {source, sha256}}, as a manifest records them) makes loaded
    weights with another fingerprint fail before any image is run. Returns an ExtractResult.
    """
    out_dir = Path(out_dir)
    gpu = backbones.has_gpu()
    if gpu:
        backbones.enable_gpu_memory_growth()
        tf.config.experimental.enable_op_determinism()  # cuDNN autotuning is not deterministic
    config = resolve(config, gpu, backbones.cpu_flags())
    weight_sources = backbones.parse_weights(config.weights, config.backbones)
    trunks = {name: backbones.build_backbone(name, config.image_size) for name in config.backbones}
    tap_infos = backbones.check_taps(config.taps, trunks)

    source_sha256 = listing.fingerprint()
    run_config = {**config.to_dict(), "source": str(Path(listing.root).resolve()), "source_sha256": source_sha256}
    run_sha = sha256_json({"config": config.sha256(), "source_sha256": source_sha256})
    existing = _prepare_out_dir(out_dir, run_sha, run_config, overwrite)

    n = len(listing.records)
    ranges = [(start, min(start + config.shard_size, n)) for start in range(0, n, config.shard_size)]
    done = {k for k in range(len(ranges)) if _is_finished(out_dir / shards.shard_filename(k), run_sha, k)}
    if existing is not None and len(done) == len(ranges):
        return ExtractResult(existing, out_dir, written=0, skipped=len(ranges), up_to_date=True)

    started = time.perf_counter()
    weights = backbones.load_trunk_weights(trunks, weight_sources, config.seed)
    if expected_weights is not None:
        backbones.check_fingerprints(weights, expected_weights)
    runner = _TapRunner(trunks, config)

    pending = [k for k in range(len(ranges)) if k not in done]
    paths = [None if r.problem else r.path for r in listing.records]  # a record with a problem is never read
    batches = image_batches(
        paths, [ranges[k] for k in pending], config.batch_size, config.image_size, config.resize, config.fast_decode
    )
    meta = {"run_sha": run_sha, "run_config": run_config, "storage_dtype": config.storage_dtype}
    with _ShardWriter(out_dir, meta) as writer:
        dims = {key: backbones.tap_dim(info.channels, config.pooling) for key, info in tap_infos.items()}
        assembler = _ShardAssembler(listing, config, dims, ranges, runner, writer, progress)
        for indices, images in batches:
            features = runner(images)
            if runner.fidelity is None:
                runner.check_fidelity(images, features)
            assembler.add(indices.numpy(), features)
        assembler.finish(pending)
    if runner.fidelity is None:  # everything was written before; check on the first batch anyway
        first = image_batches(paths, [ranges[0]], config.batch_size, config.image_size, config.resize, config.fast_decode)
        indices, images = next(iter(first))
        runner.check_fidelity(images)
    seconds = time.perf_counter() - started

    entries, errors = [], []
    for k in range(len(ranges)):
        attrs = shards.read_shard_attrs(out_dir / shards.shard_filename(k))
        entries.append({"file": shards.shard_filename(k), "rows": int(attrs["rows"])})
        errors.extend(attrs["errors"])
    computed = sum(stop - start for k, (start, stop) in enumerate(ranges) if k in pending)
    manifest = shards.make_manifest(
        config=run_config,
        config_sha256=run_sha,
        weights=weights,
        taps=[_tap_entry(info, config.pooling) for info in tap_infos.values()],
        classes=listing.classes,
        shards=entries,
        listed=n,
        errors=errors,
        precision={"policy": config.precision, "xla": config.xla, **runner.fidelity},
        timing={"seconds": round(seconds, 3), "images": computed, "images_per_second": round(computed / seconds, 2)},
    )
    shards.write_manifest(out_dir, manifest)
    warnings = []
    if runner.fidelity["min_cosine_vs_float32"] < FIDELITY_THRESHOLD:
        warnings.append(
            f"{config.precision} features differ from float32: min cosine "
            f"{runner.fidelity['min_cosine_vs_float32']:.4f} < {FIDELITY_THRESHOLD}; consider --precision float32"
        )
    return ExtractResult(manifest, out_dir, written=len(pending), skipped=len(done), warnings=warnings)


def _tap_entry(info, pooling):
    return {
        "key": info.key,
        "backbone": tap_backbone(info.key),
        "layer": tap_layer(info.key),
        "channels": info.channels,
        "dim": backbones.tap_dim(info.channels, pooling),
        "pooling": pooling,
        "stride": info.stride,
    }


def _is_finished(path, run_sha, index):
    attrs = shards.read_shard_attrs(path)
    return attrs is not None and attrs["config_sha256"] == run_sha and int(attrs["shard_index"]) == index


def _prepare_out_dir(out_dir, run_sha, run_config, overwrite):
    """Make `out_dir` ready for this run; return its manifest if it already holds this run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / shards.MANIFEST_NAME
    ours = shards.existing_shards(out_dir) + ([manifest_path] if manifest_path.exists() else [])
    if overwrite:
        for path in sorted(ours, key=lambda p: p != manifest_path):  # manifest first: never stale
            path.unlink()
        return None
    for leftover in out_dir.glob("*.tmp"):  # half-written files of an interrupted run
        leftover.unlink()
    previous = None
    if manifest_path.exists():
        previous = shards.read_manifest(out_dir)
        previous_sha, previous_config = previous["config_sha256"], previous["config"]
    else:
        attrs = next(filter(None, map(shards.read_shard_attrs, shards.existing_shards(out_dir))), None)
        if attrs is None:
            if any(out_dir.iterdir()):
                raise PipelineError(
                    f"output directory {out_dir} is not empty and holds no features; choose an empty or new directory"
                )
            return None
        previous_sha, previous_config = attrs["config_sha256"], attrs["config"]
    if previous_sha != run_sha:
        raise PipelineError(
            f"{out_dir} holds features of a different run ({_differences(previous_config, run_config)}); "
            "use another --out or pass --overwrite"
        )
    return previous


def _differences(old, new):
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in ("on_error", "source")]
    if not keys:
        return "same settings, other images"
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


class _TapRunner:
    """The compiled forward pass, plus the float32 twin used once for the fidelity check."""

    def __init__(self, trunks, config):
        args = (trunks, config.taps, config.pooling, config.image_size)
        model = backbones.build_tap_model(*args, policy=config.precision)
        self._forward = backbones.compile_forward(model, config.image_size, config.xla)
        self._reference = None
        if config.precision != "float32":
            reference = backbones.build_tap_model(*args, policy="float32")
            self._reference = backbones.compile_forward(reference, config.image_size, xla=False)
        self.fidelity = None

    def __call__(self, images):
        return {key: value.numpy() for key, value in self._forward(images).items()}

    def check_fidelity(self, images, features=None):
        """Min cosine similarity between this policy's and float32's features on one batch.

        `features` are this policy's outputs for `images` when the caller already has them.
        """
        rows = int(images.shape[0])
        if self._reference is None:
            self.fidelity = {"min_cosine_vs_float32": 1.0, "rows_checked": rows}
            return
        ours = self(images) if features is None else features
        reference = {key: value.numpy() for key, value in self._reference(images).items()}
        cosines = [row_cosines(ours[key], reference[key]) for key in ours]
        self.fidelity = {"min_cosine_vs_float32": float(np.min(cosines)), "rows_checked": rows}


def row_cosines(a, b):
    """Cosine similarity of each row of `a` with the same row of `b` (1.0 where a row is all zeros)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    both_zero = norms == 0
    return np.where(both_zero, 1.0, dots / np.where(both_zero, 1.0, norms))


class _ShardAssembler:
    """Collects batch outputs per shard; fills TensorFlow's decode gaps with Pillow; hands off."""

    def __init__(self, listing, config, dims, ranges, runner, writer, progress):
        self.records, self.config, self.dims, self.ranges = listing.records, config, dims, ranges
        self.runner, self.writer, self.progress = runner, writer, progress or (lambda n: None)
        self.current, self.parts = None, []

    def add(self, indices, features):
        shard = int(indices[0]) // self.config.shard_size
        if shard != self.current:
            self._flush()
            self.current = shard
        self.parts.append((indices, features))
        self.progress(len(indices))

    def finish(self, pending):
        self._flush()
        for shard in pending:  # shards where every image needed the fallback
            if not self.writer.has(shard):
                self.current = shard
                self._flush()

    def _flush(self):
        if self.current is None:
            return
        shard, parts = self.current, self.parts
        self.current, self.parts = None, []
        start, stop = self.ranges[shard]
        seen = {int(i) for indices, _ in parts for i in indices}
        missing = [i for i in range(start, stop) if i not in seen]
        rescued, errors = self._fallback(missing)
        self.progress(len(missing))
        if rescued:
            parts.append(rescued)
        indices = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        order = np.argsort(indices, kind="stable")
        indices = indices[order]
        features = {
            key: (np.concatenate([p[1][key] for p in parts])[order] if parts else np.zeros((0, dim), np.float32))
            for key, dim in self.dims.items()
        }
        records = [self.records[i] for i in indices]
        data = shards.ShardData(
            ids=[r.id for r in records],
            labels=np.array([r.label for r in records], np.int32),
            splits=[r.split for r in records],
            features=features,
            errors=errors,
        )
        self.writer.submit(shard, data)

    def _fallback(self, missing):
        """Decode what TensorFlow could not; return (indices, features) and error entries."""
        rescued, pictures, errors = [], [], []
        for index in missing:
            record = self.records[index]
            try:
                if record.problem:
                    raise UndecodableImage(record.problem)
                pixels = decode_with_pillow(record.path)
            except UndecodableImage as e:
                if self.config.on_error == "fail":
                    raise PipelineError(f"cannot decode {record.path}: {e} (--on-error fail stops here)") from None
                errors.append({"id": record.id, "path": record.path, "reason": str(e)})
                continue
            rescued.append(index)
            pictures.append(resize_image(tf.constant(pixels), self.config.image_size, self.config.resize))
        if not rescued:
            return None, errors
        batch = self.config.batch_size
        outputs = [self.runner(tf.stack(pictures[i : i + batch])) for i in range(0, len(pictures), batch)]
        features = {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}
        return (np.array(rescued, np.int64), features), errors


class _ShardWriter:
    """One background thread writing finished shards; at most a few wait in memory."""

    def __init__(self, out_dir, meta):
        self.out_dir, self.meta = out_dir, meta
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.futures = {}

    def has(self, shard):
        return shard in self.futures

    def submit(self, shard, data):
        waiting = [f for f in self.futures.values() if not f.done()]
        if len(waiting) >= _MAX_PENDING_WRITES:
            waiting[0].result()
        self.futures[shard] = self.pool.submit(
            shards.write_shard,
            self.out_dir / shards.shard_filename(shard),
            data,
            index=shard,
            config_sha256=self.meta["run_sha"],
            config=self.meta["run_config"],
            storage_dtype=self.meta["storage_dtype"],
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True)
        if exc[0] is None:
            for future in self.futures.values():
                future.result()  # surface a failed write
