"""Stage two (a): splits, scaling, PCA, the reduced/ format, caching and bad input."""

import itertools
import tracemalloc

import h5py
import joblib
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline import features as features_module
from pipeline import reduced as reduced_module
from pipeline import shards
from pipeline.config import ReduceConfig
from pipeline.errors import PipelineError
from pipeline.estimators import GramSums, Moments, TapTransform, gram_sums, moment_sums
from pipeline.lineage import TRANSFORM_NAME
from pipeline.reduce import choose_solver, reduce_features
from pipeline.reduced import load_reduced

TAPS = {"resnet50/conv5_block3_out": 24, "vgg16/block5_conv3": 16}


def read_features(features):
    """All rows of a features dir as (ids, X) with taps concatenated in manifest order."""
    manifest = shards.read_manifest(features)
    taps = [t["key"] for t in manifest["taps"]]
    ids, parts = [], []
    for chunk_ids, _, _, X in shards.iter_feature_chunks(features, manifest, taps, 10_000):
        ids += chunk_ids
        parts.append(X)
    return ids, np.concatenate(parts)


def subspace_cosines(a, b):
    """Cosines of the principal angles between the row spaces of two orthonormal bases."""
    return np.linalg.svd(a @ b.T, compute_uv=False)


# --- splits (the rule itself: test_splits.py)


def test_every_setting_sees_the_same_split(features_dir, tmp_path):
    features = features_dir(n=150)
    settings = [
        ReduceConfig(components=4),
        ReduceConfig(components=0.8, scaling="none", taps=("vgg16/block5_conv3",)),
        ReduceConfig(components=3, solver="incremental", batch_rows=40, whiten=True),
    ]
    splits = []
    for index, config in enumerate(settings):
        reduce_features(features, tmp_path / f"reduced{index}", config)
        splits.append(load_reduced(tmp_path / f"reduced{index}").splits.tolist())
    assert splits[0] == splits[1] == splits[2]
    assert set(splits[0]) == {"train", "val", "test"}


# --- scaling and PCA


