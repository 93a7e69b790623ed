"""Stacks: K heads of one shape trained as one program match the same heads trained alone."""

import numpy as np
import pytest
from tensorflow.python.framework.config import is_op_determinism_enabled

from pipeline import head, stack
from pipeline.config import HeadConfig


@pytest.fixture(scope="module")
def rows():
    """(X_train, y_train, X_val, y_val, classes): 4 classes, 300 + 80 rows of 16 features, classes skewed for class weights."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16))
    y = np.repeat(np.arange(4), [120, 90, 60, 30])
    y_val = np.tile(np.arange(4), 20)
    X = (centers[y] + rng.normal(size=(300, 16))).astype(np.float32)
    X_val = (centers[y_val] + rng.normal(size=(80, 16))).astype(np.float32)
    return X, y, X_val, y_val, 4


def solo(config, rows, tmp_path):
    return head.fit_head(config, *rows, tmp_path / f"tb-{id(config)}")


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


DIFFERENT = [  # everything a stack allows to differ: l2, lr, label smoothing, class weights, seed, epochs, patience
    dict(l2=1e-4, lr=1e-3, seed=0),
    dict(l2=0.0, lr=3e-3, seed=1, label_smoothing=0.1, class_weight="balanced"),
    dict(l2=1e-3, lr=1e-2, seed=2, patience=1),
    dict(l2=1e-4, lr=3e-3, seed=3, epochs=2),
]


def test_stacked_heads_equal_solo_keras_fits_without_dropout(rows, tmp_path):
    configs = [
        HeadConfig(**{"hidden": (32, 8), "dropout": 0.0, "batch_size": 64, "epochs": 3, **different}) for different in DIFFERENT
    ]
    stacked = stack.fit_stack(configs, *rows)
    for config, fit in zip(configs, stacked):
        alone = solo(config, rows, tmp_path)
        assert fit.best_epoch == alone.best_epoch
        assert fit.history.keys() == alone.history.keys()
        for key in fit.history:
            np.testing.assert_allclose(fit.history[key], alone.history[key], rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(fit.weights, alone.model.get_weights(), strict=True):
            assert relative(theirs, ours) < 1e-5


def test_each_head_stops_on_its_own_patience_and_keeps_its_best_epoch(rows, tmp_path):
    """A high learning rate makes val loss turn early; patience 1 and 3 stop at different epochs (and the stack sheds)."""
    configs = [
        HeadConfig(hidden=(32,), dropout=0.0, batch_size=32, epochs=30, lr=0.05, patience=p, seed=s)
        for p, s in ((1, 0), (3, 0), (1, 5))
    ]
    stacked = stack.fit_stack(configs, *rows)
    lengths = {len(fit.history["loss"]) for fit in stacked}
    assert len(lengths) > 1 and max(lengths) < 30  # they stopped early, at different epochs
    for config, fit in zip(configs, stacked):
        alone = solo(config, rows, tmp_path)
        assert len(fit.history["loss"]) == len(alone.history["loss"])
        assert fit.best_epoch == alone.best_epoch
        assert fit.history["val_loss"][fit.best_epoch - 1] == min(fit.history["val_loss"])
        for ours, theirs in zip(fit.weights, alone.model.get_weights(), strict=True):
            assert relative(theirs, ours) < 1e-4  # up to ~15 epochs of float rounding


def test_a_stack_with_dropout_gives_the_same_weights_on_every_rerun(rows):
    configs = [
        HeadConfig(hidden=(32, 8), dropout=rate, batch_size=64, epochs=3, seed=seed)
        for rate, seed in ((0.2, 0), (0.5, 1), (0.0, 2))
    ]
    first, second = stack.fit_stack(configs, *rows), stack.fit_stack(configs, *rows)
    for a, b in zip(first, second):
        assert a.history == b.history
        for x, y in zip(a.weights, b.weights):
            np.testing.assert_array_equal(x, y)


def test_a_head_s_dropout_does_not_depend_on_its_stack(rows):
    """A head's dropout masks come from its own seed: alone or among others, it trains the same."""
    config = HeadConfig(hidden=(32,), dropout=0.3, batch_size=64, epochs=2, seed=7)
    (alone,) = stack.fit_stack([config], *rows)
    among = stack.fit_stack([HeadConfig(hidden=(32,), dropout=0.5, batch_size=64, epochs=2, seed=1), config], *rows)[1]
    for x, y in zip(alone.weights, among.weights):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    with_dropout_off = stack.fit_stack([HeadConfig(hidden=(32,), dropout=0.0, batch_size=64, epochs=2, seed=7)], *rows)[0]
    assert relative(with_dropout_off.weights[0], alone.weights[0]) > 1e-3  # the masks do something


def test_a_solo_head_trains_deterministically(rows, tmp_path, monkeypatch):
    fit_head = head._fit_head
    config = HeadConfig(hidden=(32,), dropout=0.3, batch_size=64, epochs=2, seed=3)
    seen = []
    monkeypatch.setattr(head, "_fit_head", lambda *args: seen.append(is_op_determinism_enabled()) or fit_head(*args))
    first, second = solo(config, rows, tmp_path), solo(config, rows, tmp_path)
    assert seen == [True, True] and not is_op_determinism_enabled()  # on while fitting, off again after
    for x, y in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(x, y)


def test_a_stack_needs_one_shape(rows):
    with pytest.raises(ValueError, match="one hidden/batch_size shape"):
        stack.fit_stack([HeadConfig(hidden=(8,)), HeadConfig(hidden=(16,))], *rows)
