"""Stage two on a local two-CPU Ray: per-shard reduce sums and a sweep through joblib's Ray backend."""

import joblib
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from test_parallel import SWEEP, run_files  # noqa: E402

import helpers  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module, not one per test."""
    with helpers.local_ray():
        yield


def test_a_ray_sweep_gives_the_metrics_of_a_sequential_one(local_ray, features_dir, tmp_path, run_cli):
    run_cli("reduce", features_dir(n=120), "--out", tmp_path / "reduced", "--components", 6)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(SWEEP)
    run_cli("train", tmp_path / "reduced", "--runs", tmp_path / "one", "--sweep", sweep)
    on_ray = run_cli("train", tmp_path / "reduced", "--runs", tmp_path / "ray", "--sweep", sweep, "--engine", "ray", "--jobs", 2)
    assert on_ray.output.count("val accuracy") == 3
    assert run_files(tmp_path / "ray") == run_files(tmp_path / "one")


def test_ray_reduce_equals_the_local_incremental_solver(local_ray, features_dir, tmp_path, run_cli):
    features = features_dir(n=400, shard_size=90)
    args = ["--components", 6, "--solver", "incremental", "--batch-rows", 40]
    run_cli("reduce", features, "--out", tmp_path / "local", *args)
    run_cli("reduce", features, "--out", tmp_path / "ray", *args, "--engine", "ray")
    local, remote = (joblib.load(tmp_path / name / "transform.joblib") for name in ("local", "ray"))
    for a, b in [(local.scaler_.var_, remote.scaler_.var_), (local.pca_.explained_variance_, remote.pca_.explained_variance_)]:
        np.testing.assert_allclose(b, a, rtol=1e-6)
    np.testing.assert_allclose(remote.scaler_.mean_, local.scaler_.mean_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(remote.pca_.components_, local.pca_.components_, rtol=1e-6, atol=1e-6)
    from pipeline.reduced import load_reduced

    X_local, X_ray = load_reduced(tmp_path / "local").X, load_reduced(tmp_path / "ray").X
    np.testing.assert_allclose(X_ray, X_local, rtol=1e-5, atol=1e-5)
    assert load_reduced(tmp_path / "ray").report["solver"] == {
        "requested": "incremental",
        "chosen": "incremental",
        "engine": "ray",
    }


def test_a_damaged_shard_on_ray_is_one_sentence(local_ray, features_dir, tmp_path, run_cli):
    import h5py

    features = features_dir(n=90, shard_size=30)
    with h5py.File(features / "shard-00002.h5", "r+") as f:
        f["features/vgg16/block5_conv3"][4, 1] = np.nan
    result = run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", 4, "--engine", "ray", code=1)
    assert "hold NaN or Inf: tap vgg16/block5_conv3 in 1 of 90 rows (first 'img00064.png')" in result.output
    assert "Traceback" not in result.output and "RayTaskError" not in result.output
