"""`pipeline export`: the one-file model, its round trip, and agreement with the staged path and predict."""

import csv
import json
import subprocess
import sys

import joblib
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import shards
from pipeline.export import pca_arrays
from pipeline.extract import extract
from pipeline.inputs import resize_image
from pipeline.layers import ScaledPCA, SquareResize
from pipeline.estimators import TapTransform
from pipeline.sources import list_source


@pytest.fixture(scope="module")
def exported(head_run, tmp_path_factory):
    """The head run exported once through the CLI: (path, CLI output)."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    out = tmp_path_factory.mktemp("export") / "model.keras"
    result = CliRunner().invoke(cli, ["export", str(head_run.run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def write_images(folder, count, height, width, seed=0):
    """`count` random RGB PNGs of one size; returns their uint8 pixels, in file name order."""
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return pixels


def test_square_resize_crops_a_batch_as_extraction_crops_each_image():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    batch = np.asarray(SquareResize(24, "center-crop")(pixels))
    one_by_one = np.stack([np.asarray(resize_image(tf.constant(image), 24, "center-crop")) for image in pixels])
    central_square = np.stack([np.asarray(resize_image(tf.constant(image[:, 8:40]), 24, "squash")) for image in pixels])
    np.testing.assert_array_equal(batch, one_by_one)
    np.testing.assert_array_equal(batch, central_square)


@pytest.mark.parametrize("scaling, whiten", [("block", False), ("standard", True), ("none", False)])
def test_scaled_pca_layer_computes_the_fitted_transform(scaling, whiten):
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(60, 12)) * rng.uniform(0.1, 20, 12) + rng.uniform(-50, 50, 12)).astype(np.float32)
    transform = TapTransform((5, 7), scaling, 4, whiten, "full").fit(X[:40])
    layer = ScaledPCA(4)
    layer.build((None, 12))
    layer.set_transform(**pca_arrays(transform))
    expected = transform.transform(X[40:])
    np.testing.assert_allclose(np.asarray(layer(X[40:])), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_exported_model_agrees_with_the_staged_path_and_predict(head_run, exported, tmp_path, run_cli):
    model_path, _ = exported
    pixels = write_images(tmp_path / "new" / "b", 5, 45, 38)  # not the extraction size: the model resizes
    run_cli("predict", head_run.run, tmp_path / "new", "--out", tmp_path / "p.csv")

    features = extract(head_run.config, list_source(tmp_path / "new"), tmp_path / "features").out_dir
    ids, _, _, X = next(shards.iter_feature_chunks(features, shards.read_manifest(features), list(head_run.config.taps), 100))
    transform = joblib.load(head_run.root / "reduced" / "transform.joblib")
    staged = keras.saving.load_model(head_run.run / "model.keras").predict(transform.transform(X), verbose=0)

    exported_probs = keras.saving.load_model(model_path).predict(pixels, verbose=0)
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ids == [f"b/{i:03d}.png" for i in range(5)]
    predicted = [[float(dict((r[f"top{k}_class"], r[f"top{k}_prob"]) for k in (1, 2, 3))[c]) for c in "abc"] for r in rows]

    assert exported_probs.dtype == np.float32
    np.testing.assert_allclose(exported_probs, staged, atol=1e-4)
    np.testing.assert_allclose(predicted, staged, atol=1e-4)
    classes = ["abc"[i] for i in staged.argmax(axis=1)]
    assert ["abc"[i] for i in exported_probs.argmax(axis=1)] == classes == [r["predicted"] for r in rows]


ROUND_TRIP = """
import json, sys
import keras, numpy as np
import pipeline.layers
model = keras.saving.load_model(sys.argv[1])
pixels = np.random.default_rng(1).integers(0, 256, (3, 64, 50, 3), dtype=np.uint8)
print(json.dumps({
    "probabilities": model.predict(pixels, verbose=0).tolist(),
    "classes": model.get_layer("probabilities").class_names,
    "input": [str(model.input.dtype), list(model.input.shape)],
    "trainable": len(model.trainable_weights),
    "pipeline_modules": sorted(name for name in sys.modules if name.split(".")[0] == "pipeline"),
}))
"""


def test_the_file_loads_in_a_fresh_process_that_imports_only_the_layers_module(exported, tmp_path):
    model_path, output = exported
    assert "exported" in output and "classes: a, b, c" in output
    done = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(model_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["pipeline_modules"] == ["pipeline", "pipeline.layers"]
    assert loaded["classes"] == ["a", "b", "c"]
    assert loaded["input"] == ["uint8", [None, None, None, 3]]
    assert loaded["trainable"] == 0
    pixels = np.random.default_rng(1).integers(0, 256, (3, 64, 50, 3), dtype=np.uint8)
    here = keras.saving.load_model(model_path).predict(pixels, verbose=0)
    np.testing.assert_allclose(loaded["probabilities"], here, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(here.sum(axis=1), 1, atol=1e-5)


def test_another_image_size_is_built_and_warned_about(head_run, tmp_path, run_cli):
    result = run_cli("export", head_run.run, "--out", tmp_path / "m48.keras", "--image-size", 48)
    assert "squash to 48 px" in result.output
    assert "warning: the model resizes to 48 px but the head learned from features at 32 px" in result.output
    model = keras.saving.load_model(tmp_path / "m48.keras")
    assert model.get_layer("resize").image_size == 48
    assert model.predict(np.zeros((1, 20, 30, 3), np.uint8), verbose=0).shape == (1, 3)


@pytest.mark.parametrize("name, args, code, message", [
    ("model.h5", [], 1, "model.h5 must end in .keras"),
    ("model.keras", ["--image-size", 16], 2, "Invalid value for '--image-size'"),
])
def test_bad_options_are_one_clear_error(head_run, tmp_path, run_cli, name, args, code, message):
    result = run_cli("export", head_run.run, "--out", tmp_path / name, *args, code=code)
    assert message in result.output
    assert not list(tmp_path.iterdir())


def test_a_baseline_run_cannot_be_exported(head_run, tmp_path, run_cli):
    result = run_cli("export", head_run.baseline, "--out", tmp_path / "m.keras", code=1)
    assert "is a baseline run without a Keras head; choose a head run" in result.output
    assert not (tmp_path / "m.keras").exists()
