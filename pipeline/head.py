"""The Keras head: Dense ReLU layers with dropout and L2, a float32 softmax, fitted with Adam."""

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf


@dataclass
class FittedHead:
    model: keras.Model
    history: dict  # Keras history: metric name -> one value per epoch run
    best_epoch: int  # 1-based epoch whose weights the model holds


def build_head(input_dim, n_classes, config, compile=True):
    """The head for a HeadConfig (compiled for fitting unless told); every layer computes in float32 whatever the global policy."""
    regularizer = keras.regularizers.L2(config.l2) if config.l2 else None
    inputs = keras.Input((input_dim,), dtype="float32")
    x = inputs
    for units in config.hidden:
        x = keras.layers.Dense(units, activation="relu", kernel_regularizer=regularizer, dtype="float32")(x)
        if config.dropout:
            x = keras.layers.Dropout(config.dropout, dtype="float32")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=regularizer, dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="head")
    if not compile:
        return model
    model.compile(
        optimizer=keras.optimizers.Adam(config.lr),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    return model


def fit_head(config, X_train, y_train, X_val, y_val, n_classes, log_dir):
    """Seeded fit with early stopping on val loss (best weights restored) and TensorBoard logs in `log_dir`."""
    with deterministic():
        return _fit_head(config, X_train, y_train, X_val, y_val, n_classes, log_dir)


def _fit_head(config, X_train, y_train, X_val, y_val, n_classes, log_dir):
    keras.utils.set_random_seed(config.seed)
    model = build_head(X_train.shape[1], n_classes, config)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)
    with summary_storage_errors(log_dir):
        history = model.fit(
            _dataset(X_train, y_train, n_classes, config.batch_size, shuffle_seed=config.seed, epochs=config.epochs),
            validation_data=_dataset(X_val, y_val, n_classes, config.batch_size),
            epochs=config.epochs,
            steps_per_epoch=-(-len(X_train) // config.batch_size),  # one iterator over every epoch's batches
            shuffle=False,  # the dataset orders each epoch itself
            class_weight=dict(enumerate(class_weight_table(y_train, n_classes).tolist()))
            if config.class_weight == "balanced"
            else None,
            callbacks=[stopper, keras.callbacks.TensorBoard(str(log_dir), write_graph=False)],
            verbose=0,
        )
    return FittedHead(model, history.history, stopper.best_epoch + 1)


def write_tensorboard(history, log_dir):
    """The per-epoch scalars the Keras TensorBoard callback writes (train/ and validation/ event files), for a head fitted elsewhere."""
    with summary_storage_errors(log_dir):
        for split, prefix in (("train", ""), ("validation", "val_")):
            writer = tf.summary.create_file_writer(str(Path(log_dir) / split))
            with writer.as_default():
                for metric in ("loss", "accuracy"):
                    for epoch, value in enumerate(history[prefix + metric]):
                        tf.summary.scalar(f"epoch_{metric}", value, step=epoch)
            writer.close()


@contextlib.contextmanager
def summary_storage_errors(log_dir):
    """TensorFlow's summary writer reports a full disk or a refused write as its own error: make it the OSError it is."""
    try:
        yield
    except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError) as e:
        if "Summary" not in str(e):  # an op of the fit itself (say, out of memory): not a file
            raise
        code = errno.ENOSPC if isinstance(e, tf.errors.ResourceExhaustedError) else errno.EACCES
        raise OSError(code, os.strerror(code), str(log_dir)) from None


def predict_proba(model, X, batch_size=4096):
    """Class probabilities, computed eagerly in batches: no tf.function is traced for every new head."""
    return np.concatenate(
        [
            keras.ops.convert_to_numpy(model(X[start : start + batch_size], training=False))
            for start in range(0, len(X), batch_size)
        ]
    )


def _dataset(X, y, n_classes, batch_size, shuffle_seed=None, epochs=None):
    """Rows from memory with one-hot targets; when training, `epochs` epochs, each in epoch_order(shuffle_seed, epoch)."""
    Y = keras.utils.to_categorical(y, n_classes).astype(np.float32)
    if shuffle_seed is None:
        return tf.data.Dataset.from_tensor_slices((X, Y)).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    X, Y = tf.constant(X), tf.constant(Y)
    seeds = tf.constant([shuffle_seed], tf.int64)
    batches = tf.data.Dataset.range(epochs).flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(epoch_order(seeds, epoch, len(X))[0]).batch(batch_size)
    )
    return batches.map(lambda index: (tf.gather(X, index), tf.gather(Y, index))).prefetch(tf.data.AUTOTUNE)


def epoch_order(seeds, epoch, rows):
    """(K, rows) row orders of one epoch for K heads' seeds: a pure function of (seed, epoch), so a head sees the
    same batches alone (fit_head) and in a stack (stack.py), and no iterator state is involved."""
    keys = hash32(seeds[:, None], tf.cast(epoch, tf.int64), tf.range(rows, dtype=tf.int64)[None, :])
    return tf.argsort(keys, axis=1, stable=True)


def hash32(*keys):
    """A 32-bit hash (int64 tensor) of broadcast int64 `keys`: murmur3's finalizer over an odd-constant mix."""
    mask = tf.constant(0xFFFFFFFF, tf.int64)
    x = tf.zeros([], tf.int64)
    for key, odd in zip(keys, (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1)):
        x = (x + tf.cast(key, tf.int64) * odd) & mask
    xor_shift = lambda x, shift: tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(shift, tf.int64)))  # noqa: E731
    for shift, odd in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        x = (xor_shift(x, shift) * odd) & mask
    return xor_shift(x, 16)


def class_weight_table(y, n_classes):
    """Balanced weights per class, rows / (classes present * rows of the class); 1 for classes absent from train."""
    counts = np.bincount(y, minlength=n_classes)
    present = np.count_nonzero(counts)
    return np.array([len(y) / (present * counts[c]) if counts[c] else 1.0 for c in range(n_classes)], np.float32)


@contextlib.contextmanager
def deterministic():
    """TensorFlow's ops deterministic while fitting, so that a rerun of a seeded fit gives the same weights.

    The switch is process-wide, so the previous state comes back afterwards (stage one's input
    pipeline would run its parallel maps one at a time under it).
    """
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if not was:
            tf_config.disable_op_determinism()
