"""`pipeline export`: both formats, loaded where pipeline is not, agreeing with predict; the built-in layers."""

import csv
import errno
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

import pipeline
from pipeline import backbones
from pipeline import export as export_module
from pipeline.cli import cli
from pipeline.errors import PipelineError
from pipeline.estimators import TapTransform, gram_sums, moment_sums
from pipeline.export import scaled_pca
from pipeline.layers import CaffePreprocess, ClassNames, ScaledPCA, SquareResize, resize_image, square_resize

CLASSES = ["a", "b", "c"]
# (file, height, width): PNG and JPEG of other sizes than the extraction's 32 px, odd ones too
IMAGES = [("x/0.png", 45, 38), ("x/1.jpg", 32, 32), ("x/2.png", 77, 31), ("x/3.jpg", 50, 64), ("x/4.png", 33, 101)]


def invoke(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}: {result.output}"
    return result


@pytest.fixture(scope="module")
def exports(head_run, tmp_path_factory):
    """The head run exported once per format, and `pipeline predict` on IMAGES."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(3)
    for name, height, width in IMAGES:
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "images" / name)
    keras_out = invoke("export", head_run.run, "--out", root / "model.keras").output
    saved_out = invoke("export", head_run.run, "--out", root / "serving", "--format", "saved_model").output
    invoke("predict", head_run.run, root / "images", "--out", root / "p.csv")
    with open(root / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["id"] for row in rows] == [name for name, _, _ in IMAGES]
    predicted = {
        row["id"]: [float({row[f"top{k}_class"]: row[f"top{k}_prob"] for k in (1, 2, 3)}[c]) for c in CLASSES] for row in rows
    }
    return SimpleNamespace(
        root=root,
        keras_out=keras_out,
        saved_out=saved_out,
        probabilities=predicted,
        classes={row["id"]: row["predicted"] for row in rows},
    )


def legacy_model(transform):
    """A small model made of the layers exports used to contain, with a fitted ScaledPCA."""
    images = keras.Input((None, None, 3), dtype="uint8")
    pooled = keras.layers.GlobalAveragePooling2D()(CaffePreprocess()(SquareResize(8, "center-crop")(images)))
    pca = ScaledPCA(2, name="scaled_pca")
    reduced = pca(pooled)
    whitening = np.sqrt(transform.pca_.explained_variance_)
    pca.set_weights(
        [
            np.asarray(array, np.float32)
            for array in (
                transform.scaler_.mean_,
                transform.multiplier_,
                transform.pca_.mean_,
                transform.pca_.components_.T,
                whitening,
            )
        ]
    )
    probabilities = keras.layers.Dense(3, activation="softmax", kernel_initializer="ones")(reduced)
    return keras.Model(images, ClassNames(CLASSES, name="probabilities")(probabilities))


LOAD = """
import json, sys
import keras, numpy as np, tensorflow as tf

root, checkout = sys.argv[1], sys.argv[2]
files = json.loads(sys.argv[3])
encoded = [open(f"{root}/images/{name}", "rb").read() for name in files]
pixels = [tf.io.decode_image(data, channels=3, expand_animations=False) for data in encoded]


def as_lists(outputs):
    arrays = {key: np.asarray(value) for key, value in outputs.items()}
    return {key: (a.astype(bytes).astype(str) if a.dtype == object else a).tolist() for key, a in arrays.items()}


def walk(layer):
    return [type(layer), *(kind for sub in getattr(layer, "layers", []) for kind in walk(sub))]


report = {}

served = tf.saved_model.load(f"{root}/serving/1")
report["signatures"] = {
    name: [str(spec) for spec in function.structured_input_signature[1].values()] for name, function in served.signatures.items()
}
report["bytes"] = as_lists(served.signatures["serving_default"](images=tf.constant(encoded)))  # mixed sizes and formats
report["pixels"] = [as_lists(served.signatures["pixels"](images=image[None])) for image in pixels]

