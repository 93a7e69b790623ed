"""Stage one into a used --out: what the shards, the manifest and the flags decide on a rerun."""

import json
import shutil

import h5py
import pytest

from helpers import FAST, write_image_tree
from pipeline import shards
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError


def edit_shard_config(path, **changes):
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["config"])
        f.attrs["config"] = json.dumps({**config, **changes}, sort_keys=True)


def test_a_run_config_is_rebuilt_from_its_record_and_unknown_settings_are_one_sentence():
    config = ExtractConfig(taps=("vgg16/block1_pool",), image_size=32)
    record = {**config.to_dict(), "source": "/images", "source_sha256": "0" * 64}
    assert ExtractConfig.from_record(record, "r") == config
    assert ExtractConfig.from_record(record, "r", pooling="max").pooling == "max"
    with pytest.raises(
        PipelineError, match=r"^r records extraction settings this version does not know \(colour\); use the pipeline"
    ):
        ExtractConfig.from_record({**record, "colour": "red"}, "r")


def test_resuming_shards_that_record_a_setting_this_version_does_not_know_is_one_sentence(tmp_path, image_tree, run_cli):
    root, out = image_tree(), tmp_path / "f"
    args = [*FAST, "--shard-size", 4]
    run_cli("extract", root, "--out", out, *args)
    (out / "manifest.json").unlink()
    (out / "shard-00001.h5").unlink()
    edit_shard_config(out / "shard-00000.h5", future_knob=1)
    result = run_cli("extract", root, "--out", out, *args, code=1)
    assert f"Error: a shard in {out} records extraction settings this version does not know (future_knob)" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def outputs(out):
    """Every file of a features dir but the lock, by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".pipeline.lock"}


def test_overwrite_is_refused_in_a_job_array_task_and_nothing_is_deleted(tmp_path, image_tree, run_cli):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *FAST, "--shard-size", 2)
    before = outputs(out)
    result = run_cli(
        "extract",
        root,
        "--out",
        out,
        *FAST,
        "--shard-size",
        2,
        "--pooling",
        "max",
        "--overwrite",
        "--num-workers",
        2,
        "--worker-index",
        1,
        code=1,
    )
    assert "Error: --overwrite is refused in a job-array task (here task 1 of 2)" in result.output
    assert f"replace the old features with a plain run first, or delete {out}" in result.output
    assert outputs(out) == before


def test_removing_the_old_outputs_tolerates_a_shard_already_gone(tmp_path):
    from pipeline.extract import _remove_outputs

    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "shard-00000.h5").write_bytes(b"old")
    _remove_outputs(tmp_path, [tmp_path / "shard-00000.h5", tmp_path / "shard-00001.h5"])
    assert list(tmp_path.iterdir()) == []


def test_many_shards_are_planned_each_once_in_order(tmp_path, monkeypatch):
    """30,000 one-image shards: every one handed to the engine once, in shard order, with its image.

    (A `k in pending` over a list once made this planning quadratic; speed is `make bench`'s job,
    so this checks only what is planned.)
    """
    from types import SimpleNamespace

    from pipeline.extract import extract
    from pipeline.sources import ImageRecord, Listing

    count = 30_000
    records = tuple(ImageRecord(f"{i:06d}.png", f"/nowhere/{i:06d}.png", -1, "", 1, 1) for i in range(count))
    seen = {}

    class Planned(Exception):
        pass

    class Engine:
        def start(self, config, eager=False):
            return SimpleNamespace(config=config, weights={}, taps=[{"key": "vgg16/block1_pool", "dim": 1}])

        def run(self, jobs, run, out_dir, progress):
            seen["jobs"] = jobs
            raise Planned()

        def close(self):
            pass

    monkeypatch.setattr("pipeline.engines.make_engine", lambda *a, **k: Engine())
    config = ExtractConfig(taps=("vgg16/block1_pool",), shard_size=1, weights="random")
    with pytest.raises(Planned):
        extract(config, Listing(str(tmp_path), records, ()), tmp_path / "f")
    assert [job.index for job in seen["jobs"]] == list(range(count))
    assert all(job.records == (records[job.index],) for job in seen["jobs"][:: count // 100])


def fake_free_space(monkeypatch, free):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("pipeline.files.shutil.disk_usage", lambda path: usage(10**12, 10**12 - free, free))


def test_overwrite_without_room_for_the_new_features_keeps_the_old_ones(tmp_path, image_tree, run_cli, monkeypatch):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *FAST)
    before = outputs(out)
    fake_free_space(monkeypatch, 100)
    monkeypatch.setattr("pipeline.extract._SPACE_MARGIN", 1000.0)  # the new features outgrow even the old ones' room
    result = run_cli("extract", root, "--out", out, *FAST, "--pooling", "max", "--overwrite", code=1)
    assert "MiB the old features would free) where" in result.output and "free space (or use another --out)" in result.output
    assert outputs(out) == before


def test_the_space_check_counts_what_overwrite_frees(tmp_path, monkeypatch):
    from pipeline.extract import _check_space

    fake_free_space(monkeypatch, 2**20)
    taps = [{"dim": 1000}]  # 1000 rows x 4256 bytes x 1.1: about 4.5 MiB
    with pytest.raises(PipelineError, match=r"^1 shards need about 4 MiB but only 1 MiB are free where"):
        _check_space(tmp_path, 1000, 1, taps, "float32")
    _check_space(tmp_path, 1000, 1, taps, "float32", freeable=4 * 2**20)  # 5 MiB with the old features'


def test_temp_files_a_concurrent_task_makes_while_the_directory_is_read_are_never_foreign(
    tmp_path, image_tree, run_cli, monkeypatch
):
    """Regression: three listings of --out (temps, shards, everything) disagreed when a task wrote in between."""
    import pathlib

    from pipeline.files import temp_sibling

    out = tmp_path / "f"
    out.mkdir()
    iterdir = pathlib.Path.iterdir

    def another_task_starts_a_shard(self):
        if self == out:  # every listing sees one more temp file, as when job-array tasks write at once
            temp_sibling(out / "shard-00007.h5", pid=99999).write_bytes(b"half a shard")
        return iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", another_task_starts_a_shard)
    # task 1 of 2 has no shard of its own (6 images make one shard), so it only reads the directory
    result = run_cli("extract", image_tree(), "--out", out, *FAST, "--num-workers", 2, "--worker-index", 1)
    assert "job-array task 1 of 2: 0 shards written" in result.output


def shard_stats(out):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.existing_shards(out)}


def _edit(change):
    def edit(path):
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))

    return edit


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """(image root, a finished features dir of two shards, its extract flags), made once: copy the dir to change it."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    work = tmp_path_factory.mktemp("two-shards")
    root = write_image_tree(work / "images")
    args = [*FAST, "--shard-size", "4"]
    result = CliRunner().invoke(cli, ["extract", str(root), "--out", str(work / "features"), *args])
    assert result.exit_code == 0, result.output
    return root, work / "features", args


