"""`pipeline export`: a head run as one Keras model, uint8 images in, class probabilities out.

The model chains, all in float32: SquareResize (extraction's resize), the fused tap model
(caffe preprocessing, trunks cut at their deepest tap, global pooling), the taps concatenated
in the transform's order, ScaledPCA (scaling and PCA as fixed weights), the trained head, and
ClassNames (which names the output columns).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pipeline import backbones
from pipeline.errors import PipelineError
from pipeline.layers import ClassNames, ScaledPCA, SquareResize
from pipeline.config import parse_weights
from pipeline.lineage import check_fingerprints, load_lineage


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
    check_fingerprints(loaded, lineage.expected_weights(config.backbones))

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
    """uint8 images (B, H, W, 3) of any one size -> float32 probabilities (B, classes); nothing trainable."""
    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    resized = SquareResize(config.image_size, config.resize, name="resize")(images)
    taps = backbones.build_tap_model(trunks, config.taps, config.pooling, config.image_size)(resized)
    columns = [taps[key] for key in config.taps]
    features = keras.layers.Concatenate(dtype="float32", name="concat_taps")(columns) if len(columns) > 1 else columns[0]
    pca = ScaledPCA(int(transform.pca_.n_components_), name="scaled_pca")
    reduced = pca(features)
    pca.set_transform(**pca_arrays(transform))
    probabilities = ClassNames(classes, name="probabilities")(head(reduced))
    model = keras.Model(images, probabilities, name="image_classifier")
    model.trainable = False  # an inference artefact: batch norm stays in inference mode even under fit()
    return model


def pca_arrays(transform):
    """ScaledPCA's weights from a fitted TapTransform, so that the layer computes transform.transform."""
    pca = transform.pca_
    scale = np.ones(pca.n_components_, dtype=np.float32)
    if pca.whiten:  # scikit-learn divides by sqrt(variance), floored at the dtype's eps
        scale = np.sqrt(pca.explained_variance_)
        scale = np.maximum(scale, np.finfo(scale.dtype).eps)
    return {
        "feature_mean": transform.scaler_.mean_,
        "feature_multiplier": transform.multiplier_,
        "pca_mean": pca.mean_,
        "components": pca.components_,
        "component_scale": scale,
    }


def _save_atomically(model, path):
    """Save to a hidden sibling, then rename it over `path` (Keras insists on the .keras suffix)."""
    partial = path.with_name(f".{path.stem}.partial.keras")
    try:
        model.save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
