"""The local engine: one ShardWorker in this process computes every pending shard in turn."""

from pipeline.engines.worker import ShardWorker


class LocalEngine:
    """Start a worker (model built, weights loaded); run shard tasks on it."""

    def start(self, config, eager=False):
        """Build the worker for `config`; return it, so the driver can read its resolved config, weights and taps."""
        self.worker = ShardWorker(config, eager)
        return self.worker

    def run(self, tasks, run, out_dir, progress):
        self.worker.run(tasks, run, out_dir, progress)

    def close(self):
        self.worker = None
