"""The one exception type for user mistakes; the CLI turns it into a one-line message."""


class PipelineError(Exception):
    """A problem the user can fix (a bad flag, file, config or directory)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (for a sentence quoting it), or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def worker_error(error: BaseException) -> BaseException:
    """What the driver raises for an error a worker (a Ray task or actor) raised.

    A worker's PipelineError comes back as the same one sentence, not the remote traceback; anything
    else (a bug) is `error` itself, which keeps that traceback.
    """
    cause = getattr(error, "cause", None)  # RayTaskError's: the exception raised in the worker
    return PipelineError(str(cause)) if isinstance(cause, PipelineError) else error
