"""Keras layers this project registers, so saved models load with plain `keras.saving.load_model`.

An exported model needs only this module imported (it registers the layers) and TensorFlow.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

# keras.applications' "caffe" mode, shared by ResNet50 and VGG16: RGB -> BGR, minus ImageNet means.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def caffe_preprocessing(name="caffe_preprocess"):
    """A frozen Dense(3) on the channel axis: RGB 0..255 -> BGR minus the ImageNet means (float32).

    The kernel is the channel permutation and the bias the negated means, so each output is
    x * 1 + 0 + 0 - mean: exactly what flipping and subtracting give.
    """
    layer = keras.layers.Dense(3, dtype="float32", trainable=False, name=name)
    layer.build((None, 3))
    layer.set_weights([np.eye(3, dtype=np.float32)[::-1], -np.asarray(CAFFE_MEAN_BGR, dtype=np.float32)])
    return layer


@keras.saving.register_keras_serializable(package="pipeline")
class CaffePreprocess(keras.layers.Layer):
    """RGB images in 0..255 -> BGR with the ImageNet channel means subtracted (float32).

    Extraction now uses `caffe_preprocessing`, with the same numbers; exports still hold this.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, images):
        bgr = ops.flip(ops.cast(images, "float32"), axis=-1)
        return bgr - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype="float32")


def resize_image(images, image_size, resize):
    """uint8 (H, W, 3) or a batch (B, H, W, 3) -> float32 (S, S, 3) in 0..255: bilinear, antialiased.

    `center-crop` first cuts the largest centered square; `squash` resizes the whole image.
    Extraction resizes one image at a time and SquareResize a batch, with the same numbers.
    """
    if resize == "center-crop":
        shape = tf.shape(images)
        height, width = shape[-3], shape[-2]
        side = tf.minimum(height, width)
        images = tf.image.crop_to_bounding_box(images, (height - side) // 2, (width - side) // 2, side, side)
    return tf.image.resize(images, (image_size, image_size), method="bilinear", antialias=True)


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
    component's variance when whitening, else ones. The weights never train: set them with
    `set_transform`.
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

    def set_transform(self, feature_mean, feature_multiplier, pca_mean, components, component_scale):
        """Load the fitted arrays; `components` as PCA gives them, one row per component."""
        arrays = (feature_mean, feature_multiplier, pca_mean, np.transpose(components), component_scale)
        self.set_weights([np.asarray(array, dtype=np.float32) for array in arrays])  # the order build made them

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
