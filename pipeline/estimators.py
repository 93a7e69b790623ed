"""The fitted estimators of stage two (a): per-tap scaling + PCA, and the streaming covariance PCA.

Both follow scikit-learn's conventions (parameters in __init__, learned state ends in `_`), so
they pickle into transform.joblib and compose with scikit-learn tools.
"""

import numpy as np
import scipy.linalg
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

RANDOMIZED_SEED = 0  # the randomized SVD is seeded so that a rerun writes the same numbers


class TapTransform(TransformerMixin, BaseEstimator):
    """Standardize each feature, weight each tap, then PCA; meant to be fitted on train rows only.

    `tap_dims` are the widths of the concatenated taps in column order. Fitted state: `scaler_`
    (the StandardScaler of the train rows: mean_, var_, scale_), `tap_weights_` (factor per tap
    after standardizing: 1/sqrt(dim) for block, else 1), `multiplier_` (the resulting factor per
    feature; all ones for scaling="none") and `pca_` (mean_, components_, explained_variance_).
    A row x maps to pca_.transform((x - scaler_.mean_) * multiplier_).
    """

    def __init__(self, tap_dims=(), scaling="block", n_components=256, whiten=False, solver="full"):
        self.tap_dims = tap_dims
        self.scaling = scaling
        self.n_components = n_components
        self.whiten = whiten
        self.solver = solver

    def fit(self, X, y=None):
        """Fit on an in-memory matrix of train rows."""
        self.set_scaling(StandardScaler().fit(X))
        self.pca_ = PCA(self.n_components, whiten=self.whiten, svd_solver=self.solver, random_state=RANDOMIZED_SEED)
        self.pca_.fit(self.scale(X))
        return self

    def fit_batches(self, batches):
        """Fit from `batches()`, a callable returning a fresh iterator of train-row chunks.

        Two streaming passes (scaler statistics, then the covariance of the scaled rows), so
        memory is one chunk plus a features x features matrix, however many rows there are.
        """
        if self.solver != "incremental":
            raise ValueError(f"fit_batches needs solver='incremental', not {self.solver!r}")
        scaler = StandardScaler()
        for X in batches():
            scaler.partial_fit(X)
        self.set_scaling(scaler)
        self.pca_ = CovariancePCA(self.n_components, whiten=self.whiten).fit_batches(map(self.scale, batches()))
        return self

    def set_scaling(self, scaler):
        """Fit the scaling (scaler_, tap_weights_, multiplier_) from a StandardScaler fitted on the train rows."""
        dims = np.asarray(self.tap_dims, dtype=int)
        if dims.sum() != scaler.n_features_in_:
            raise ValueError(f"tap_dims add up to {dims.sum()} but X has {scaler.n_features_in_} columns")
        self.scaler_ = scaler
        self.tap_weights_ = 1 / np.sqrt(dims) if self.scaling == "block" else np.ones(len(dims))
        per_feature = np.ones(dims.sum()) if self.scaling == "none" else 1 / scaler.scale_
        self.multiplier_ = (per_feature * np.repeat(self.tap_weights_, dims)).astype(np.float32)
        return self

    def scale(self, X):
        """The standardized, tap-weighted rows the PCA sees, as float32."""
        return (np.asarray(X, dtype=np.float32) - self.scaler_.mean_.astype(np.float32)) * self.multiplier_

    def transform(self, X):
        return self.pca_.transform(self.scale(X)).astype(np.float32, copy=False)

    def tap_shares(self):
        """Per tap: (share of the scaled input variance, share of the variance the kept components hold).

        A component's variance is split among taps by its squared loadings, which sum to one.
        """
        edges = np.cumsum([0, *self.tap_dims])
        input_variance = self.scaler_.var_ * self.multiplier_.astype(np.float64) ** 2
        kept_variance = self.pca_.explained_variance_ @ self.pca_.components_.astype(np.float64) ** 2
        per_tap = [(input_variance[a:b].sum(), kept_variance[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]
        totals = np.sum(per_tap, axis=0)
        return [tuple(np.divide(pair, totals, out=np.zeros(2), where=totals > 0)) for pair in per_tap]


def batch_covariance(batches):
    """(mean, unbiased covariance, rows) of an iterable of (rows, features) chunks, in one pass.

    Each chunk adds its float32 Gram matrix into a float64 sum, so the rows should be (roughly)
    centered already: subtracting the mean at the end then loses no precision.
    """
    rows, total, gram = 0, None, None
    for X in batches:
        X = np.asarray(X, dtype=np.float32)
        if gram is None:
            total, gram = np.zeros(X.shape[1]), np.zeros((X.shape[1], X.shape[1]))
        rows += len(X)
        total += X.sum(axis=0, dtype=np.float64)
        gram += X.T @ X  # added in place: no float64 copy of the product
    mean = total / rows
    return mean, (gram - rows * np.outer(mean, mean)) / (rows - 1), rows


class CovariancePCA(TransformerMixin, BaseEstimator):
    """Exact PCA from the covariance matrix, accumulated one chunk of rows at a time (batch_covariance).

    One symmetric eigendecomposition of the top n_components gives the components. The rows
    reduce feeds it are already centered by the scaler, so subtracting the mean afterwards loses
    no precision. Fitted attributes mirror scikit-learn's PCA (mean_, components_,
    explained_variance_, explained_variance_ratio_, n_components_), with the same sign convention.
    """

    def __init__(self, n_components, whiten=False):
        self.n_components = n_components
        self.whiten = whiten

    def fit_batches(self, batches):
        """Fit from an iterable of (rows, features) chunks."""
        return self.fit_covariance(*batch_covariance(batches))

    def fit_covariance(self, mean, covariance, rows):
        """Fit from the mean and (unbiased) covariance of `rows` rows, say one block of a wider covariance."""
        self.mean_ = mean
        dim = len(covariance)
        # Only the top eigenpairs (ascending): exact, and about twice as fast as a full eigh at 4,096 features.
        variances, vectors = scipy.linalg.eigh(covariance, subset_by_index=[dim - self.n_components, dim - 1])
        order = np.argsort(variances)[::-1]
        components = vectors[:, order].T
        # scikit-learn's sign convention: each component's largest-magnitude loading is positive
        largest = components[np.arange(len(order)), np.abs(components).argmax(axis=1)]
        self.components_ = (components * np.sign(largest)[:, None]).astype(np.float32)
        self.explained_variance_ = np.clip(variances[order], 0.0, None)
        self.explained_variance_ratio_ = self.explained_variance_ / np.trace(covariance)
        self.n_components_ = len(order)
        self.n_features_in_ = covariance.shape[0]
        self.n_samples_ = rows
        return self

    def transform(self, X):
        projected = (np.asarray(X, dtype=np.float32) - self.mean_.astype(np.float32)) @ self.components_.T
        if self.whiten:  # as scikit-learn: divide by sqrt(variance), floored at eps
            projected /= np.maximum(np.sqrt(self.explained_variance_), np.finfo(np.float64).eps).astype(np.float32)
        return projected
