"""The one exception type for user mistakes; the CLI turns it into a one-line message."""


class PipelineError(Exception):
    """A problem the user can fix (a bad flag, file, config or directory)."""
