"""The resize and preprocessing shared by extraction and export, as built-in Keras layers and ops.

Extraction and new exports use only built-in layers and Keras ops, so an exported .keras file
loads with plain `keras.saving.load_model` and nothing from pipeline. The four registered classes
at the end (CaffePreprocess, SquareResize, ScaledPCA, ClassNames) are what exports written before
that contain: they stay, unused here, so that those files still load after `import pipeline.layers`.
"""

import keras
import tensorflow as tf
from keras import ops

# keras.applications' "caffe" mode, shared by ResNet50 and VGG16: RGB -> BGR, minus ImageNet means.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def caffe_preprocessing(images, name="caffe_preprocess"):
    """Symbolic RGB 0..255 -> BGR minus the ImageNet means (float32), exactly as keras.applications' caffe mode.

    A channel flip (a Keras op, saved with the model) and a Rescaling by 1 whose offset is the
    negated means: x * 1 + offset rounds once, as x - mean does. No matmul, so TF32 (on by default
    on Ampere and later GPUs) cannot round the pixels, as it would in the Dense(3) this replaces.
    """
    bgr = ops.flip(images, axis=-1)
    return keras.layers.Rescaling(1.0, offset=[-mean for mean in CAFFE_MEAN_BGR], dtype="float32", name=name)(bgr)


def resize_image(images, image_size, resize):
    """uint8 (H, W, 3) or a batch (B, H, W, 3) -> float32 (S, S, 3) in 0..255: bilinear, antialiased.

    `center-crop` first cuts the largest centered square; `squash` resizes the whole image.
    Extraction resizes one image at a time, `square_resize`'s layers a batch, with the same numbers.
    """
    if resize == "center-crop":
        shape = tf.shape(images)
        height, width = shape[-3], shape[-2]
        side = tf.minimum(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        images = images[..., top : top + side, left : left + side, :]  # slicing: crop_to_bounding_box adds stateful asserts
    return tf.image.resize(images, (image_size, image_size), method="bilinear", antialias=True)


def square_resize(images, image_size, resize):
    """`resize_image` on a symbolic uint8 batch, as built-in layers (named `to_float32` and `resize`).

    Resizing crops the same centered square. The cast comes first because Resizing rounds its
    output back to an integer input's dtype when called eagerly. `training=False` is stored in
    the graph because Resizing's call defaults to training=True, which Keras hands on to the
    layers after it: `model(images)` would otherwise run the head's dropout.
    """
    pixels = keras.layers.Rescaling(1.0, dtype="float32", name="to_float32")(images)
    return keras.layers.Resizing(
        image_size,
        image_size,
        interpolation="bilinear",
        antialias=True,
        crop_to_aspect_ratio=resize == "center-crop",
        dtype="float32",
        name="resize",
    )(pixels, training=False)


# --- the layers of exports written before the built-in ones -----------------------------------------


@keras.saving.register_keras_serializable(package="pipeline")
class CaffePreprocess(keras.layers.Layer):
    """RGB images in 0..255 -> BGR with the ImageNet channel means subtracted (float32)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, images):
        bgr = ops.flip(ops.cast(images, "float32"), axis=-1)
        return bgr - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype="float32")


@keras.saving.register_keras_serializable(package="pipeline")
class SquareResize(keras.layers.Layer):
    """uint8 images (B, H, W, 3), all of one size -> float32 (B, S, S, 3), as extraction resizes them."""

    def __init__(self, image_size, resize="squash", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.image_size = image_size
        self.resize = resize

    def call(self, images):
        return resize_image(images, self.image_size, self.resize)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size, "resize": self.resize}


@keras.saving.register_keras_serializable(package="pipeline")
class ScaledPCA(keras.layers.Layer):
    """Fixed scaling then PCA: ((x - feature_mean) * feature_multiplier - pca_mean) @ projection / component_scale.

    `projection` is the PCA's components transposed; `component_scale` the square root of each
    component's variance when whitening, else ones. The weights never train.
    """

    def __init__(self, components, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.components = components

    def build(self, input_shape):
        features = input_shape[-1]
        for name, shape in (
            ("feature_mean", (features,)),
            ("feature_multiplier", (features,)),
            ("pca_mean", (features,)),
            ("projection", (features, self.components)),
            ("component_scale", (self.components,)),
        ):
            setattr(self, name, self.add_weight(shape=shape, initializer="zeros", trainable=False, name=name))

    def call(self, features):
        centered = (features - self.feature_mean) * self.feature_multiplier - self.pca_mean
        return ops.matmul(centered, self.projection) / self.component_scale

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.components)

    def get_config(self):
        return {**super().get_config(), "components": self.components}


@keras.saving.register_keras_serializable(package="pipeline")
class ClassNames(keras.layers.Layer):
    """Passes probabilities through unchanged; its `class_names` name the columns, saved with the model."""

    def __init__(self, class_names, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.class_names = list(class_names)

    def call(self, probabilities):
        return probabilities

    def get_config(self):
        return {**super().get_config(), "class_names": self.class_names}