model = keras.saving.load_model(f"{root}/model.keras")
report["keras"] = [as_lists(model(image[None])) for image in pixels]  # eager: predict would trace each size
report["vocabulary"] = [str(name) for name in model.get_layer("class_names").get_vocabulary()]
report["layer_modules"] = sorted({kind.__module__.split(".")[0] for kind in walk(model)})
report["input"] = [model.input.dtype, list(model.input.shape)]
report["trainable"] = len(model.trainable_weights)
report["pipeline_modules"] = sorted(name for name in sys.modules if name.split(".")[0] == "pipeline")

sys.path.insert(0, checkout)
import pipeline
report["plain_import"] = pipeline.__file__
report["after_plain_import"] = as_lists(keras.saving.load_model(f"{root}/model.keras").predict(pixels[0][None], verbose=0))
try:
    keras.saving.load_model(f"{root}/legacy.keras")
except Exception as e:
    report["legacy_without_layers"] = str(e)
import pipeline.layers
legacy = keras.saving.load_model(f"{root}/legacy.keras")
report["legacy"] = legacy.predict(np.asarray(pixels[0])[None], verbose=0).tolist()
report["legacy_classes"] = legacy.get_layer("probabilities").class_names
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def loaded(exports, tmp_path_factory):
    """Both exports (and an old-style file) loaded in one fresh process that starts without pipeline."""
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(40, 3)) * 30 + 100).astype(np.float32)
    model = legacy_model(TapTransform((3,), "block", 2, True, "full").fit(X))
    model.save(exports.root / "legacy.keras")
    first = np.asarray(Image.open(exports.root / "images" / IMAGES[0][0]).convert("RGB"))
    expected_legacy = model.predict(first[None], verbose=0)

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    checkout = Path(pipeline.__file__).parents[1]
    files = json.dumps([name for name, _, _ in IMAGES])
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(exports.root), str(checkout), files],
        capture_output=True,
        text=True,
        cwd=tmp_path_factory.mktemp("fresh"),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return SimpleNamespace(**report, checkout=checkout, expected_legacy=expected_legacy)


def test_the_cli_says_what_it_wrote_and_how_to_load_it(exports):
    assert (
        "uint8 images (batch, height, width, 3) -> squash to 32 px -> taps -> PCA (6) -> head -> 3 probabilities"
        in exports.keras_out
    )
    assert "keras.saving.load_model(" in exports.keras_out and "nothing from pipeline is needed" in exports.keras_out
    assert f"to {exports.root / 'serving' / '1'}: encoded images (serving_default) or uint8 pixels (pixels)" in exports.saved_out
    assert "classes: a, b, c" in exports.keras_out and "classes: a, b, c" in exports.saved_out
    assert sorted(os.listdir(exports.root / "serving")) == [".1.lock", "1"]  # no partial directory left behind
    assert {"saved_model.pb", "variables"} <= set(os.listdir(exports.root / "serving" / "1"))


def test_the_saved_model_loads_where_pipeline_was_never_imported(loaded):
    assert loaded.pipeline_modules == []
    assert loaded.signatures == {
        "serving_default": ["TensorSpec(shape=(None,), dtype=tf.string, name='images')"],
        "pixels": ["TensorSpec(shape=(None, None, None, 3), dtype=tf.uint8, name='images')"],
    }
    assert loaded.bytes["classes"] == [CLASSES] * len(IMAGES)
    assert [output["classes"] for output in loaded.pixels] == [[CLASSES]] * len(IMAGES)


def test_the_keras_file_has_only_built_in_layers(loaded):
    assert loaded.pipeline_modules == []
    assert loaded.layer_modules == ["keras"]
    assert loaded.vocabulary == CLASSES
    assert loaded.input == ["uint8", [None, None, None, 3]]
    assert loaded.trainable == 0
    assert Path(loaded.plain_import).is_relative_to(loaded.checkout)
    # predict there, an eager call here: equal, so `model(images)` runs no dropout
    np.testing.assert_allclose(loaded.after_plain_import["probabilities"], loaded.keras[0]["probabilities"], atol=1e-6)


