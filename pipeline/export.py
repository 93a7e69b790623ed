"""`pipeline export`: a head run as one Keras model, uint8 images in, class probabilities and names out.

The model is built from built-in Keras layers only, all float32 and frozen: the extraction's
resize (Rescaling to float32, then Resizing), the fused tap model (caffe preprocessing, trunks cut
at their deepest tap, global pooling), the taps concatenated in the transform's order, scaling +
PCA folded into one Dense, the trained head, and a StringLookup naming the top class.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pipeline import backbones
from pipeline.config import parse_weights
from pipeline.errors import PipelineError
from pipeline.layers import square_resize
from pipeline.lineage import load_lineage


@dataclass(frozen=True)
class ExportResult:
    out: Path
    model: keras.Model
    classes: list
    image_size: int  # the side the model resizes every image to
    resize: str
    components: int
    warnings: list  # where the model will not agree with `pipeline predict`


def export(run_dir, out, *, image_size=None, weights=None):
    """Build the image -> probabilities model of a head run and save it to `out` (a .keras file).

    `image_size` defaults to the extraction's; `weights` replaces the recorded weight sources
    (whose fingerprints must still match).
    """
    out = Path(out)
    if out.suffix != ".keras":
        raise PipelineError(f"--out {out} must end in .keras, the file type Keras saves whole models as")
    lineage = load_lineage(run_dir)
    recorded = lineage.manifest["config"]
    config = lineage.extract_config(weights=weights, precision="float32", image_size=image_size or recorded["image_size"])
    trunks = {name: backbones.build_backbone(name, config.image_size) for name in config.backbones}
    backbones.check_taps(config.taps, trunks)
    loaded = backbones.load_trunk_weights(trunks, parse_weights(config.weights, config.backbones, config.seed))
    backbones.check_fingerprints(loaded, lineage.expected_weights(config.backbones))

    transform = lineage.load_transform()
    model = build_model(trunks, config, transform, lineage.load_head(), lineage.classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomically(model, out)
    return ExportResult(
        out, model, lineage.classes, config.image_size, config.resize, int(transform.pca_.n_components_),
        warnings=_disagreements(config, recorded),
    )


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


def _save_atomically(model, path):
    """Save to a hidden sibling, then rename it over `path` (Keras insists on the .keras suffix)."""
    partial = path.with_name(f".{path.stem}.partial.keras")
    try:
        model.save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
