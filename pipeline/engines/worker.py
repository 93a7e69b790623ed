"""One extraction worker: builds the fused tap model once, then turns whole shards into shard files.

Every engine runs shards through this class (the local engine in its own process, a Ray actor
on another machine, a job-array task), so every shard gets the same bytes through the same
writer. The forward pass runs on the calling thread over a prefetched tf.data stream; finished
shards go to a one-thread background writer so HDF5 writing overlaps compute.
"""

import collections
import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline import backbones, shards
from pipeline.config import ExtractConfig, parse_weights, tap_backbone, tap_layer
from pipeline.engines import RunIdentity, ShardJob
from pipeline.errors import PipelineError
from pipeline.files import storage_errors
from pipeline.inputs import UndecodableImage, decode_with_pillow, image_batches, resize_image

FIDELITY_ROWS = 8  # rows of each shard's first batch also run in float32 to check reduced precision
_MAX_PENDING_WRITES = 2  # shards buffered for the writer before compute waits


class ShardWorker:
    """The model of one resolved config, loaded once; `run` computes and writes shards with it.

    `eager` skips tracing the forward pass (a second or two of start-up) for runs too small to
    repay it; the features are the same.
    """

    def __init__(self, config: ExtractConfig, eager: bool = False):
        gpu = backbones.has_gpu()
        if gpu:
            backbones.enable_gpu_memory_growth()
            tf.config.experimental.enable_op_determinism()  # cuDNN autotuning is not deterministic
        self.config = backbones.resolve(config, gpu, backbones.cpu_flags())
        sources = parse_weights(self.config.weights, self.config.backbones, self.config.seed)
        trunks = {name: backbones.build_backbone(name, self.config.image_size, self.config.precision) for name in self.config.backbones}
        tap_infos = backbones.check_taps(self.config.taps, trunks)
        self.taps = [_tap_entry(info, self.config.pooling) for info in tap_infos.values()]
        self.dims = {tap["key"]: tap["dim"] for tap in self.taps}
        # Loading weights (numpy's generator, HDF5 reads, hashing) releases the GIL, so it overlaps tracing.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights") as pool:
            loading = pool.submit(backbones.load_trunk_weights, trunks, sources)
            self._runner = _TapRunner(trunks, self.config, eager and not self.config.xla)
            self.weights = loading.result()
        self._runner.start_twin()

    def run(self, jobs: list[ShardJob], run: RunIdentity, out_dir, progress=None) -> None:
        """Compute every job and write its shard into `out_dir`; `progress(n)` as images are done."""
        with contextlib.closing(self.steps(jobs, run, out_dir)) as steps:  # closing: an error here still waits for the writer
            for images in steps:
                if progress is not None:
                    progress(images)

    def steps(self, jobs: list[ShardJob], run: RunIdentity, out_dir):
        """`run` as a generator: yields the images done since the last yield, after every batch; ends once every shard is written."""
        done = []
        records = [record for job in jobs for record in job.records]
        offsets = np.cumsum([0, *(len(job.records) for job in jobs)])
        batches = image_batches(
            [None if r.problem else r.path for r in records],
            list(zip(offsets[:-1].tolist(), offsets[1:].tolist())),
            self.config.batch_size, self.config.image_size, self.config.resize, self.config.fast_decode,
        )
        with _ShardWriter(Path(out_dir), run, self.config.storage_dtype) as writer:
            assembler = _ShardAssembler(self, jobs, offsets, writer, done.append)
            for indices, images in batches:
                assembler.add(indices.numpy(), images)
                writer.raise_failure()
                yield _take(done)
            assembler.finish()
            yield _take(done)


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
    """The forward pass (traced unless eager), plus its float32 twin for the fidelity check.

    The twin is built on a background thread once the weights are in, while the first batch
    decodes and computes; building Keras layers is Python work, computing them is not.
    """

    def __init__(self, trunks, config, eager):
        self.config, self._trunks = config, trunks
        model = backbones.build_tap_model(trunks, config.taps, config.pooling, config.image_size)
        if eager:
            self._forward = lambda images: model(images, training=False)
        else:
            self._forward = backbones.compile_forward(model, config.image_size, config.xla, config.batch_size, trace=True)
        self._twin = None

    def start_twin(self):
        if self.config.precision != "float32":
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="float32-twin")
            self._twin = pool.submit(backbones.float32_twin, self._trunks, self.config)
            pool.shutdown(wait=False)

    def __call__(self, images):
        return {key: value.numpy() for key, value in self._forward(images).items()}

    def fidelity(self, images, features):
        """{min_cosine_vs_float32, rows_checked} of this policy's `features` of `images` (first FIDELITY_ROWS)."""
        rows = min(int(images.shape[0]), FIDELITY_ROWS)
        if self._twin is None:
            return {"min_cosine_vs_float32": 1.0, "rows_checked": rows}
        reference = {key: value.numpy() for key, value in self._twin.result()(images[:rows], training=False).items()}
        cosines = np.concatenate([row_cosines(features[key][:rows], reference[key]) for key in reference])
        return {"min_cosine_vs_float32": float(cosines.min()), "rows_checked": rows}


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
    """Collects batch outputs per shard; fills TensorFlow's decode gaps with Pillow; hands shards to the writer."""

    def __init__(self, worker, jobs, offsets, writer, progress):
        self.worker, self.jobs, self.offsets, self.writer, self.progress = worker, jobs, offsets, writer, progress
        self.config = worker.config
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
        """Features of one batch, as they will be stored; the shard's first batch also gets the fidelity check.

        Both what the model computed and its cast to the storage dtype must be finite: float16
        holds nothing above 65504, which the float32 pooling can exceed.
        """
        features = self.worker._runner(images)
        dtype = np.dtype(self.config.storage_dtype)
        for key, values in features.items():
            record = self._first_non_finite(indices, values)
            if record is not None:
                raise PipelineError(
                    f"{self.config.precision} gives non-finite features (NaN or Inf) for {record.id} at tap {key}; "
                    "rerun with --precision float32"
                )
        if self.fidelity is None:
            self.fidelity = self.worker._runner.fidelity(images, features)
        with np.errstate(over="ignore"):  # an overflow is found below, and named
            stored = {key: values.astype(dtype, copy=False) for key, values in features.items()}
        for key, values in stored.items():
            record = self._first_non_finite(indices, values)
            if record is not None:
                largest = float(np.abs(features[key][~np.isfinite(values)]).max())
                raise PipelineError(
                    f"--storage-dtype {dtype} cannot hold the features of {record.id} at tap {key} (values up to "
                    f"{largest:.4g}, more than {dtype}'s largest {float(np.finfo(dtype).max):g}); rerun with --storage-dtype float32"
                )
        return stored

    def _first_non_finite(self, indices, values):
        """The record of the first row of `values` with a NaN or Inf, or None."""
        bad = ~np.isfinite(values).all(axis=1)
        return self._record(indices[np.flatnonzero(bad)[0]]) if bad.any() else None

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
        rescued, errors = self._fallback(missing)
        self.progress(len(missing))
        if rescued:
            parts.append(rescued)
        indices = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        order = np.argsort(indices, kind="stable")
        features = {
            key: (np.concatenate([p[1][key] for p in parts])[order] if parts else np.zeros((0, dim), np.float32))
            for key, dim in self.worker.dims.items()
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

    def _fallback(self, missing):
        """Decode what TensorFlow could not; return (indices, features) and error entries.

        Pictures are decoded, computed and dropped `batch_size` at a time, so a shard that only
        Pillow can read holds one batch of pictures, not the whole shard. The batches are the
        same as decoding all first and then computing would give, so the features are too.
        """
        batch, rescued, pictures, outputs, errors = self.config.batch_size, [], [], [], []

        def compute():
            indices = np.array(rescued[len(rescued) - len(pictures) :], np.int64)
            outputs.append(self._compute(indices, tf.stack(pictures)))
            pictures.clear()

        for index in missing:
            record = self._record(index)
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
            del pixels
            if len(pictures) == batch:
                compute()
        if pictures:
            compute()
        if not rescued:
            return None, errors
        features = {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}
        return (np.array(rescued, np.int64), features), errors


class _ShardWriter:
    """One background thread writing finished shards; at most a few wait in memory.

    A failed write stops the run at the next batch (`raise_failure`), not after every image.
    Only the writes not yet checked are kept, so checking after every batch costs the same
    however many shards the run has written.
    """

    def __init__(self, out_dir, run, storage_dtype):
        self.out_dir, self.run, self.storage_dtype = out_dir, run, storage_dtype
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
                path, data, index=shard, config_sha256=self.run.config_sha256, config=self.run.config,
                storage_dtype=self.storage_dtype, weights=self.run.weights, taps=self.run.taps,
                generation=self.run.generation, classes=self.run.classes,
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
