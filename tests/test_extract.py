"""Stage one end to end through `pipeline extract`: numerics, determinism, odd files, resume."""

import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from PIL import Image

from helpers import SMALL_TAPS, read_rows
from pipeline import shards
from pipeline.backbones import resolve
from pipeline.config import ExtractConfig


def shard_arrays(features):
    """Every dataset of every shard, for byte-for-byte comparison."""
    out = {}
    for path in sorted(features.glob("shard-*.h5")):
        data = shards.read_shard(path)
        out[path.name] = (data.ids, data.labels.tobytes(), data.splits, {k: v.tobytes() for k, v in data.features.items()})
    return out


def test_float32_features_equal_plain_keras_applications(tmp_path, image_tree, run_cli):
    size = 32
    root = image_tree(classes=("a",), per_class=3, size=size)
    weights = {}
    for name, ctor in (("resnet50", keras.applications.ResNet50), ("vgg16", keras.applications.VGG16)):
        keras.utils.set_random_seed(7)
        model = ctor(include_top=False, weights=None, input_shape=(size, size, 3))
        model.save_weights(tmp_path / f"{name}.weights.h5")
        weights[name] = model
    spec = ",".join(f"{n}={tmp_path / n}.weights.h5" for n in weights)
    run_cli(
        "extract",
        root,
        "--out",
        tmp_path / "f",
        "--weights",
        spec,
        "--precision",
        "float32",
        "--image-size",
        size,
        "--batch-size",
        2,
    )
    rows, manifest = read_rows(tmp_path / "f")
    assert [t["key"] for t in manifest["taps"]] == [
        "resnet50/conv4_block6_out",
        "resnet50/conv5_block3_out",
        "vgg16/block4_conv3",
        "vgg16/block5_conv3",
    ]
    ids = sorted(rows)
    pixels = np.stack([np.asarray(Image.open(root / i), np.float32) for i in ids])
    for key in rows[ids[0]]:
        backbone, layer = key.split("/")
        preprocess = getattr(keras.applications, backbone).preprocess_input
        tap = keras.Model(weights[backbone].input, weights[backbone].get_layer(layer).output)
        expected = keras.layers.GlobalAveragePooling2D()(tap(preprocess(pixels.copy()))).numpy()
        ours = np.stack([rows[i][key] for i in ids])
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_center_crop_uses_the_central_square(tmp_path, run_cli):
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    (tmp_path / "wide").mkdir()
    (tmp_path / "square").mkdir()
    Image.fromarray(wide).save(tmp_path / "wide/x.png")
    Image.fromarray(wide[:, 8:40]).save(tmp_path / "square/x.png")
    common = ["--weights", "random", "--precision", "float32", "--image-size", 32, *SMALL_TAPS]
    run_cli("extract", tmp_path / "wide", "--out", tmp_path / "fw", "--resize", "center-crop", *common)
    run_cli("extract", tmp_path / "square", "--out", tmp_path / "fs", *common)
    cropped, _ = read_rows(tmp_path / "fw")
    square, _ = read_rows(tmp_path / "fs")
    for key in square["x.png"]:
        np.testing.assert_allclose(cropped["x.png"][key], square["x.png"][key], rtol=1e-5, atol=1e-5)


def test_same_inputs_and_config_give_byte_identical_features(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=5)
    for out in ("one", "two"):
        run_cli(
            "extract",
            root,
            "--out",
            tmp_path / out,
            "--weights",
            "random",
            "--image-size",
            32,
            "--shard-size",
            4,
            "--batch-size",
            3,
            *SMALL_TAPS,
        )
    first, second = shard_arrays(tmp_path / "one"), shard_arrays(tmp_path / "two")
    assert len(first) == 3 and first == second
    m1, m2 = shards.read_manifest(tmp_path / "one"), shards.read_manifest(tmp_path / "two")
    assert m1["weights"] == m2["weights"] and m1["config_sha256"] == m2["config_sha256"]


def test_bfloat16_on_cpu_is_recorded_and_close_to_float32(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=3)
    args = ["--weights", "random", "--image-size", 32, "--batch-size", 4, *SMALL_TAPS]
    result = run_cli("extract", root, "--out", tmp_path / "bf16", "--precision", "mixed_bfloat16", *args)
    run_cli("extract", root, "--out", tmp_path / "fp32", "--precision", "float32", *args)
    low, manifest = read_rows(tmp_path / "bf16")
    full, _ = read_rows(tmp_path / "fp32")
    assert manifest["precision"]["policy"] == "mixed_bfloat16"
    assert 0.99 <= manifest["precision"]["min_cosine_vs_float32"] < 1.0
    assert manifest["precision"]["rows_checked"] == 4  # the whole first batch
    assert "min cosine vs float32" in result.output
    for image_id, taps in full.items():
        for key, row in taps.items():
            ours = low[image_id][key]
            assert ours.dtype == np.float32
            assert np.dot(ours, row) / np.linalg.norm(ours) / np.linalg.norm(row) > 0.99


