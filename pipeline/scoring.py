"""Scoring stage two's classifiers: metrics of predicted probabilities per split, and the one linear probe
(logistic regression) that train's baseline and `probe` both fit."""

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, log_loss

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.reduced import Reduced

PROBE_MAX_ITER = 1000  # lbfgs iterations for the logistic-regression probe
PROBE_MODEL = {"class": "sklearn.linear_model.LogisticRegression", "max_iter": PROBE_MAX_ITER}  # as run and probe records name it


def fit_linear_probe(X: np.ndarray, labels: np.ndarray) -> tuple[LogisticRegression, dict]:
    """(the logistic-regression probe fitted on the rows X, {iterations, converged}); not converging is recorded, not warned."""
    model = LogisticRegression(max_iter=PROBE_MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded as "converged" instead
        model.fit(X, labels)
    iterations = int(np.max(model.n_iter_))
    return model, {"iterations": iterations, "converged": iterations < PROBE_MAX_ITER}


def class_probabilities(model: LogisticRegression, X: np.ndarray, n_classes: int) -> np.ndarray:
    """A fitted scikit-learn classifier's probabilities over all `n_classes` (columns of classes it never saw are 0)."""
    full = np.zeros((len(X), n_classes))
    full[:, model.classes_] = model.predict_proba(X)
    return full


def split_metrics(data: "Reduced", proba: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Metrics of a Reduced's val and test rows (None when there are none), with row counts per split; `proba(X)` predicts."""
    metrics = {"rows": {split: int((data.splits == split).sum()) for split in ("train", "val", "test")}}
    for split in ("val", "test"):
        X, y = data.split_rows(split)
        metrics[split] = evaluate(y, proba(X), data.classes) if len(y) else None
    return metrics


def evaluate(labels: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1, log loss, per-class report and confusion matrix of predicted probabilities."""
    proba = np.array(proba, dtype=np.float64)  # a copy: normalising below must not change the caller's array
    bad = int((~np.isfinite(proba).all(axis=1)).sum())
    if bad:  # a head whose training diverged (NaN weights); log_loss would raise a ValueError
        raise PipelineError(
            f"the predicted probabilities of {bad} of {len(proba)} rows are NaN or Inf, so training diverged; "
            "try a lower --lr (or stronger --l2)"
        )
    proba /= proba.sum(axis=1, keepdims=True)  # float32 softmax rows drift from summing to exactly 1
    predicted = proba.argmax(axis=1)
    everyone = list(range(len(classes)))
    return {
        "rows": len(labels),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "log_loss": float(log_loss(labels, proba, labels=everyone)),
        "per_class": classification_report(
            labels, predicted, labels=everyone, target_names=[str(c) for c in classes], output_dict=True, zero_division=0
        ),
        "confusion": confusion_matrix(labels, predicted, labels=everyone).tolist(),
    }
