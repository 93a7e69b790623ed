"""The stage-one commands as a user types them: config files, summaries and every error path."""

import io
import subprocess
import sys

import h5py
import numpy as np
import pytest

from helpers import RANDOM_32PX
from pipeline import shards


def test_extract_prints_progress_and_a_closing_summary(tmp_path, image_tree, run_cli):
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", *RANDOM_32PX, "--tap", "vgg16:block1_pool")
    assert "extract: 6/6 images" in result.output and "images/s" in result.output
    assert "extracted 6 rows, 0 errors" in result.output
    assert "taps: vgg16/block1_pool (64)" in result.output
    assert "precision: " in result.output and "time: " in result.output


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream, expected", [(Terminal, "10/10 [00:0"), (io.StringIO, "extract: 10/10 images, ")])
def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise(monkeypatch, stream, expected):
    from pipeline.cli import Progress

    monkeypatch.setattr(sys, "stderr", stream())
    progress = Progress("extract")
    progress.start(10, 0)
    progress(4)
    progress(6)
    progress.close()
    shown = sys.stderr.getvalue()
    assert expected in shown
    assert ("\r" in shown) == (stream is Terminal)  # only the bar redraws itself in place


def test_backbone_flag_selects_the_default_taps_of_that_backbone(tmp_path, image_tree, run_cli):
    run_cli("extract", image_tree(), "--out", tmp_path / "f", *RANDOM_32PX, "--backbone", "vgg16", "--storage-dtype", "float16")
    manifest = shards.read_manifest(tmp_path / "f")
    assert [t["key"] for t in manifest["taps"]] == ["vgg16/block4_conv3", "vgg16/block5_conv3"]
    assert list(manifest["weights"]) == ["vgg16"]
    with h5py.File(tmp_path / "f" / "shard-00000.h5") as f:
        assert f["features/vgg16/block5_conv3"].dtype == np.float16


def test_config_file_fills_options_and_flags_win(tmp_path, image_tree, run_cli):
    (tmp_path / "run.toml").write_text(
        'tap = ["vgg16:block1_pool"]\nimage-size = 40\npooling = "max"\nweights = "random"\nshard_size = 2\n'
    )
    run_cli("extract", image_tree(), "--out", tmp_path / "f", "--config", tmp_path / "run.toml", "--pooling", "avgmax")
    manifest = shards.read_manifest(tmp_path / "f")
    config = manifest["config"]
    assert (config["image_size"], config["pooling"], config["shard_size"]) == (40, "avgmax", 2)
    assert manifest["taps"] == [
        {
            "key": "vgg16/block1_pool",
            "backbone": "vgg16",
            "layer": "block1_pool",
            "channels": 64,
            "dim": 128,
            "pooling": "avgmax",
            "stride": 2,
        }
    ]
    assert len(manifest["shards"]) == 3


def test_manifest_records_config_weights_classes_and_timing(tmp_path, image_tree, run_cli):
    root = image_tree(classes=("zebra", "ant"))
    run_cli("extract", root, "--out", tmp_path / "f", *RANDOM_32PX, "--tap", "resnet50:conv2_block1_out")
    m = shards.read_manifest(tmp_path / "f")
    assert m["classes"] == ["ant", "zebra"] and m["rows"] == m["listed"] == 6
    assert m["config"]["source"] == str(root.resolve()) and len(m["config"]["source_sha256"]) == 64
    assert m["weights"]["resnet50"]["source"] == {"kind": "random", "seed": 0} and len(m["weights"]["resnet50"]["sha256"]) == 64
    assert m["precision"]["policy"] in ("float32", "mixed_bfloat16") and m["timing"]["images"] == 6
    data = shards.read_shard(tmp_path / "f" / "shard-00000.h5")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1] and data.ids[0] == "ant/000.png"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--tap", "vgg16:block9_conv9"], 1, "unknown tap 'vgg16/block9_conv9'; valid vgg16 layers are: block1_conv1"),
        (["--tap", "alexnet:conv1"], 1, "tap 'alexnet:conv1' is not BACKBONE:LAYER"),
        (["--backbone", "vgg16", "--tap", "resnet50:conv2_block1_out"], 2, "is not on the chosen backbone(s) vgg16"),
        (["--backbone", "inception"], 2, "'inception' is not one of 'resnet50', 'vgg16'"),
        (["--pooling", "median"], 2, "'median' is not one of 'avg', 'max', 'avgmax'"),
        (["--image-size", "16"], 2, "16 is not in the range 32<=x<=2048"),
        (["--image-size", "100000"], 2, "100000 is not in the range 32<=x<=2048"),
        (["--seed", "-1"], 2, "-1 is not in the range x>=0"),
        (["--batch-size", "0"], 2, "0 is not in the range x>=1"),
        (["--shard-size", "0"], 2, "0 is not in the range x>=1"),
        (["--precision", "int8"], 2, "'int8' is not one of"),
        (["--weights", "best"], 1, "weights 'best' is not imagenet, random or BACKBONE=PATH"),
        (["--weights", "resnet50=/no/file.h5,vgg16=random"], 1, "weights file /no/file.h5 for resnet50 does not exist"),
    ],
)
def test_bad_flags_fail_with_one_clear_sentence(tmp_path, image_tree, run_cli, args, code, message):
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", "--image-size", "32", *args, code=code)
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "f" / "manifest.json").exists()


