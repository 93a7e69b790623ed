"""One extraction worker: builds the fused tap model once, then turns whole shards into shard files.

Every engine runs shards through this class (the local engine in its own process, a Ray actor
on another machine, a job-array task), so every shard gets the same bytes through the same
writer. The forward pass runs on the calling thread over a prefetched tf.data stream; finished
shards go to a one-thread background writer so HDF5 writing overlaps compute.
"""

import collections
import contextlib
import dataclasses
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline import backbones, devices, shards
from pipeline.config import ExtractConfig, parse_weights, tap_backbone, tap_layer
from pipeline.engines import RunIdentity, ShardTask
from pipeline.errors import PipelineError
from pipeline.files import storage_errors
from pipeline.inputs import exif_orientation, image_batches, pillow_batches

FIDELITY_ROWS = 8  # rows of each shard's first batch also run in float32 to check reduced precision
_MAX_PENDING_WRITES = 2  # shards buffered for the writer before compute waits


class ShardWorker:
    """The model of one resolved config, loaded once; `run` computes and writes shards with it.

    `eager` skips tracing the forward pass (a second or two of start-up) for runs too small to
    repay it, and XLA's compile too (tens of seconds on a GPU), even when asked for; without XLA
    the features are the same as traced ones. `device` says what computes, as each shard records it.
    """

    def __init__(self, config: ExtractConfig, eager: bool = False):
        for problem in devices.configure():  # first thing in extract and in a Ray actor; a no-op after predict's
            warnings.warn(problem, stacklevel=2)
        gpus = devices.tensorflow_gpus()
        gpu = bool(gpus)
        deterministic = gpu and config.deterministic
        if deterministic:  # cuDNN and XLA pick kernels by timing them, which need not pick alike twice
            tf.config.experimental.enable_op_determinism()
        resolved = backbones.resolve(config, gpu, backbones.cpu_flags(), devices.compute_capability(gpus))
        if eager and config.xla is None:  # auto: a run this small is not worth an XLA compile
            resolved = dataclasses.replace(resolved, xla=False)
        self.config = resolved
        self.input_device = "/gpu:0" if gpu else None  # batches cross to it ahead of use
        sources = parse_weights(self.config.weights, self.config.backbones, self.config.seed)
        trunks = {
            name: backbones.build_backbone(name, self.config.image_size, self.config.precision) for name in self.config.backbones
        }
        tap_infos = backbones.check_taps(self.config.taps, trunks)
        self.taps = [_tap_entry(info, self.config.pooling) for info in tap_infos.values()]
        self.dims = {tap["key"]: tap["dim"] for tap in self.taps}
        if self.config.xla and not eager:
            # XLA's program cache knows a program by its function's name, which numbers the functions TensorFlow
            # made before it: tracing while weights load would number it differently in every process.
            self.weights = backbones.load_trunk_weights(trunks, sources)
            self._runner = _TapRunner(trunks, self.config, eager)
        else:  # loading weights (numpy's generator, HDF5 reads, hashing) releases the GIL, so it overlaps tracing
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights") as pool:
                loading = pool.submit(backbones.load_trunk_weights, trunks, sources)
                self._runner = _TapRunner(trunks, self.config, eager)
                self.weights = loading.result()
        self._runner.start_twin()
        self.device = backbones.device_record(gpu, self._runner.forward, deterministic)

    def run(self, jobs: list[ShardTask], run: RunIdentity, out_dir, progress=None) -> None:
        """Compute every job and write its shard into `out_dir`; `progress(n)` as images are done."""
        with contextlib.closing(self.steps(jobs, run, out_dir)) as steps:  # closing: an error here still waits for the writer
            for images in steps:
                if progress is not None:
                    progress(images)

    def steps(self, jobs: list[ShardTask], run: RunIdentity, out_dir):
        """`run` as a generator: yields the images done since the last yield, after every batch; ends once every shard is written."""
        done = []
        records = [record for job in jobs for record in job.records]
        offsets = np.cumsum([0, *(len(job.records) for job in jobs)])
        orientations = _orientations(records) if self.config.exif_orientation else None
        batches = image_batches(
            [None if r.problem else r.path for r in records],
            list(zip(offsets[:-1].tolist(), offsets[1:].tolist())),
            self.config.batch_size,
            self.config.image_size,
            self.config.resize,
            self.config.fast_decode,
            orientations,
            self.input_device,
        )
        with _ShardWriter(Path(out_dir), run, self.config.storage_dtype, self.device) as writer:
            assembler = _ShardAssembler(self._runner, self.dims, self.config, jobs, offsets, writer, done.append, orientations)
            for indices, images in batches:
                assembler.add(indices.numpy(), images)
                writer.raise_failure()
                yield _take(done)
            assembler.finish()
            yield _take(done)


