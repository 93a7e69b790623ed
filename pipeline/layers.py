"""Keras layers this project registers, so saved models load with plain `keras.saving.load_model`."""

import keras
from keras import ops

# keras.applications' "caffe" mode, shared by ResNet50 and VGG16: RGB -> BGR, minus ImageNet means.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="pipeline")
class CaffePreprocess(keras.layers.Layer):
    """RGB images in 0..255 -> BGR with the ImageNet channel means subtracted (float32)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, images):
        bgr = ops.flip(ops.cast(images, "float32"), axis=-1)
        return bgr - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype="float32")