def test_scaler_and_pca_are_fitted_on_train_rows_only(features_dir, tmp_path):
    features = features_dir(n=150)
    reduce_features(features, tmp_path / "reduced", ReduceConfig(components=5, scaling="standard"))
    reduced = load_reduced(tmp_path / "reduced")
    transform = joblib.load(tmp_path / "reduced" / TRANSFORM_NAME)
    ids, X = read_features(features)
    assert ids == reduced.ids
    X_train = X[reduced.splits == "train"]

    np.testing.assert_allclose(transform.scaler_.mean_, X_train.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(transform.scaler_.var_, X_train.var(axis=0), rtol=1e-4)
    assert not np.allclose(transform.scaler_.mean_, X.mean(axis=0), atol=1e-3)

    reference = PCA(5, svd_solver="full").fit((X_train - X_train.mean(axis=0)) / X_train.std(axis=0))
    np.testing.assert_allclose(transform.pca_.explained_variance_, reference.explained_variance_, rtol=1e-3)
    assert subspace_cosines(transform.pca_.components_, reference.components_).min() > 0.9999
    np.testing.assert_allclose(reduced.X, transform.transform(X), atol=1e-5)


def test_block_scaling_keeps_a_loud_tap_from_taking_all_variance(features_dir, tmp_path):
    features = features_dir(n=150, scales={"vgg16/block5_conv3": 100.0})
    shares = {}
    for scaling in ("none", "standard", "block"):
        report = reduce_features(features, tmp_path / scaling, ReduceConfig(components=4, scaling=scaling)).report
        shares[scaling] = {t["key"]: (t["input_share"], t["kept_share"]) for t in report["taps"]}
    loud, quiet = "vgg16/block5_conv3", "resnet50/conv5_block3_out"
    assert shares["none"][loud][1] > 0.99
    assert shares["standard"][quiet][0] == pytest.approx(24 / 40)
    assert shares["block"][quiet][0] == pytest.approx(0.5) and shares["block"][loud][0] == pytest.approx(0.5)
    assert 0.2 < shares["block"][loud][1] < 0.8


def test_incremental_pca_spans_the_same_subspace_as_full(features_dir, tmp_path):
    features = features_dir(n=300, shard_size=70)
    full = reduce_features(features, tmp_path / "full", ReduceConfig(components=2, solver="full")).report
    incremental = reduce_features(
        features, tmp_path / "incremental", ReduceConfig(components=2, solver="incremental", batch_rows=32)
    ).report
    assert (full["solver"]["chosen"], incremental["solver"]["chosen"]) == ("full", "incremental")
    pcas = [joblib.load(tmp_path / name / TRANSFORM_NAME).pca_ for name in ("full", "incremental")]
    assert subspace_cosines(pcas[0].components_, pcas[1].components_).min() > 0.999
    np.testing.assert_allclose(incremental["explained_variance_ratio"], full["explained_variance_ratio"], rtol=1e-3)


def test_incremental_memory_is_bounded_by_the_chunk(features_dir, tmp_path, monkeypatch):
    # float16 shards of 4000 rows read 100 at a time; the raw train rows would take 13 MB as float32,
    # while incremental holds one chunk plus a few 128 x 128 covariance-sized matrices.
    features = features_dir(
        n=32000, taps={"resnet50/conv5_block3_out": 64, "vgg16/block5_conv3": 64}, shard_size=4000, storage_dtype="float16"
    )
    raw_train_bytes = 25600 * 128 * 4
    chunk_rows = []
    real_matrix = features_module.Batch.matrix

    def recording_matrix(batch, *args, **kwargs):
        chunk_rows.append(len(batch.positions))
        return real_matrix(batch, *args, **kwargs)

    monkeypatch.setattr(features_module.Batch, "matrix", recording_matrix)
    peaks = {}
    # One BLAS thread: on a busy 2-core machine OpenBLAS threads spin against each other.
    with threadpool_limits(1):
        for solver in ("incremental", "full"):
            tracemalloc.start()
            reduce_features(features, tmp_path / solver, ReduceConfig(components=8, solver=solver, batch_rows=100))
            peaks[solver] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert max(chunk_rows) == 100
    assert peaks["incremental"] < raw_train_bytes / 2
    assert peaks["full"] > raw_train_bytes  # the control: holding the train rows does show up


def test_auto_solver_goes_incremental_when_train_rows_do_not_fit():
    config = ReduceConfig(components=64)
    assert choose_solver(config, n_train=100_000, dim=4096, memory_bytes=64 * 2**30) == "randomized"
    assert choose_solver(config, n_train=1000, dim=100, memory_bytes=64 * 2**30) == "full"
    assert choose_solver(config, n_train=100_000, dim=4096, memory_bytes=2**30) == "incremental"
    with pytest.raises(PipelineError, match="variance share.*too big for memory"):
        choose_solver(ReduceConfig(components=0.9), n_train=100_000, dim=4096, memory_bytes=2**30)


def test_variance_share_keeps_the_fewest_components_that_reach_it(features_dir, tmp_path):
    report = reduce_features(features_dir(n=150), tmp_path / "reduced", ReduceConfig(components=0.7)).report
    cumulative = np.cumsum(report["explained_variance_ratio"])
    assert cumulative[-1] >= 0.7 > cumulative[-2]
    assert load_reduced(tmp_path / "reduced").X.shape == (150, report["components"])


@pytest.mark.parametrize(
    "config, maximum",
    [
        (ReduceConfig(components=41), "maximum of 40 "),
        (ReduceConfig(components=41, solver="incremental", batch_rows=30), "maximum of 40 "),
    ],
)
def test_too_many_components_names_the_maximum(features_dir, tmp_path, config, maximum):
    with pytest.raises(PipelineError, match=maximum):
        reduce_features(features_dir(n=150), tmp_path / "reduced", config)
    assert not (tmp_path / "reduced").exists()


# --- partial sums: what the local loop and Ray tasks both compute


def test_moments_and_gram_sums_of_parts_add_up_to_those_of_the_whole():
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(203, 7)) * rng.uniform(0.01, 100, 7) + rng.uniform(-1e3, 1e3, 7)).astype(np.float32)
    X[:, 3] = 5.0  # a constant feature
    parts = [X[:1], X[1:90], X[90:90], X[90:]]
    moments = Moments(7)
    for part in parts:
        moments += moment_sums([part], 7)
    reference = StandardScaler().fit(X)
    scaler = moments.standard_scaler()
    np.testing.assert_allclose(scaler.mean_, reference.mean_, rtol=1e-12)
    np.testing.assert_allclose(scaler.var_, reference.var_, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(scaler.scale_[3], 1.0)
    np.testing.assert_allclose(scaler.scale_, reference.scale_, rtol=1e-9)
    assert scaler.n_samples_seen_ == 203

    grams = GramSums(7)
    for part in parts:
        grams += gram_sums([part], 7)
    whole = gram_sums([X], 7)
    assert grams.count == whole.count == 203
    np.testing.assert_allclose(grams.gram, X.astype(np.float64).T @ X.astype(np.float64), rtol=1e-6)
    np.testing.assert_allclose(grams.total, whole.total, rtol=1e-12)


def test_the_local_solver_s_numbers_are_those_of_its_former_one_pass_loop(features_dir, tmp_path):
    """Summing per shard (what Ray tasks return) changes the local incremental solver only by float64 rounding.

    The reference is the loop it replaced: StandardScaler.partial_fit over the chunks, then one
    float64 Gram sum over all scaled chunks.
    """
    features = features_dir(n=240, shard_size=70)
    reduce_features(features, tmp_path / "reduced", ReduceConfig(components=5, solver="incremental", batch_rows=32))
    fitted = joblib.load(tmp_path / "reduced" / "transform.joblib")
    is_train = load_reduced(tmp_path / "reduced").splits == "train"
    manifest = shards.read_manifest(features)
    chunks, start = [], 0
    for _, _, _, X in shards.iter_feature_chunks(features, manifest, [t["key"] for t in manifest["taps"]], 32):
        chunks.append(X[is_train[start : start + len(X)]])
        start += len(X)
    reference = TapTransform(fitted.tap_dims, "block", 5, False, "incremental")
    scaler = StandardScaler()
    for X in chunks:
        scaler.partial_fit(X)
    reference.set_scaling(scaler)
    rows, total, gram = 0, 0.0, np.zeros((sum(fitted.tap_dims),) * 2)
    for X in map(reference.scale, chunks):
        rows, total, gram = rows + len(X), total + X.sum(axis=0, dtype=np.float64), gram + X.T @ X
    mean = total / rows
    variances = np.sort(np.linalg.eigvalsh((gram - rows * np.outer(mean, mean)) / (rows - 1)))[::-1][:5]
    np.testing.assert_allclose(fitted.scaler_.mean_, scaler.mean_, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fitted.scaler_.var_, scaler.var_, rtol=1e-12)
    np.testing.assert_allclose(fitted.pca_.explained_variance_, variances, rtol=1e-12)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--engine", "ray", "--solver", "full"],
            "--engine ray runs the incremental solver's passes as Ray tasks, but --solver full runs in this process",
        ),
        (["--engine", "ray", "--components", "0.9"], "needs the full solver, but --engine ray was asked for"),
        (["--ray-address", "auto"], "--ray-address auto is for --engine ray"),
    ],
)
def test_engine_options_that_cannot_work_are_one_sentence(features_dir, tmp_path, run_cli, args, message):
    result = run_cli("reduce", features_dir(n=60), "--out", tmp_path / "reduced", *args, code=1)
    assert message in result.output and not (tmp_path / "reduced").exists()