def _orientations(records):
    """The EXIF orientation of every record's image (1 for a file the listing found unsafe to read); headers read on a few threads."""
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="exif") as pool:
        return list(pool.map(lambda r: 1 if r.problem else exif_orientation(r.path), records))


def _take(counts):
    """The sum of `counts`, which are then cleared."""
    total = sum(counts)
    counts.clear()
    return total


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


class _TapRunner:
    """The forward pass (traced unless eager), its float32 twin for the fidelity check, and the checks on what it computes.

    The twin is built on a background thread once the weights are in, while the first batch
    decodes and computes; building Keras layers is Python work, computing them is not.
    """

    def __init__(self, trunks, config, eager):
        self.config, self._trunks = config, trunks
        model = backbones.build_tap_model(trunks, config.taps, config.pooling, config.image_size)
        if eager:
            self._forward, self.forward = (lambda images: model(images, training=False)), "eager"
        else:
            self._forward = backbones.compile_forward(model, config.image_size, config.xla, config.batch_size, trace=True)
            self.forward = "xla" if config.xla else "traced"
        self._twin = None

    def start_twin(self):
        if self.config.precision != "float32":
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="float32-twin")
            self._twin = pool.submit(backbones.float32_twin, self._trunks, self.config)
            pool.shutdown(wait=False)

    def __call__(self, images):
        try:
            return {key: value.numpy() for key, value in self._forward(images).items()}
        except tf.errors.ResourceExhaustedError:
            raise PipelineError(
                f"the device ran out of memory computing a batch of {int(images.shape[0])} images of "
                f"{self.config.image_size}x{self.config.image_size} px; rerun with a smaller --batch-size "
                f"(now {self.config.batch_size}) or --image-size"
            ) from None

    def features(self, images, row_id, check_fidelity=False):
        """(features of one batch as they will be stored, the fidelity check of its first rows or None unless `check_fidelity`).

        Both what the model computed and its cast to the storage dtype must be finite: float16
        holds nothing above 65504, which the float32 pooling can exceed. `row_id(row)` names the
        image of a batch row in the error.
        """
        features = self(images)
        dtype = np.dtype(self.config.storage_dtype)
        for key, values in features.items():
            row = _first_non_finite(values)
            if row is not None:
                raise PipelineError(
                    f"{self.config.precision} gives non-finite features (NaN or Inf) for {row_id(row)} at tap {key}; "
                    "rerun with --precision float32"
                )
        fidelity = self.fidelity(images, features) if check_fidelity else None
        with np.errstate(over="ignore"):  # an overflow is found below, and named
            stored = {key: values.astype(dtype, copy=False) for key, values in features.items()}
        for key, values in stored.items():
            row = _first_non_finite(values)
            if row is not None:
                largest = float(np.abs(features[key][~np.isfinite(values)]).max())
                raise PipelineError(
                    f"--storage-dtype {dtype} cannot hold the features of {row_id(row)} at tap {key} (values up to "
                    f"{largest:.4g}, more than {dtype}'s largest {float(np.finfo(dtype).max):g}); rerun with --storage-dtype float32"
                )
        return stored, fidelity

    def fidelity(self, images, features):
        """{min_cosine_vs_float32, rows_checked} of this policy's `features` of `images` (first FIDELITY_ROWS)."""
        rows = min(int(images.shape[0]), FIDELITY_ROWS)
        if self._twin is None:
            return {"min_cosine_vs_float32": 1.0, "rows_checked": rows}
        reference = {key: value.numpy() for key, value in self._twin.result()(images[:rows], training=False).items()}
        cosines = np.concatenate([row_cosines(features[key][:rows], reference[key]) for key in reference])
        return {"min_cosine_vs_float32": float(cosines.min()), "rows_checked": rows}


