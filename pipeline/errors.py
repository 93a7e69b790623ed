"""The one exception type for user mistakes; the CLI turns it into a one-line message."""


class PipelineError(Exception):
    """A problem the user can fix (a bad flag, file, config or directory)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (for a sentence quoting it), or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