# --- outputs and caching


def test_outputs_follow_the_format(features_dir, tmp_path):
    features = features_dir(n=120, storage_dtype="float16")
    reduce_features(features, tmp_path / "reduced", ReduceConfig(components=6))
    out = tmp_path / "reduced"
    assert sorted(p.name for p in out.iterdir()) == sorted(reduced_module.OUTPUT_NAMES)
    with h5py.File(out / reduced_module.REDUCED_NAME) as f:
        assert f["X"].dtype == np.float32 and f["X"].shape == (120, 6)
        assert set(f["splits"].asstr()[:]) == {"train", "val", "test"}
    report = load_reduced(out).report
    assert report["inputs"]["features"] == "../features"
    assert report["splits"]["rows"] == {"train": 97, "val": 13, "test": 10}  # about 80/10/10: each id by its own hash
    assert report["splits"]["rule"] == "id-hash-threshold/2" and report["inputs"]["generation"] == 0
    assert [t["key"] for t in report["taps"]] == list(TAPS)
    assert report["config"]["taps"] == list(TAPS)
    assert len(report["explained_variance_ratio"]) == 6
    assert [p.name for p in tmp_path.glob(".*")] == [".reduced.lock"]  # the lock beside it; no staging dir left behind


def test_same_settings_are_a_cache_hit_and_other_settings_need_overwrite(features_dir, tmp_path):
    features = features_dir(n=120)
    out = tmp_path / "reduced"
    assert not reduce_features(features, out, ReduceConfig(components=4)).up_to_date
    stamp = (out / reduced_module.REDUCED_NAME).stat().st_mtime_ns
    assert reduce_features(features, out, ReduceConfig(components=4, taps=tuple(reversed(TAPS)))).up_to_date
    assert (out / reduced_module.REDUCED_NAME).stat().st_mtime_ns == stamp

    with pytest.raises(PipelineError, match="components 4, now 5.*--overwrite"):
        reduce_features(features, out, ReduceConfig(components=5))
    assert load_reduced(out).X.shape[1] == 4
    reduce_features(features, out, ReduceConfig(components=5), overwrite=True)
    assert load_reduced(out).X.shape[1] == 5

    other = features_dir(n=120, seed=1, name="other-features")
    with pytest.raises(PipelineError, match="another features manifest"):
        reduce_features(other, out, ReduceConfig(components=5))


# --- bad input


def test_a_shard_from_another_extraction_is_refused(features_dir, tmp_path):
    features = features_dir(n=120)
    other = features_dir(n=120, seed=1, name="other")
    (features / "shard-00001.h5").write_bytes((other / "shard-00001.h5").read_bytes())
    with pytest.raises(PipelineError, match="shard-00001.h5 was written by another extraction.*mixes two manifests"):
        reduce_features(features, tmp_path / "reduced")
    assert not (tmp_path / "reduced").exists()


