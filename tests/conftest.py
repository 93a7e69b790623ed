"""Shared fixtures: tiny image folders, synthetic features directories, the CLI, a local Ray, failing disks.

Plain functions and flags the tests share are in helpers.py.
"""

import builtins
import contextlib
import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every Ray the tests start (ray.init, cluster_utils.Cluster) on 127.0.0.1 only: Ray's single-machine
# mode, read when `ray` is first imported (pipeline.engines.ray_cluster does the same for the Ray it starts).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import h5py
import numpy as np
import pytest
from PIL import Image

import helpers
from pipeline import devices, shards

devices.request_memory_growth()  # pytest-xdist workers share a GPU; their children (pipeline, Ray) inherit this


@pytest.fixture(scope="session", autouse=True)
def device_options():
    """Each test process sets the device options before its first TensorFlow op, as every command does."""
    problems = devices.configure()
    assert not problems, problems


@pytest.fixture
def image_tree(tmp_path):
    """Factory: write `per_class` random RGB PNGs for each class name under a fresh folder."""

    def make(classes=("cat", "dog"), per_class=3, size=32, seed=0, name="images"):
        return helpers.write_image_tree(tmp_path / name, classes, per_class, size, seed)

    return make


@pytest.fixture
def features_dir(tmp_path):
    """Factory: a synthetic features/ dir in the real format, without running any CNN.

    Features are class-dependent Gaussians so that heads can learn something. `signal` scales a
    tap's class centers (default 1; 0 makes the tap pure noise), `scales` the whole tap.
    """

    def make(
        n=120,
        taps=None,
        classes=("a", "b", "c"),
        splits=None,
        shard_size=50,
        storage_dtype="float32",
        seed=0,
        name="features",
        scales=None,
        signal=None,
    ):
        taps = taps or {"resnet50/conv5_block3_out": 24, "vgg16/block5_conv3": 16}
        rng = np.random.default_rng(seed)
        out = tmp_path / name
        out.mkdir()
        ids = [f"img{i:05d}.png" for i in range(n)]
        labels = (np.arange(n) % len(classes)).astype(np.int32)
        split_of = splits or (lambda i: "")
        centers = {t: rng.normal(size=(len(classes), d)) * (signal or {}).get(t, 1.0) for t, d in taps.items()}
        config = {"taps": list(taps), "pooling": "avg", "synthetic_seed": seed}
        sha = f"synthetic-{seed}"
        entries = []
        for index, start in enumerate(range(0, n, shard_size)):
            rows = slice(start, min(start + shard_size, n))
            feats = {}
            for t, d in taps.items():
                scale = (scales or {}).get(t, 1.0)
                feats[t] = (centers[t][labels[rows]] + 0.5 * rng.normal(size=(rows.stop - rows.start, d))) * scale
            data = shards.ShardData(ids[rows], labels[rows], [split_of(i) for i in range(rows.start, rows.stop)], feats)
            name_ = shards.shard_filename(index)
            shards.write_shard(out / name_, data, index=index, config_sha256=sha, config=config, storage_dtype=storage_dtype)
            entries.append({"file": name_, "rows": data.rows})
        manifest = shards.make_manifest(
            config=config,
            config_sha256=sha,
            weights={t.split("/")[0]: {"source": "synthetic", "sha256": "0" * 64} for t in taps},
            taps=[
                {"key": t, "backbone": t.split("/")[0], "layer": t.split("/")[1], "dim": d, "pooling": "avg"}
                for t, d in taps.items()
            ],
            classes=classes,
            shards=entries,
            listed=n,
            errors=[],
            precision={"policy": "float32", "min_cosine_vs_float32": 1.0},
            timing={"seconds": 0.0, "images_per_second": 0.0},
        )
        shards.write_manifest(out, manifest)
        return out

    return make