@pytest.mark.parametrize(
    "gpu, xla, flags, expected",
    [
        (True, None, set(), ("mixed_float16", True)),
        (False, None, {"avx512_bf16"}, ("mixed_bfloat16", False)),
        (True, False, set(), ("mixed_float16", False)),
        (False, True, set(), ("float32", True)),
    ],
)
def test_auto_choices_are_resolved_before_they_are_saved(gpu, xla, flags, expected):
    config = resolve(ExtractConfig(xla=xla), gpu, frozenset(flags))
    assert (config.precision, config.xla) == expected


def test_the_xla_compiled_forward_gives_the_same_features(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=2)
    args = ["--weights", "random", "--image-size", 32, "--precision", "float32", *SMALL_TAPS]
    run_cli("extract", root, "--out", tmp_path / "xla", "--xla", *args)
    run_cli("extract", root, "--out", tmp_path / "plain", "--no-xla", *args)
    compiled, manifest = read_rows(tmp_path / "xla")
    plain, _ = read_rows(tmp_path / "plain")
    assert manifest["precision"]["xla"] is True and manifest["config"]["xla"] is True
    for image_id, taps in plain.items():
        for key, row in taps.items():
            np.testing.assert_allclose(compiled[image_id][key], row, rtol=1e-4, atol=1e-4 * np.abs(row).max())