def _first_non_finite(values):
    """The first row of `values` with a NaN or Inf, or None."""
    bad = ~np.isfinite(values).all(axis=1)
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def row_cosines(a, b):
    """Cosine similarity of each row of `a` with the same row of `b`; 1.0 where both rows are all zeros.

    Rows must be finite (the worker refuses non-finite features before it gets here).
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    return np.where(both_zero, 1.0, np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0))


class _ShardAssembler:
    """Groups batch outputs by shard, the Pillow rescue's included, and hands each finished shard to the writer."""

    def __init__(self, runner, dims, config, jobs, offsets, writer, progress, orientations=None):
        self.runner, self.dims, self.config = runner, dims, config
        self.jobs, self.offsets, self.writer, self.progress = jobs, offsets, writer, progress
        self.orientations = orientations  # EXIF orientation by record index, or None: images as stored
        self.current, self.parts, self.fidelity = None, [], None

    def add(self, indices, images):
        job = int(np.searchsorted(self.offsets, indices[0], side="right")) - 1
        if job != self.current:
            self._flush()
            self.current = job
        features = self._compute(indices, images)
        self.parts.append((indices, features))
        self.progress(len(indices))

    def finish(self):
        self._flush()
        for job in range(len(self.jobs)):  # shards where no image decoded through TensorFlow
            if not self.writer.has(self.jobs[job].index):
                self.current = job
                self._flush()

    def _compute(self, indices, images):
        """Features of one batch, as they will be stored; the shard's first batch also gets the fidelity check."""
        features, fidelity = self.runner.features(
            images, lambda row: self._record(indices[row]).id, check_fidelity=self.fidelity is None
        )
        if fidelity is not None:
            self.fidelity = fidelity
        return features

    def _record(self, index):
        job = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.jobs[job].records[index - self.offsets[job]]

    def _flush(self):
        if self.current is None:
            return
        job, parts = self.jobs[self.current], self.parts
        start = self.offsets[self.current]
        self.current, self.parts = None, []
        seen = {int(i) for indices, _ in parts for i in indices}
        missing = [i for i in range(start, start + len(job.records)) if i not in seen]
        errors = []
        parts.extend(self._rescue(missing, errors))
        self.progress(len(missing))
        indices = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        order = np.argsort(indices, kind="stable")
        features = {
            key: (np.concatenate([p[1][key] for p in parts])[order] if parts else np.zeros((0, dim), np.float32))
            for key, dim in self.dims.items()
        }
        records = [self._record(i) for i in indices[order]]
        data = shards.ShardData(
            ids=[r.id for r in records],
            labels=np.array([r.label for r in records], np.int32),
            splits=[r.split for r in records],
            features=features,
            errors=errors,
            fidelity=self.fidelity or {"min_cosine_vs_float32": 1.0, "rows_checked": 0},
            listed=shards.Listed(
                [r.id for r in job.records],
                np.array([r.size for r in job.records], np.int64),
                np.array([r.mtime_ns for r in job.records], np.int64),
                paths=[None if r.problem else r.path for r in job.records],  # hashed by the writer
            ),
        )
        self.fidelity = None
        self.writer.submit(job.index, data)

    def _rescue(self, missing, errors):
        """[(indices, features)] of the `missing` images that Pillow decodes; the others' error entries go to `errors`."""

        def failed(index, reason):
            record = self._record(index)
            if self.config.on_error == "fail":
                raise PipelineError(f"cannot decode {record.path}: {reason} (--on-error fail stops here)") from None
            errors.append({"id": record.id, "path": record.path, "reason": reason})

        items = [(index, record.path, record.problem) for index, record in ((i, self._record(i)) for i in missing)]
        batches = pillow_batches(
            items, self.config.batch_size, self.config.image_size, self.config.resize, failed, self.orientations
        )
        return [(indices, self._compute(indices, images)) for indices, images in batches]


class _ShardWriter:
    """One background thread writing finished shards; at most a few wait in memory.

    A failed write stops the run at the next batch (`raise_failure`), not after every image.
    Only the writes not yet checked are kept, so checking after every batch costs the same
    however many shards the run has written.
    """

    def __init__(self, out_dir, run, storage_dtype, device=None):
        self.out_dir, self.run, self.storage_dtype, self.device = out_dir, run, storage_dtype, device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.submitted = set()  # shard indices handed to the writer
        self.pending = collections.deque()  # their futures not yet seen to succeed, in submission (= completion) order

    def has(self, shard):
        return shard in self.submitted

    def submit(self, shard, data):
        self.raise_failure()
        if len(self.pending) >= _MAX_PENDING_WRITES:
            self.pending[0].result()
            self.raise_failure()
        self.submitted.add(shard)
        self.pending.append(self.pool.submit(self._write, shard, data))

    def _write(self, shard, data):
        path = self.out_dir / shards.shard_filename(shard)
        remedy = "the shards written so far are kept, so free space (or fix the rights) and rerun the same command to resume"
        with storage_errors(path, remedy):
            shards.write_shard(
                path,
                data,
                index=shard,
                config_sha256=self.run.config_sha256,
                config=self.run.config,
                storage_dtype=self.storage_dtype,
                weights=self.run.weights,
                taps=self.run.taps,
                device=self.device,
                generation=self.run.generation,
                classes=self.run.classes,
            )

    def raise_failure(self):
        """Raise the error of a finished write that failed; forget the ones that succeeded."""
        while self.pending and self.pending[0].done():
            error = self.pending[0].exception()
            if error is not None:
                raise error
            self.pending.popleft()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True)
        if exc[0] is None:
            for future in self.pending:
                future.result()  # surface a failed write