@pytest.fixture
def updated_features(features_dir):
    """Factory: a synthetic features dir as an update leaves it (see CONTRACT in the README's formats), without extract.

    Generation 0 is `features_dir(n, shard_size)` (classes a, b, c, no split). Generation 1 then
    adds class "aa" (shifting every index: each shard records its own `classes`), appends one shard
    with new ids between the old ones, retires `removed` old rows and relabels `relabelled` ones
    (their feature bytes copied into the new shard with label "c" and split "test", the old row
    retired). `before(dir)` is called before the update. Returns the dir; `live_rows(dir)` reads what it should show.
    """
    import json

    def make(
        n=60,
        shard_size=25,
        removed=(3, 4, 30),
        relabelled=(7, 41),
        added=(10, 20, 50),
        storage_dtype="float32",
        name="features",
        before=None,
    ):
        out = features_dir(n=n, shard_size=shard_size, storage_dtype=storage_dtype, name=name)
        if before is not None:
            before(out)  # say, reduce generation 0
        manifest = json.loads((out / "manifest.json").read_text())
        old_classes = manifest["classes"]
        for entry in manifest["shards"]:
            with h5py.File(out / entry["file"], "r+") as f:
                f.attrs["classes"] = json.dumps(old_classes)
        new_classes = sorted({*old_classes, "aa"})
        taps = [tap["key"] for tap in manifest["taps"]]
        by_id = {}
        for index, entry in enumerate(manifest["shards"]):
            data = shards.read_shard(out / entry["file"])
            for row, row_id in enumerate(data.ids):
                by_id[row_id] = (index, row, {t: data.features[t][row] for t in taps})
        rng = np.random.default_rng(7)
        rows = []  # (id, class name, split, {tap: values})
        for i in added:
            rows.append((f"img{i:05d}+new.png", "aa", "", {t: rng.normal(size=by_id["img00000.png"][2][t].shape) for t in taps}))
        for i in relabelled:
            rows.append((f"img{i:05d}.png", "c", "test", by_id[f"img{i:05d}.png"][2]))
        rows.sort()
        data = shards.ShardData(
            [r[0] for r in rows],
            np.array([new_classes.index(r[1]) for r in rows], np.int32),
            [r[2] for r in rows],
            {t: np.stack([r[3][t] for r in rows]) for t in taps},
        )
        name_ = shards.shard_filename(len(manifest["shards"]))
        shards.write_shard(
            out / name_,
            data,
            index=len(manifest["shards"]),
            config_sha256=manifest["config_sha256"],
            config=manifest["config"],
            storage_dtype=storage_dtype,
        )
        with h5py.File(out / name_, "r+") as f:
            f.attrs["classes"] = json.dumps(new_classes)
            f.attrs["generation"] = 1
        for entry in manifest["shards"]:
            entry.update(generation=0, retired=[])
        for i in (*removed, *relabelled):
            index, row, _ = by_id[f"img{i:05d}.png"]
            manifest["shards"][index]["retired"].append(row)
        for entry in manifest["shards"]:
            entry["retired"].sort()
            entry["live"] = entry["rows"] - len(entry["retired"])
        manifest["shards"].append({"file": name_, "rows": len(rows), "live": len(rows), "generation": 1, "retired": []})
        manifest.update(
            classes=new_classes,
            rows=sum(e["live"] for e in manifest["shards"]),
            generation=1,
            listed=manifest["listed"] - len(removed) + len(added),
        )
        (out / "manifest.json").write_text(json.dumps(manifest))
        return out

    return make


@pytest.fixture
def live_rows():
    """The function below: what a reader must show of a features dir."""
    return _live_rows


def _live_rows(features):
    """{id: (class name, split, {tap: row})} of the live rows of a features dir, read from the shards by hand (no reader)."""
    import json

    manifest = json.loads((features / "manifest.json").read_text())
    live = {}
    for entry in manifest["shards"]:
        with h5py.File(features / entry["file"], "r") as f:
            classes = json.loads(f.attrs["classes"]) if "classes" in f.attrs else manifest["classes"]
            retired = set(entry.get("retired", []))
            taps = shards.list_taps(f)
            for row, row_id in enumerate(f["ids"].asstr()[:]):
                if row not in retired:
                    label = int(f["labels"][row])
                    name = classes[label] if label >= 0 else None
                    live[row_id] = (name, f["splits"].asstr()[row], {t: f["features"][t][row] for t in taps})
    return live


