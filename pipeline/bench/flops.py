"""The FLOP bound: analytic FLOPs of a Keras graph, and the machine's dense matmul rate."""

import math
import time

import keras
import tensorflow as tf

# The matmul dtype that stands for each compute policy (mixed policies multiply in the low one).
MATMUL_DTYPES = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def count_flops(model):
    """FLOPs per image of a Keras model's Conv2D and Dense layers, 2 per multiply-add.

    Counted analytically from each layer's kernel and output shape, walking nested models, so
    a truncated model counts only the layers it kept. Batch norm, activations, additions and
    pooling are left out (well under 1% for ResNet50 and VGG16).
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_flops(layer)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            positions = math.prod(layer.output.shape[1:-1])  # H_out * W_out; 1 for a Dense on vectors
            total += 2 * positions * math.prod(layer.kernel.shape)
    return total


def matmul_gflops(policy, size, repeats):
    """GFLOP/s of `repeats` timed size x size matmuls in the policy's compute dtype, after a warm-up."""
    dtype = MATMUL_DTYPES[policy]
    a = tf.cast(tf.random.stateless_normal((size, size), seed=(1, 2)), dtype)
    b = tf.cast(tf.random.stateless_normal((size, size), seed=(3, 4)), dtype)
    multiply = tf.function(lambda a, b: tf.linalg.matmul(a, b)[0, 0])  # one element to the host: no copy timed
    multiply(a, b).numpy()
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        multiply(a, b).numpy()
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    return rates