def test_a_non_empty_foreign_out_dir_is_refused(features_dir, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"")
    with pytest.raises(PipelineError, match="neither empty nor a reduced directory"):
        reduce_features(features_dir(n=60), out, ReduceConfig(components=2), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


def test_fractions_that_leave_no_train_rows_are_refused():
    with pytest.raises(PipelineError, match="leaves no rows for train"):
        ReduceConfig(val_fraction=0.5, test_fraction=0.5)


def test_cli_reduce_reports_and_then_is_up_to_date(features_dir, tmp_path, run_cli):
    features = features_dir(n=120)
    first = run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", "0.8", "--tap", "vgg16:block5_conv3")
    assert "train 97, val 13, test 10 (splits from hash)" in first.output
    assert "vgg16/block5_conv3" in first.output and "resnet50" not in first.output
    again = run_cli("reduce", features, "--out", tmp_path / "reduced", "--components", "0.8", "--tap", "vgg16/block5_conv3")
    assert "up to date" in again.output


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--components", "many"], "'many' is neither a number of components", 2),
        (["--components", "1.5"], "'1.5' is neither a number of components", 2),
        (
            ["--tap", "vgg16/block3_conv3"],
            "tap vgg16/block3_conv3 is not in the features manifest; it has resnet50/conv5_block3_out, vgg16/block5_conv3",
            1,
        ),
        (["--val-fraction", "0.6", "--test-fraction", "0.4"], "leaves no rows for train", 1),
        (["--scaling", "loud"], "'loud' is not one of", 2),
    ],
)
def test_cli_reduce_bad_options_are_one_clear_error(features_dir, tmp_path, run_cli, args, message, code):
    result = run_cli("reduce", features_dir(n=60), "--out", tmp_path / "reduced", *args, code=code)
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "reduced").exists()


def test_cli_reduce_refuses_a_directory_that_is_not_features(tmp_path, run_cli):
    (tmp_path / "images").mkdir()
    result = run_cli("reduce", tmp_path / "images", "--out", tmp_path / "reduced", code=1)
    assert "is not a features directory" in result.output
    assert not (tmp_path / "reduced").exists()


def test_a_transform_pickled_before_estimators_py_still_loads(tmp_path, monkeypatch):
    """transform.joblib files from before the move name the classes under pipeline.reduce."""
    from pipeline import estimators

    X = np.random.default_rng(0).normal(size=(30, 6)).astype(np.float32)
    transform = estimators.TapTransform((2, 4), "block", 3, False, "full").fit(X)
    with monkeypatch.context() as patch:
        for name in ("TapTransform", "CovariancePCA"):
            patch.setattr(getattr(estimators, name), "__module__", "pipeline.reduce")
        joblib.dump(transform, tmp_path / "old.joblib")
    assert b"pipeline.reduce" in (tmp_path / "old.joblib").read_bytes()
    loaded = joblib.load(tmp_path / "old.joblib")
    assert isinstance(loaded, estimators.TapTransform)
    np.testing.assert_array_equal(loaded.transform(X), transform.transform(X))


def test_ray_map_bounds_the_tasks_in_flight_and_keeps_the_call_order(monkeypatch):
    """Regression: every shard was submitted at once, so 50 second-pass results (128 MB each at 4,096 features) sat in the store."""
    import contextlib
    from types import SimpleNamespace

    from pipeline.engines import ray_reduce

    outstanding, most = set(), [0]

    class Ref:
        def __init__(self, value):
            self.value = value
            outstanding.add(self)
            most[0] = max(most[0], len(outstanding))

    def get(ref):
        outstanding.discard(ref)
        return ref.value

    def remote(function):
        return SimpleNamespace(remote=lambda *args: Ref(function(*args)))

    fake = SimpleNamespace(
        remote=remote,
        get=get,
        wait=lambda refs, timeout: (refs, []),
        cluster_resources=lambda: {"CPU": 2.0},
        exceptions=SimpleNamespace(RayTaskError=RuntimeError),
    )
    monkeypatch.setattr(ray_reduce, "connected", lambda address: contextlib.nullcontext(fake))
    monkeypatch.setattr(ray_reduce, "HeadWatch", lambda ray: SimpleNamespace(check=lambda: None))  # no cluster head to watch
    with ray_reduce.ray_map() as run:
        results = list(run(lambda a, b: a * 10 + b, range(50), itertools.repeat(1)))
    assert results == [a * 10 + 1 for a in range(50)]
    assert most[0] == 2 * 2  # TASKS_PER_CPU x the cluster's CPUs, not 50