@pytest.fixture
def run_cli():
    """Invoke the `pipeline` CLI in-process; assert the exit code; return the click Result."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    def run(*args, code=0):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == code, f"exit {result.exit_code}: {result.output}"
        return result

    return run


@pytest.fixture
def local_ray():
    """A local Ray with 2 CPUs for one test (helpers.local_ray), which the commands use as they find it."""
    pytest.importorskip("ray")
    with helpers.local_ray():
        yield


@pytest.fixture(scope="session")
def head_run(tmp_path_factory):
    """A real lineage built once: 32-px tinted images -> features -> reduced (whitened PCA) -> one head run.

    resnet50 has `random` weights and vgg16 a weights file, so both kinds of recorded source
    occur. Tests that change files must copy `root` first (see test_predict.copy_lineage).
    """
    from types import SimpleNamespace

    from pipeline import backbones
    from pipeline.config import ExtractConfig, HeadConfig, ReduceConfig, WeightSource
    from pipeline.extract import extract
    from pipeline.reduce import reduce_features
    from pipeline.sources import list_source
    from pipeline.train import train

    root = tmp_path_factory.mktemp("lineage")
    rng = np.random.default_rng(0)
    for index, name in enumerate(("a", "b", "c")):
        (root / "images" / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 120, (32, 32, 3))
            pixels[..., index] += 120  # a class-coloured tint the head can learn
            Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / name / f"{i}.png")
    vgg16 = backbones.build_backbone("vgg16", 32)
    backbones.load_weights(vgg16, "vgg16", WeightSource("random", seed=5))
    vgg16.save_weights(root / "vgg16.weights.h5")
    config = ExtractConfig(
        taps=("resnet50/conv2_block1_out", "vgg16/block1_pool"),
        image_size=32,
        precision="float32",
        batch_size=8,
        weights=f"resnet50=random,vgg16={root / 'vgg16.weights.h5'}",
    )
    extract(config, list_source(root / "images"), root / "features")
    reduce_features(root / "features", root / "reduced", ReduceConfig(components=6, whiten=True, val_fraction=0.25))
    outcomes = list(train(root / "reduced", root / "runs", [HeadConfig(hidden=(8,), epochs=3, batch_size=8)]))
    baseline, head = outcomes
    return SimpleNamespace(root=root, config=config, run=root / "runs" / head.run_id, baseline=root / "runs" / baseline.run_id)


@pytest.fixture(scope="session")
def bomb_bytes():
    """{format: bytes} of tiny files whose headers claim 100,000 x 100,000 pixels (65,535 where the field is 16-bit)."""
    import io
    import struct
    import zlib

    def small(fmt, **options):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(buffer, format=fmt, **options)
        return bytearray(buffer.getvalue())

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    big, big16 = 100_000, 65_535
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", big, big, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * 3000)) + chunk(b"IEND", b"")
    jpeg = small("JPEG")
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", big16, big16)
    gif = small("GIF")
    gif[6:10] = struct.pack("<HH", big16, big16)
    descriptor = gif.index(b"\x2c", 13)
    gif[descriptor + 5 : descriptor + 9] = struct.pack("<HH", big16, big16)
    bmp = small("BMP")
    bmp[18:26] = struct.pack("<ii", big, big)
    tiff = small("TIFF")
    (ifd,) = struct.unpack("<I", tiff[4:8])
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", tiff[ifd : ifd + 2])[0], 12):
        if struct.unpack("<H", tiff[entry : entry + 2])[0] in (256, 257):  # ImageWidth, ImageLength as LONG
            tiff[entry + 2 : entry + 12] = struct.pack("<HII", 4, 1, big)
    vp8 = bytes(small("WEBP")[12:])
    extended = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (big - 1).to_bytes(3, "little") + (big - 1).to_bytes(3, "little")
    webp = b"RIFF" + struct.pack("<I", 4 + len(extended) + len(vp8)) + b"WEBP" + extended + vp8
    return {"png": png, "jpeg": bytes(jpeg), "gif": bytes(gif), "bmp": bytes(bmp), "tiff": bytes(tiff), "webp": webp}


@pytest.fixture
def failing_writes(monkeypatch):
    """Factory: a context in which every write, mkdir and rename under a directory fails with an OSError errno.

    What a read-only (EROFS, EACCES) or full (ENOSPC) disk does, for tests that run as root, whom
    chmod does not stop. HDF5 and TensorFlow write through their own C calls, but every command
    creates a lock file or a directory with Python's first.
    """

    @contextlib.contextmanager
    def failing(directory, code):
        directory = str(directory)

        def guard(function, writes=lambda *args, **kwargs: True):
            def guarded(path, *args, **kwargs):
                if (
                    not isinstance(path, int)
                    and os.path.abspath(os.fspath(path)).startswith(directory)
                    and writes(*args, **kwargs)
                ):
                    raise OSError(code, os.strerror(code), os.fspath(path))
                return function(path, *args, **kwargs)

            return guarded

        def writing(mode="r", *args, **kwargs):
            return any(flag in mode for flag in "wax+")

        with monkeypatch.context() as patch:
            for module in (builtins, io):
                patch.setattr(module, "open", guard(builtins.open, writing))
            for name in ("mkdir", "rename", "replace"):
                patch.setattr(os, name, guard(getattr(os, name)))
            yield

    return failing


@pytest.fixture
def reduced(features_dir, tmp_path):
    """A features dir reduced to 4 components: (features, reduced)."""
    from pipeline.config import ReduceConfig
    from pipeline.reduce import reduce_features

    features = features_dir(n=90, shard_size=30)
    reduce_features(features, tmp_path / "reduced", ReduceConfig(components=4))
    return features, tmp_path / "reduced"
