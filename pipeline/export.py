"""`pipeline export`: a head run as one model, images in, class probabilities and names out.

The model is built from built-in Keras layers and ops only, all float32 and frozen: the extraction's
resize (Rescaling to float32, then Resizing), the fused tap model (caffe preprocessing, trunks cut
at their deepest tap, global pooling), the taps concatenated in the transform's order, scaling +
PCA folded into one Dense, the trained head, and a StringLookup naming the top class. It is
written as a .keras file, or as a TensorFlow SavedModel in TF Serving's `DIR/<version>/` layout
whose signatures take encoded image bytes (`serving_default`) or uint8 pixels (`pixels`).
"""

import errno
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import backbones
from pipeline.config import EXPORT_FORMATS, parse_weights
from pipeline.errors import PipelineError
from pipeline.files import durable_replace, lock_beside, make_dir, output_guard, remove, replace_dir, storage_errors, temp_sibling
from pipeline.inputs import decode_image
from pipeline.layers import resize_image, square_resize
from pipeline.lineage import check_fingerprints, load_lineage

DEFAULT_VERSION = 1
# What exports before the temp_sibling names left when killed: .<version>.partial-<pid> (and .replaced-<pid>).
_LEGACY_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|replaced)-(?P<pid>\d+)$")


@dataclass(frozen=True)
class ExportResult:
    out: Path  # the .keras file, or the SavedModel's version directory
    format: str
    model: keras.Model
    classes: list
    image_size: int  # the side the model resizes every image to
    resize: str
    components: int
    warnings: list  # where the model will not agree with `pipeline predict`


def export(
    run_dir: Path | str,
    out: Path | str,
    *,
    format: str = "keras",
    version: int | None = None,
    overwrite: bool = False,
    image_size: int | None = None,
    weights: str | None = None,
) -> ExportResult:
    """Build the image -> probabilities model of a head run and write it to `out`.

    `format` "keras" writes `out` (a .keras file, replaced if it exists); "saved_model" writes
    the directory `out/<version>/` (default 1), refusing an existing one unless `overwrite`.
    `image_size` defaults to the extraction's; `weights` replaces the recorded weight sources
    (whose fingerprints must still match).
    """
    target = _target(Path(out), format, version, overwrite)
    lineage = load_lineage(run_dir)
    _check_writable(target)  # a read-only or missing folder fails now, not after the weights have loaded
    recorded = lineage.manifest["config"]
    config = lineage.extract_config(weights=weights, precision="float32", image_size=image_size or recorded["image_size"])
    trunks = {name: backbones.build_backbone(name, config.image_size) for name in config.backbones}
    backbones.check_taps(config.taps, trunks)
    loaded = backbones.load_trunk_weights(trunks, parse_weights(config.weights, config.backbones, config.seed))
    check_fingerprints(loaded, lineage.expected_weights(config.backbones))

    transform = lineage.load_transform()
    model = build_model(trunks, config, transform, lineage.load_head(), lineage.classes)
    if format == "keras":
        _write(target, overwrite=True, save=functools.partial(_save_keras, model))
    else:
        archive = serving_archive(model, config.image_size, config.resize, lineage.classes)
        _write(target, overwrite, save=functools.partial(_save_saved_model, archive))
    return ExportResult(
        target,
        format,
        model,
        lineage.classes,
        config.image_size,
        config.resize,
        int(transform.pca_.n_components_),
        warnings=_disagreements(config, recorded),
    )


