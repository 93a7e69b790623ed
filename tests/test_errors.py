"""The sentences errors become: a worker's error back in the driver, an exception quoted in a sentence."""

from pipeline.errors import PipelineError, first_line, worker_error


class RayTaskError(Exception):
    """As Ray raises it in the driver: the remote traceback as its message, the worker's exception as `cause`."""

    def __init__(self, cause):
        super().__init__(f"ray::run_shard() (pid=7, ip=127.0.0.1)\nTraceback (most recent call last):\n{cause!r}")
        self.cause = cause


def test_a_worker_s_pipeline_error_comes_back_as_its_sentence_and_a_bug_as_itself():
    sentence = worker_error(RayTaskError(PipelineError("shard-00003.h5 is damaged; extract again")))
    assert type(sentence) is PipelineError and str(sentence) == "shard-00003.h5 is damaged; extract again"
    bug = RayTaskError(ZeroDivisionError("division by zero"))
    assert worker_error(bug) is bug


def test_first_line_quotes_the_first_non_blank_line_or_the_type():
    assert first_line(OSError("\n  no route to host  \nat line 2")) == "no route to host"
    assert first_line(KeyError()) == "KeyError"