def test_both_formats_agree_with_predict(exports, loaded):
    names = [name for name, _, _ in IMAGES]
    expected = np.array([exports.probabilities[name] for name in names])
    results = {
        "saved_model bytes": (loaded.bytes["probabilities"], loaded.bytes["predicted"]),
        "saved_model pixels": ([o["probabilities"][0] for o in loaded.pixels], [o["predicted"][0] for o in loaded.pixels]),
        "keras": ([o["probabilities"][0] for o in loaded.keras], [o["predicted"][0] for o in loaded.keras]),
    }
    for what, (probabilities, predicted) in results.items():
        np.testing.assert_allclose(probabilities, expected, atol=1e-4, err_msg=what)
        assert predicted == [exports.classes[name] for name in names], what
    np.testing.assert_allclose(np.sum(loaded.bytes["probabilities"], axis=1), 1, atol=1e-5)


def saved_nodes(path, ops):
    """{op: set of devices} over every function of a SavedModel's graph."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    found = {}
    for function in saved.meta_graphs[0].graph_def.library.function:
        for node in function.node_def:
            if node.op in ops:
                found.setdefault(node.op, set()).add(node.device)
    return found


def test_the_saved_model_resizes_on_the_cpu_so_a_gpu_gets_only_the_resized_batch(exports):
    """ScaleAndTranslate has only a CPU kernel: pinned with its cast and the decoding, no full image crosses to a GPU and back."""
    nodes = saved_nodes(exports.root / "serving" / "1", {"ScaleAndTranslate", "DecodeImage", "Cast", "Conv2D"})
    assert nodes["ScaleAndTranslate"] == {"/device:CPU:0"}  # both signatures' resizes
    assert nodes["DecodeImage"] == {"/device:CPU:0"}
    assert "/device:CPU:0" in nodes["Cast"]  # the uint8 -> float32 cast of the pixels signature, beside its resize
    assert nodes["Conv2D"] == {""}  # the model itself is left to the placer: the GPU when there is one


def test_an_older_export_still_loads_with_the_layers_module(loaded):
    assert "Could not locate class 'SquareResize'" in loaded.legacy_without_layers
    np.testing.assert_allclose(loaded.legacy, loaded.expected_legacy, rtol=1e-6)
    assert loaded.legacy_classes == CLASSES


@pytest.mark.parametrize("resize", ["squash", "center-crop"])
def test_the_built_in_resize_is_extractions_resize(resize):
    images = keras.Input((None, None, 3), dtype="uint8")
    model = keras.Model(images, square_resize(images, 24, resize))
    for height, width in [(31, 47), (47, 31), (33, 33), (45, 38), (17, 95), (5, 5), (24, 24), (1, 9)]:
        pixels = np.random.default_rng(height).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        one_by_one = np.stack([resize_image(tf.constant(image), 24, resize).numpy() for image in pixels])
        np.testing.assert_array_equal(np.asarray(model(pixels)), one_by_one)
        np.testing.assert_array_equal(model.predict(pixels, verbose=0), one_by_one)
        np.testing.assert_array_equal(np.asarray(SquareResize(24, resize)(pixels)), one_by_one)  # what older exports hold


@pytest.mark.parametrize("scaling", ["block", "standard", "none"])
@pytest.mark.parametrize("whiten, solver", [(False, "full"), (True, "full"), (True, "incremental")])
def test_scaling_and_pca_fold_into_one_dense(scaling, whiten, solver):
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(60, 12)) * rng.uniform(0.1, 20, 12) + rng.uniform(-50, 50, 12)).astype(np.float32)
    transform = TapTransform((5, 7), scaling, 4, whiten, solver)
    if solver == "full":
        transform.fit(X[:40])
    else:  # the incremental solver's two streaming passes, over two chunks
        transform.fit_scaling(moment_sums([X[:20], X[20:40]], 12))
        transform.fit_covariance(gram_sums(map(transform.scale, [X[:20], X[20:40]]), 12))
    expected = transform.transform(X[40:])
    np.testing.assert_allclose(np.asarray(scaled_pca(transform)(X[40:])), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_an_existing_version_is_replaced_only_with_overwrite(head_run, exports, tmp_path):
    serving = tmp_path / "serving"
    (serving / "3").mkdir(parents=True)
    (serving / "3" / "old").write_text("")
    weights = f"resnet50=random,vgg16={head_run.root / 'vgg16.weights.h5'}"
    args = (
        "export",
        head_run.run,
        "--out",
        serving,
        "--format",
        "saved_model",
        "--version",
        3,
        "--image-size",
        48,
        "--weights",
        weights,
    )
    refused = invoke(*args, code=1)
    assert f"{serving / '3'} already exists; pass --version N for a new version, or --overwrite to replace it" in refused.output
    assert os.listdir(serving / "3") == ["old"]

    result = invoke(*args, "--overwrite")
    assert "squash to 48 px" in result.output
    assert "warning: the model resizes to 48 px but the head learned from features at 32 px" in result.output
    assert sorted(os.listdir(serving)) == [".3.lock", "3"]  # the lock file exports to this version take turns on
    assert "old" not in os.listdir(serving / "3")
    pixels = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8))
    at_48, at_32 = (
        tf.saved_model.load(str(path)).signatures["pixels"](images=pixels)["probabilities"].numpy()
        for path in (serving / "3", exports.root / "serving" / "1")
    )
    # In log space: a confident head saturates probabilities near 0 and 1, where another input size moves them by < 1e-4.
    assert at_48.shape == (2, 3) and not np.allclose(np.log(at_48 + 1e-30), np.log(at_32 + 1e-30), atol=1e-2)


def test_another_image_size_in_a_keras_file(head_run, tmp_path):
    result = invoke("export", head_run.run, "--out", tmp_path / "m48.keras", "--image-size", 48)
    assert "warning: the model resizes to 48 px but the head learned from features at 32 px" in result.output
    model = keras.saving.load_model(tmp_path / "m48.keras")
    assert model.get_layer("resize").height == 48
    assert model.predict(np.zeros((1, 20, 30, 3), np.uint8), verbose=0)["probabilities"].shape == (1, 3)


@pytest.mark.parametrize(
    "out, args, code, message",
    [
        (
            "model.h5",
            [],
            1,
            "--out {tmp}/model.h5 must end in .keras, the file type Keras saves whole models as (--format saved_model writes a directory)",
        ),
        ("model.keras", ["--image-size", 16], 2, "Invalid value for '--image-size'"),
        ("model.keras", ["--format", "onnx"], 2, "Invalid value for '--format': 'onnx' is not one of 'keras', 'saved_model'"),
        ("model.keras", ["--version", 2], 1, "--version 2 applies only to --format saved_model; a .keras file has no versions"),
        (
            "model.keras",
            ["--format", "saved_model"],
            1,
            "--out {tmp}/model.keras is a .keras file name, but --format saved_model writes a directory",
        ),
        ("serving", ["--format", "saved_model", "--version", 0], 2, "Invalid value for '--version': 0 is not in the range x>=1"),
    ],
)
def test_bad_options_are_one_clear_error(head_run, tmp_path, out, args, code, message):
    result = invoke("export", head_run.run, "--out", tmp_path / out, *args, code=code)
    assert message.format(tmp=tmp_path) in result.output
    assert not list(tmp_path.iterdir())


def test_a_file_where_the_saved_model_directory_should_be_is_refused(head_run, tmp_path):
    (tmp_path / "serving").write_text("")
    result = invoke("export", head_run.run, "--out", tmp_path / "serving", "--format", "saved_model", code=1)
    assert f"--out {tmp_path / 'serving'} is a file; --format saved_model writes a directory (OUT/VERSION/)" in result.output
    assert os.listdir(tmp_path) == ["serving"]


def test_a_baseline_run_cannot_be_exported(head_run, tmp_path):
    result = invoke("export", head_run.baseline, "--out", tmp_path / "m.keras", code=1)
    assert "is a baseline run without a Keras head; choose a head run" in result.output
    assert not (tmp_path / "m.keras").exists()


def tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "format_, fail",
    [
        ("keras", lambda monkeypatch: monkeypatch.setattr(keras.Model, "save", raising_os_error(errno.ENOSPC))),
        (
            "saved_model",
            lambda monkeypatch: monkeypatch.setattr(
                type(keras.export.ExportArchive()),
                "write_out",  # the backend's subclass, which ExportArchive() makes
                raising(tf.errors.ResourceExhaustedError(None, None, "out/.1.tmp/variables; No space left on device")),
            ),
        ),
        (
            "saved_model",
            lambda monkeypatch: monkeypatch.setattr(
                type(keras.export.ExportArchive()),
                "write_out",
                raising(tf.errors.PermissionDeniedError(None, None, "Read-only file system")),
            ),
        ),
    ],
)
def test_a_failed_write_is_one_sentence_and_keeps_the_previous_export(head_run, tmp_path, monkeypatch, format_, fail):
    """Regression: a full disk during model.save / write_out was a traceback."""
    out = tmp_path / ("model.keras" if format_ == "keras" else "serving")
    args = ("export", head_run.run, "--out", out, "--format", format_, *(["--overwrite"] if format_ == "saved_model" else []))
    invoke(*args)
    before = tree(tmp_path)
    fail(monkeypatch)
    result = invoke(*args, code=1)
    assert result.output.count("Error: ") == 1 and "Traceback" not in result.output
    assert "cannot write" in result.output and "the previous" in result.output and "is unchanged" in result.output
    assert tree(tmp_path) == before and not [
        p for p in (out.parent if format_ == "keras" else out).iterdir() if p.name.endswith(".tmp")
    ]


def raising(error):
    def fail(*args, **kwargs):
        raise error

    return fail


def raising_os_error(code):
    return raising(OSError(code, os.strerror(code)))


def test_a_read_only_folder_is_refused_before_the_weights_load(head_run, tmp_path, monkeypatch, failing_writes):
    monkeypatch.setattr(backbones, "load_trunk_weights", raising(AssertionError("the weights were loaded")))
    with failing_writes(tmp_path, errno.EROFS):
        result = invoke("export", head_run.run, "--out", tmp_path / "model.keras", code=1)
    assert f"cannot write to {tmp_path} (Read-only file system); export needs a writable directory" in result.output
    assert "Traceback" not in result.output


class SlowModel:
    """Stands in for a keras.Model: save() writes its bytes slowly, as a big model does."""

    def __init__(self, content):
        self.content = content

    def save(self, path):
        Path(path).write_bytes(self.content[:1])
        time.sleep(0.3)
        Path(path).write_bytes(self.content)


def test_two_exports_to_one_path_both_succeed_and_leftovers_of_killed_ones_are_removed(tmp_path):
    """Regression: both used .model.partial.keras, and one deleted the other's file before its rename."""
    target = tmp_path / "model.keras"
    from pipeline.files import temp_sibling

    killed = [temp_sibling(target, pid=999999), tmp_path / ".1.partial-999999"]
    for path in killed:
        path.mkdir()
    errors = []

    def one(content):
        try:
            export_module._write(target, True, functools.partial(export_module._save_keras, SlowModel(content)))
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(content,)) for content in (b"first export", b"second export")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in (b"first export", b"second export")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".1.partial-999999", ".model.keras.lock", "model.keras"]
    serving = tmp_path / "serving"
    serving.mkdir()
    (serving / ".1.partial-999999").mkdir()
    (serving / f".1.partial-{os.getpid()}").mkdir()  # a live process's: left alone
    export_module._write(serving / "1", False, functools.partial(export_module._save_saved_model, FakeArchive(b"v1")))
    assert sorted(p.name for p in serving.iterdir()) == [".1.lock", f".1.partial-{os.getpid()}", "1"]


class FakeArchive:
    def __init__(self, content):
        self.content = content

    def write_out(self, path, verbose=False):
        Path(path).mkdir()
        (Path(path) / "saved_model.pb").write_bytes(self.content)


def test_an_overwrite_whose_final_rename_fails_puts_the_old_version_back(tmp_path, monkeypatch):
    """Regression: the old version was deleted even when renaming the new one into place had failed."""
    target = tmp_path / "serving" / "1"
    target.parent.mkdir()  # as export's _check_writable does
    export_module._write(target, False, functools.partial(export_module._save_saved_model, FakeArchive(b"old")))

    def replace(src, dst):  # the new version into place (after the old one was moved aside)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PipelineError, match=r"cannot write .*serving/1: no space left on device; the previous 1 is unchanged"):
        export_module._write(target, True, functools.partial(export_module._save_saved_model, FakeArchive(b"new")))
    assert (target / "saved_model.pb").read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == [".1.lock", "1"]