def _target(out, format, version, overwrite):
    """The path `export` writes, refused before any work when it cannot be written."""
    if format not in EXPORT_FORMATS:
        raise PipelineError(f"--format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if format == "keras":
        if version is not None:
            raise PipelineError(f"--version {version} applies only to --format saved_model; a .keras file has no versions")
        if out.suffix != ".keras":
            raise PipelineError(
                f"--out {out} must end in .keras, the file type Keras saves whole models as (--format saved_model writes a directory)"
            )
        if out.is_dir():
            raise PipelineError(f"--out {out} is a directory; give a .keras file name")
        return out
    if out.suffix == ".keras":
        raise PipelineError(f"--out {out} is a .keras file name, but --format saved_model writes a directory; give a directory")
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; --format saved_model writes a directory (OUT/VERSION/)")
    target = out / str(DEFAULT_VERSION if version is None else version)
    if target.exists() and not overwrite:
        raise PipelineError(f"{target} already exists; pass --version N for a new version, or --overwrite to replace it")
    return target


def _disagreements(config, recorded):
    """Why the model's probabilities will differ from predict's, if they will."""
    reasons = []
    if config.image_size != recorded["image_size"]:
        reasons.append(
            f"the model resizes to {config.image_size} px but the head learned from features at "
            f"{recorded['image_size']} px; its probabilities will differ from `pipeline predict`, and accuracy may drop"
        )
    if recorded.get("fast_decode"):
        reasons.append(
            "the features were extracted with --fast-decode (large JPEGs decoded at reduced scale), but the model "
            "resizes the full pixels it is given; its probabilities differ slightly from `pipeline predict` on such JPEGs"
        )
    return reasons


def build_model(trunks, config, transform, head, classes):
    """uint8 images (B, H, W, 3) of any one size -> {"probabilities": (B, classes) float32, "predicted": (B,) names}.

    Nothing is trainable. The class names are the vocabulary of the `class_names` layer.
    """
    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    resized = square_resize(images, config.image_size, config.resize)
    taps = backbones.build_tap_model(trunks, config.taps, config.pooling, config.image_size)(resized)
    columns = [taps[key] for key in config.taps]
    features = keras.layers.Concatenate(dtype="float32", name="concat_taps")(columns) if len(columns) > 1 else columns[0]
    probabilities = head(scaled_pca(transform)(features))
    names = keras.layers.StringLookup(vocabulary=list(classes), invert=True, num_oov_indices=0, name="class_names")
    predicted = names(keras.ops.argmax(probabilities, axis=-1))
    model = keras.Model(images, {"probabilities": probabilities, "predicted": predicted}, name="image_classifier")
    model.trainable = False  # an inference artefact: batch norm stays in inference mode even under fit()
    return model


def scaled_pca(transform):
    """A frozen Dense computing `transform.transform`: scaling, PCA and whitening are one affine map.

    transform(x) = ((x - mean) * multiplier - pca_mean) @ components.T / scale, so the kernel is
    diag(multiplier) @ components.T / scale and the bias -((mean * multiplier + pca_mean) @
    components.T) / scale, folded in float64 and stored as float32.
    """
    pca = transform.pca_
    components = pca.components_.astype(np.float64)
    multiplier = transform.multiplier_.astype(np.float64)
    scale = np.ones(pca.n_components_)
    if pca.whiten:  # scikit-learn divides by sqrt(variance), floored at that dtype's eps
        scale = np.sqrt(pca.explained_variance_)
        scale = np.maximum(scale, np.finfo(scale.dtype).eps).astype(np.float64)
    kernel = multiplier[:, None] * components.T / scale
    bias = -((transform.scaler_.mean_ * multiplier + pca.mean_) @ components.T) / scale
    layer = keras.layers.Dense(pca.n_components_, dtype="float32", trainable=False, name="scaled_pca")
    layer.build((None, len(multiplier)))
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return layer


def serving_archive(model, image_size, resize, classes):
    """The SavedModel's signatures around `model`; each returns probabilities, predicted and classes.

    `serving_default(images)`: encoded images (tf.string, (B,)), each decoded and resized as
    extraction does, so one batch may mix sizes and formats. `pixels(images)`: uint8
    (B, H, W, 3) of one size. `classes` is the vocabulary repeated per row, (B, classes), so
    that every output has the batch dimension TF Serving's row format needs.

    The decoding and the antialiased resize are pinned to the CPU: its op (ScaleAndTranslate) has
    only a CPU kernel, so left to TensorFlow's placer on a GPU server the cast would run on the GPU
    and every full-size float32 image would cross to the CPU and back. Pinned, the request's pixels
    stay on the host and only the resized (B, S, S, 3) batch goes to the GPU. Same ops, same numbers.
    """
    # The same layers from the resized pixels on: the bytes path resizes image by image.
    after_resize = keras.Model(model.get_layer("resize").output, model.output)
    to_float32, resize_layer = model.get_layer("to_float32"), model.get_layer("resize")
    vocabulary = tf.constant(list(classes))

    def nothing():
        return {"probabilities": tf.zeros((0, len(classes))), "predicted": tf.zeros((0,), tf.string)}

    def outputs(classify, images):
        rows = tf.shape(images)[0]
        # oneDNN's convolution fails on an empty batch, so that one is answered without the model.
        result = tf.cond(rows > 0, lambda: classify(images), nothing)
        return {**result, "classes": tf.tile(vocabulary[None], [rows, 1])}

    def from_bytes(images):
        with tf.device("/CPU:0"):
            pixels = tf.map_fn(
                lambda contents: resize_image(decode_image(contents), image_size, resize),
                images,
                fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.float32),
            )
        return after_resize(pixels, training=False)

    def from_pixels(images):
        with tf.device("/CPU:0"):
            pixels = resize_layer(to_float32(images), training=False)
        return after_resize(pixels, training=False)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", functools.partial(outputs, from_bytes), [tf.TensorSpec((None,), tf.string, name="images")]
    )
    archive.add_endpoint(
        "pixels",
        functools.partial(outputs, from_pixels),
        [tf.TensorSpec((None, None, None, 3), tf.uint8, name="images")],
    )
    return archive


