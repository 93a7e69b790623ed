"""The fitted estimators of stage two (a): per-tap scaling + PCA, and the streaming covariance PCA.

Both follow scikit-learn's conventions (parameters in __init__, learned state ends in `_`), so
they pickle into transform.joblib and compose with scikit-learn tools. The streaming fit is two
sums over chunks of train rows (`Moments`, then `GramSums` of the scaled rows); a sum over part of
the rows (one shard, on a Ray worker) adds to the sums of the other parts, so the same functions
serve the local loop and the distributed one.
"""

import numpy as np
import scipy.linalg
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

RANDOMIZED_SEED = 0  # the randomized SVD is seeded so that a rerun writes the same numbers
_EPS = np.finfo(np.float64).eps


class Moments:
    """Per-feature count, sum and sum of squared deviations from the mean of the rows added so far.

    Two parts merge exactly (Chan, Golub and LeVeque's pairwise update), so the order in which
    chunks or shards are added changes the result only by float64 rounding.
    """

    def __init__(self, dim):
        self.count = 0
        self.total = np.zeros(dim)
        self.squares = np.zeros(dim)

    def add_rows(self, X):
        """Add a chunk of rows (float32 or float64); the chunk's own statistics are taken in float64."""
        part = Moments(X.shape[1])
        if len(X):
            part.count = len(X)
            part.total = X.sum(axis=0, dtype=np.float64)
            deviations = X - part.total / part.count  # float64
            part.squares = np.einsum("ij,ij->j", deviations, deviations)
        self += part
        return self

    def __iadd__(self, other):
        if other.count:
            count = self.count + other.count
            gap = other.total / other.count - (self.total / self.count if self.count else 0.0)
            self.squares = self.squares + other.squares + gap**2 * (self.count * other.count / count)
            self.total = self.total + other.total
            self.count = count
        return self

    def standard_scaler(self):
        """A fitted StandardScaler of these rows, as StandardScaler.fit would make it (constant features get scale 1)."""
        scaler = StandardScaler()
        scaler.n_features_in_ = len(self.total)
        scaler.n_samples_seen_ = self.count
        scaler.mean_ = self.total / self.count
        scaler.var_ = self.squares / self.count
        scale = np.sqrt(scaler.var_)
        # scikit-learn's test for a constant feature: a variance within float64 rounding of zero
        constant = scaler.var_ <= self.count * _EPS * scaler.var_ + (self.count * scaler.mean_ * _EPS) ** 2
        scale[constant] = 1.0
        scaler.scale_ = scale
        return scaler


class GramSums:
    """Row count, column sums and Gram matrix (X.T @ X) of the rows added so far, in float64."""

    def __init__(self, dim):
        self.count = 0
        self.total = np.zeros(dim)
        self.gram = np.zeros((dim, dim))

    def add_rows(self, X):
        X = np.asarray(X, dtype=np.float32)
        self.count += len(X)
        self.total += X.sum(axis=0, dtype=np.float64)
        self.gram += X.T @ X  # a float32 product added in place: no float64 copy of it
        return self

    def __iadd__(self, other):
        self.count += other.count
        self.total += other.total
        self.gram += other.gram
        return self

    def mean_and_covariance(self):
        """The rows' mean and unbiased covariance; exact when the rows are (roughly) centered, as scaled rows are."""
        mean = self.total / self.count
        return mean, (self.gram - self.count * np.outer(mean, mean)) / (self.count - 1)


def moment_sums(chunks, dim):
    """Moments of every row of an iterable of (rows, dim) chunks."""
    moments = Moments(dim)
    for X in chunks:
        moments.add_rows(X)
    return moments


def gram_sums(chunks, dim):
    """GramSums of every row of an iterable of (rows, dim) chunks."""
    sums = GramSums(dim)
    for X in chunks:
        sums.add_rows(X)
    return sums


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

    def fit_scaling(self, moments):
        """First step of a streaming fit (solver="incremental"): the scaling, from the Moments of the train rows.

        Two streaming passes (this, then fit_covariance), so memory is one chunk plus a features x
        features matrix, however many rows there are.
        """
        return self.set_scaling(moments.standard_scaler())

    def fit_covariance(self, sums):
        """Second step of a streaming fit: the PCA, from the GramSums of the scaled train rows."""
        if self.solver != "incremental":
            raise ValueError(f"a streaming fit needs solver='incremental', not {self.solver!r}")
        self.pca_ = CovariancePCA(self.n_components, whiten=self.whiten).fit_sums(sums)
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


class CovariancePCA(TransformerMixin, BaseEstimator):
    """Exact PCA from the covariance matrix, accumulated one chunk of rows at a time.

    Each chunk adds its float32 Gram matrix into a float64 sum (GramSums); one symmetric
    eigendecomposition of the top n_components at the end gives the components. The rows it sees
    are already centered by the scaler, so subtracting the mean afterwards loses no precision.
    Fitted attributes mirror scikit-learn's PCA (mean_, components_, explained_variance_,
    explained_variance_ratio_, n_components_), with the same sign convention.
    """

    def __init__(self, n_components, whiten=False):
        self.n_components = n_components
        self.whiten = whiten

    def fit_sums(self, sums):
        """Fit from the GramSums of the rows."""
        return self.fit_covariance(*sums.mean_and_covariance(), sums.count)

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