def test_missing_and_empty_sources(tmp_path, run_cli):
    assert "does not exist" in run_cli("extract", tmp_path / "nope", "--out", tmp_path / "f", code=2).output
    (tmp_path / "empty").mkdir()
    assert "holds no images" in run_cli("extract", tmp_path / "empty", "--out", tmp_path / "f", code=1).output


@pytest.mark.parametrize(
    "toml, code, message",
    [
        ('colour = "red"\n', 1, "has unknown key(s) colour; allowed: backbone"),
        ('pooling = "median"\n', 1, "c.toml: pooling 'median' is not one of avg, max, avgmax"),
        ("image_size = [\n", 1, "is not valid TOML"),
        ("seed = 1.5\n", 1, "c.toml: seed 1.5 must be an integer"),
        ("seed = -3\n", 1, "c.toml: seed -3 must be an integer at least 0"),
        ("image-size = 40\nimage_size = 48\n", 1, "sets image_size twice (as image-size and as image_size); keep one"),
        ("image_size = 100000\n", 1, "image_size 100000 must be an integer between 32 and 2048"),
        ('fast_decode = "yes"\n', 1, "fast_decode 'yes' must be true or false"),
        ("tap = [3]\n", 1, "tap [3] must be a string or a list of strings"),
        ('overwrite = "please"\n', 1, "overwrite 'please' must be true or false"),
    ],
)
def test_bad_config_files(tmp_path, image_tree, run_cli, toml, code, message):
    (tmp_path / "c.toml").write_text(toml)
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", "--config", tmp_path / "c.toml", code=code)
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "f").exists()


def test_a_config_file_that_is_not_utf8_is_one_sentence(tmp_path, image_tree, run_cli):
    (tmp_path / "c.toml").write_bytes('pooling = "m\u00e4x"\n'.encode("latin-1"))
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", "--config", tmp_path / "c.toml", code=1)
    assert "is not UTF-8 text (byte 12); TOML files must be UTF-8" in result.output


def test_taps_lists_every_layer_with_shape_and_stride(run_cli):
    output = run_cli("taps", "--backbone", "vgg16", "--image-size", "64").output
    assert "vgg16 at 64x64 (18 taps; * = default)" in output
    assert "* vgg16:block5_conv3" in output and "4x4x512  stride 16" in output
    assert " vgg16:block1_conv1" in output and "resnet50" not in output