def _check_writable(target):
    """Make `--out`'s folder and its lock file now, so that a read-only or unwritable one is one sentence before any work."""
    make_dir(target.parent, "--out's folder")
    try:
        with open(lock_beside(target), "ab"):
            pass
    except OSError as e:
        raise PipelineError(f"cannot write to {target.parent} ({e.strerror}); export needs a writable directory") from None


def _write(target, overwrite, save):
    """Run `save(target)` under a lock beside `target`, so that exports to one path take turns.

    Under the lock, hidden temp files and dirs of that name are a killed export's, so they are
    removed. A write that fails for lack of room or rights is one sentence, the old export intact.
    """
    with output_guard(target, f"export {target}", wait=True):
        _remove_legacy_partials(target)
        if target.exists() and not overwrite:  # another export wrote this version since _target looked
            raise PipelineError(f"{target} already exists; pass --version N for a new version, or --overwrite to replace it")
        before = f"the previous {target.name} is unchanged" if target.exists() else f"no {target.name} was written"
        with storage_errors(str(target), f"{before}; free space (or fix the rights) and rerun"):
            save(target)


def _remove_legacy_partials(target):
    """What killed exports of older versions left besides temp files: .<name>.partial-<pid> of a dead process."""
    for path in target.parent.iterdir():
        match = _LEGACY_PARTIAL.match(path.name)
        if match and match["name"] == target.name and not _alive(int(match["pid"])):
            remove(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def _save_keras(model, path):
    """Save into a uniquely named hidden dir beside `path` (Keras insists on the .keras suffix), then rename over `path`."""
    staging = temp_sibling(path)
    staging.mkdir()
    try:
        model.save(staging / path.name)
        durable_replace(staging / path.name, path)
    finally:
        remove(staging)


def _save_saved_model(archive, target):
    """Write into a uniquely named hidden sibling of `target`, then rename it into place.

    An old `target` (only with overwrite) is renamed aside first and put back if the final
    rename fails. TF Serving only loads directories named by a number, so it never sees the
    hidden ones.
    """
    partial = temp_sibling(target)
    try:
        try:
            archive.write_out(str(partial), verbose=False)
        except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError) as e:
            raise _as_os_error(e, partial) from None
        replace_dir(partial, target)
    finally:
        remove(partial)


def _as_os_error(error, path):
    """TensorFlow's status for a failed write (its C++ file system maps errno to these) as the OSError it was."""
    message = str(error.message)
    if isinstance(error, tf.errors.ResourceExhaustedError):
        code = errno.EDQUOT if "quota" in message.lower() else errno.ENOSPC
    else:
        code = errno.EROFS if "read-only" in message.lower() else errno.EACCES
    return OSError(code, os.strerror(code), str(path))