@pytest.mark.parametrize(
    "edit, warning",
    [
        (_edit(lambda m: [m.pop("config_sha256"), m.pop("config")]), "did not match its shards"),
        (_edit(lambda m: m["config"].update(pooling="max")), "did not match its shards"),
        (_edit(lambda m: m.update(config_sha256="0" * 64)), "did not match its shards"),
        (_edit(lambda m: m["taps"][0].update(dim=7)), "did not match its shards"),
        (_edit(lambda m: m["taps"].pop()), "did not match its shards"),
        (_edit(lambda m: m["weights"]["vgg16"].update(sha256="0" * 64)), "did not match its shards"),
        (_edit(lambda m: m.update(classes=["dog", "cat"])), "did not match its shards"),
        (_edit(lambda m: m["precision"].update(policy="mixed_float16")), "did not match its shards"),
        (_edit(lambda m: m.pop("timing")), "did not match its shards"),
        (lambda path: path.write_text('{"rows": '), "could not be read (Expecting value: line 1 column 10"),
        (lambda path: path.write_text("[1, 2]"), "could not be read (a JSON list, not an object)"),
        (lambda path: path.write_bytes(b"\xff\xfe"), "could not be read ("),
    ],
)
def test_an_edited_or_broken_manifest_is_rebuilt_from_the_shards_without_computing(
    tmp_path, two_shards, run_cli, monkeypatch, edit, warning
):
    root, finished, args = two_shards
    out = tmp_path / "f"
    shutil.copytree(finished, out)
    good = json.loads((out / "manifest.json").read_text())
    before = shard_stats(out)
    edit(out / "manifest.json")
    monkeypatch.setattr("pipeline.engines.make_engine", lambda *a, **k: pytest.fail("a shard was recomputed"))
    result = run_cli("extract", root, "--out", out, *args)
    assert f"warning: {out / 'manifest.json'} {warning}" in result.output
    assert "0 shards written, 2 already done" in result.output and "Traceback" not in result.output
    assert shard_stats(out) == before
    rebuilt = json.loads((out / "manifest.json").read_text())
    if "could not be read" in warning:  # the history is in the manifest alone: a new entry stands for the shards found
        assert [{**h, "time": None} for h in rebuilt["history"]] == [{**h, "time": None} for h in good["history"]]
        rebuilt["history"] = good["history"]
    assert {k: v for k, v in rebuilt.items() if k != "timing"} == {k: v for k, v in good.items() if k != "timing"}
    assert shards.verify(out) == [] and "up to date" in run_cli("extract", root, "--out", out, *args).output


def test_a_manifest_whose_timing_alone_differs_is_up_to_date(tmp_path, image_tree, run_cli):
    root, out = image_tree(), tmp_path / "f"
    run_cli("extract", root, "--out", out, *FAST)
    _edit(lambda m: m["timing"].update(seconds=12345.0))(out / "manifest.json")
    result = run_cli("extract", root, "--out", out, *FAST)
    assert "up to date" in result.output and "warning" not in result.output