def save(path, image, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """A corpus of odd files, extracted once; returns (root, rows, manifest)."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    root = tmp_path_factory.mktemp("awkward") / "images"
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    save(root / "ok/cmyk.jpg", rgb.convert("CMYK"), format="JPEG")
    save(root / "ok/gray.png", rgb.convert("L"))
    save(root / "ok/gray16.png", Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)))
    save(root / "ok/rgba.png", rgb.convert("RGBA"))
    save(root / "ok/palette.png", rgb.convert("P"))
    save(root / "ok/anim.gif", red, save_all=True, append_images=[blue], duration=100)
    save(root / "ok/red.png", red)
    save(root / "ok/tiny.png", Image.new("RGB", (1, 1), (9, 99, 199)))
    save(root / "ok/large.png", Image.new("RGB", (2600, 1900), (30, 60, 90)))
    save(root / "ok/page.tiff", rgb)
    save(root / "ok/photo.webp", rgb)
    save(root / "ok/really_png.jpg", rgb, format="PNG")
    save(root / "ok/scan.bmp", rgb)
    (root / "bad").mkdir()
    (root / "bad/empty.png").write_bytes(b"")
    full = (root / "ok/cmyk.jpg").read_bytes()
    (root / "bad/truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "bad/text.png").write_text("this is not an image\n")
    out = root.parent / "features"
    result = CliRunner().invoke(
        cli,
        [
            "extract",
            str(root),
            "--out",
            str(out),
            "--weights",
            "random",
            "--image-size",
            "32",
            "--precision",
            "float32",
            "--shard-size",
            "4",
            "--batch-size",
            "3",
            *SMALL_TAPS,
        ],
    )
    assert result.exit_code == 0, result.output
    rows, manifest = read_rows(out)
    return root, out, rows, manifest, result.output


def test_every_odd_but_valid_image_becomes_a_row(awkward):
    _, _, rows, manifest, _ = awkward
    assert sorted(i for i in rows if i.startswith("ok/")) == sorted(
        f"ok/{n}"
        for n in [
            "cmyk.jpg",
            "gray.png",
            "gray16.png",
            "rgba.png",
            "palette.png",
            "anim.gif",
            "red.png",
            "tiny.png",
            "large.png",
            "page.tiff",
            "photo.webp",
            "really_png.jpg",
            "scan.bmp",
        ]
    )
    assert all(np.isfinite(v).all() for taps in rows.values() for v in taps.values())


def test_undecodable_files_are_errors_with_reasons_never_dropped(awkward):
    _, out, rows, manifest, output = awkward
    errors = {e["id"]: e for e in manifest["errors"]}
    assert sorted(errors) == ["bad/empty.png", "bad/text.png", "bad/truncated.jpg"]
    assert all(e["reason"] and e["path"].endswith(e["id"]) for e in errors.values())
    assert "truncated" in errors["bad/truncated.jpg"]["reason"].lower()
    assert len(rows) + len(errors) == manifest["listed"] == 16
    assert "3 errors" in output and "error: bad/text.png" in output
    assert shards.verify(out) == []


def test_gif_uses_its_first_frame_and_rows_stay_aligned_with_ids(awkward):
    _, _, rows, _, _ = awkward
    for key in rows["ok/red.png"]:
        np.testing.assert_allclose(rows["ok/anim.gif"][key], rows["ok/red.png"][key], rtol=1e-5)
        assert not np.allclose(rows["ok/red.png"][key], rows["ok/tiny.png"][key])


def test_on_error_fail_stops_and_names_the_file(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=2)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n")
    result = run_cli(
        "extract",
        root,
        "--out",
        tmp_path / "f",
        "--weights",
        "random",
        "--image-size",
        32,
        "--on-error",
        "fail",
        *SMALL_TAPS,
        code=1,
    )
    assert "cannot decode" in result.output and "broken.png" in result.output
    assert not (tmp_path / "f" / "manifest.json").exists()


def extract_argv(root, out):
    return [
        sys.executable,
        "-m",
        "pipeline",
        "extract",
        str(root),
        "--out",
        str(out),
        "--weights",
        "random",
        "--image-size",
        "64",
        "--shard-size",
        "8",
        "--batch-size",
        "4",
    ]


def test_a_run_killed_midway_resumes_to_the_same_bytes(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=40, size=64)
    killed = tmp_path / "killed"
    process = subprocess.Popen(extract_argv(root, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "shard-00001.h5").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished_before_kill = sorted(p.name for p in killed.glob("shard-*.h5"))
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"
    assert 2 <= len(finished_before_kill) < 10

    result = run_cli("extract", *extract_argv(root, killed)[4:])
    assert f"{10 - len(finished_before_kill)} shards written, {len(finished_before_kill)} already done" in result.output
    run_cli("extract", *extract_argv(root, tmp_path / "whole")[4:])
    assert shard_arrays(killed) == shard_arrays(tmp_path / "whole")
    assert not list(killed.glob("*.tmp"))


def test_a_crash_state_with_a_partial_file_is_completed(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=6)
    args = ["--weights", "random", "--image-size", 32, "--shard-size", 4, *SMALL_TAPS]
    run_cli("extract", root, "--out", tmp_path / "f", *args)
    reference = shard_arrays(tmp_path / "f")
    (tmp_path / "f" / "manifest.json").unlink()
    (tmp_path / "f" / "shard-00002.h5").rename(tmp_path / "f" / "shard-00002.h5.tmp")
    result = run_cli("extract", root, "--out", tmp_path / "f", *args)
    assert "1 shards written, 2 already done" in result.output
    assert shard_arrays(tmp_path / "f") == reference
    again = run_cli("extract", root, "--out", tmp_path / "f", *args)
    assert "up to date" in again.output
    (tmp_path / "f" / "manifest.json").unlink()  # killed between the last shard and the manifest
    finished = run_cli("extract", root, "--out", tmp_path / "f", *args)
    assert "0 shards written, 3 already done" in finished.output
    assert shards.verify(tmp_path / "f") == []


def test_a_different_config_is_refused_unless_overwrite(tmp_path, image_tree, run_cli):
    root = image_tree(per_class=2)
    args = ["--weights", "random", "--image-size", 32, *SMALL_TAPS]
    run_cli("extract", root, "--out", tmp_path / "f", *args)
    before = (tmp_path / "f" / "manifest.json").read_bytes()
    refused = run_cli("extract", root, "--out", tmp_path / "f", *args, "--pooling", "max", code=1)
    assert "pooling: 'avg' -> 'max'" in refused.output and "--overwrite" in refused.output
    assert (tmp_path / "f" / "manifest.json").read_bytes() == before
    run_cli("extract", root, "--out", tmp_path / "f", *args, "--pooling", "max", "--overwrite")
    assert shards.read_manifest(tmp_path / "f")["config"]["pooling"] == "max"


def test_a_non_empty_foreign_directory_is_refused(tmp_path, image_tree, run_cli):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "thesis.tex").write_text("keep me")
    result = run_cli("extract", image_tree(), "--out", tmp_path / "f", "--weights", "random", code=1)
    assert "is not empty and holds no features" in result.output
    assert (tmp_path / "f" / "thesis.tex").read_text() == "keep me"
