"""The promise two computations of the same features directory keep, as a test assertion.

Computed with the same CPU kind and thread count: the same bytes. With other thread counts,
engines or CPU kinds: every dataset and attribute the same, but each tap's features only the same
up to engines.FEATURE_RTOL (oneDNN may add float32 sums in another order).
"""

import json

import h5py
import numpy as np
import pytest

from helpers import files_bytes
from pipeline import shards
from pipeline.engines import features_agree

FIDELITY_ATOL = 1e-6  # the reduced-precision check's cosine is computed from the features, so it moves with them


def temp_files(features):
    return [p.name for p in features.iterdir() if p.name.endswith(".tmp")]


def assert_same_features(ours, reference, exact=False):
    """`ours` holds the features of `reference`: byte-identical shards if `exact`, else as the module docstring says."""
    names = sorted(files_bytes(reference))
    assert names and sorted(files_bytes(ours)) == names
    if exact:
        assert files_bytes(ours) == files_bytes(reference)
    for name in names:
        with h5py.File(ours / name, "r") as a, h5py.File(reference / name, "r") as b:
            _assert_same_group(a, b, name)
    manifests = [shards.read_manifest(ours), shards.read_manifest(reference)]
    assert _comparable(manifests[0]) == _comparable(manifests[1])
    assert manifests[0]["precision"] == pytest.approx(manifests[1]["precision"], abs=FIDELITY_ATOL)
    assert temp_files(ours) == [] and shards.verify(ours) == []


def _assert_same_group(a, b, where):
    assert sorted(a.keys()) == sorted(b.keys()), where
    attrs = {key: _attr(value) for key, value in a.attrs.items()}
    theirs = {key: _attr(value) for key, value in b.attrs.items()}
    fidelity = [json.loads(attrs.pop("fidelity", "{}")), json.loads(theirs.pop("fidelity", "{}"))]
    assert attrs == theirs and fidelity[0] == pytest.approx(fidelity[1], abs=FIDELITY_ATOL), where
    for key in a:
        inside = f"{where}:{a[key].name}"
        if isinstance(a[key], h5py.Group):
            _assert_same_group(a[key], b[key], where)
        elif a[key].name.startswith("/features/"):
            assert a[key].dtype == b[key].dtype and features_agree(a[key][()], b[key][()]), inside
        else:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key][()], b[key][()]), inside


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    return value.tolist() if isinstance(value, np.ndarray) else value


def _comparable(manifest):
    return {key: value for key, value in manifest.items() if key not in ("timing", "precision")}