def test_inspect_summarises_and_verify_catches_damage(tmp_path, image_tree, run_cli):
    run_cli("extract", image_tree(), "--out", tmp_path / "f", *RANDOM_32PX, "--tap", "vgg16:block1_pool", "--shard-size", "4")
    output = run_cli("inspect", tmp_path / "f", "--verify").output
    assert "6 rows in 2 shards, 0 errors, 6 images listed" in output and "verified: 2 shards, 6 rows" in output
    with h5py.File(tmp_path / "f" / "shard-00001.h5", "r+") as f:
        f["features/vgg16/block1_pool"][0, 0] = np.inf
    damaged = run_cli("inspect", tmp_path / "f", "--verify", code=1).output
    assert "problem: shard-00001.h5: NaN or Inf in features" in damaged and "1 problem(s)" in damaged


def test_inspect_of_a_directory_without_a_manifest(tmp_path, run_cli):
    assert "is not a features directory" in run_cli("inspect", tmp_path, code=1).output


def test_the_cli_and_the_stage_one_driver_load_without_tensorflow():
    """`pipeline --help`, `runs`, `inspect` and an up-to-date `extract` stay quick: only computing imports TensorFlow."""
    code = "import sys, pipeline.cli, pipeline.extract, pipeline.shards; print(sorted({'tensorflow', 'keras', 'ray'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


SLURM_VARIABLES = ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")


@pytest.mark.parametrize(
    "env, flags, expected",
    [
        ({}, (None, None), (1, 0)),
        ({"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "5"}, (None, None), (8, 5)),
        ({"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "5"}, (8, None), (8, 5)),  # used to be task 0
        ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_STEP": "2"}, (8, None), (8, 7)),
        ({"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (None, None), (8, 7)),
        ({"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "5"}, (4, 2), (4, 2)),  # flags win
    ],
)
def test_the_job_array_index_comes_from_the_flag_else_from_slurm(monkeypatch, env, flags, expected):
    from pipeline.cli import _job_array

    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _job_array(*flags) == expected


@pytest.mark.parametrize(
    "env, flags, message",
    [
        ({}, ["--num-workers", 8], "Error: --num-workers 8 needs this task's index: pass --worker-index 0..7"),
        ({"SLURM_ARRAY_TASK_COUNT": "two"}, [], "Error: $SLURM_ARRAY_TASK_COUNT is 'two', not an integer of at least 1"),
        (
            {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_STEP": "2"},
            ["--num-workers", 4],
            "Error: $SLURM_ARRAY_TASK_ID 3 is not $SLURM_ARRAY_TASK_MIN 0 plus a multiple of $SLURM_ARRAY_TASK_STEP 2",
        ),
    ],
)
def test_a_job_array_task_without_a_usable_index_is_refused_in_one_sentence(
    tmp_path, image_tree, run_cli, monkeypatch, env, flags, message
):
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", "--weights", "random", *flags, code=1)
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_an_unknown_tap_is_refused_before_out_is_made_or_a_model_or_ray_starts(
    tmp_path, image_tree, run_cli, monkeypatch, engine
):
    monkeypatch.setattr("pipeline.engines.make_engine", lambda *a, **k: pytest.fail("an engine was started"))
    result = run_cli(
        "extract",
        image_tree(),
        "--out",
        tmp_path / "f",
        "--weights",
        "random",
        "--engine",
        engine,
        "--tap",
        "resnet50:conv4_block7_out",
        code=1,
    )
    assert "Error: unknown tap 'resnet50/conv4_block7_out'; valid resnet50 layers are: conv1_pad, conv1_conv" in result.output
    assert not (tmp_path / "f").exists()


def test_the_tap_names_checked_before_building_are_those_of_the_built_trunks():
    from pipeline.backbones import build_backbone, tap_catalogue
    from pipeline.config import BACKBONES, TAP_LAYERS, tap_layer

    for name in BACKBONES:
        built = [tap_layer(info.key) for info in tap_catalogue(name, build_backbone(name, 32))]
        assert list(TAP_LAYERS[name]) == built, name  # the same order too, so both checks list them alike
