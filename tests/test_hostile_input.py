"""Hostile input through `pipeline extract`: special files, bombs, odd names and fuzzed images end
as rows or error entries, with ids aligned, and never hang or crash the run."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import FAST, encoded, read_rows
from pipeline import shards
from pipeline.cli import cli
from pipeline.sources import MAX_FILE_BYTES, list_source

SMALL = [*FAST, "--precision", "float32"]
FORMATS = {
    "jpg": ("JPEG", {"quality": 95}),
    "png": ("PNG", {}),
    "gif": ("GIF", {}),
    "tif": ("TIFF", {}),
    "webp": ("WEBP", {"lossless": True}),
    "bmp": ("BMP", {}),
}


def picture(seed, size=24):
    """A blocky random RGB picture: distinct per seed, and few colours, so GIF keeps it exactly."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(np.kron(rng.integers(0, 4, (size // 6, size // 6, 3)) * 85, np.ones((6, 6, 1))).astype(np.uint8))


def mutants(data, count, rng):
    """`count` corruptions of `data`: flipped bits, a cut, or a splice with itself reversed."""
    out = []
    for k in range(count):
        copy = bytearray(data)
        if k % 3 == 0:
            for position in rng.integers(0, len(copy) * 8, size=int(rng.integers(1, 9))):
                copy[position // 8] ^= 1 << int(position % 8)
        elif k % 3 == 1:
            copy = copy[: int(rng.integers(0, len(copy)))]
        else:
            copy = copy[: int(rng.integers(0, len(copy)))] + bytes(reversed(data))[: int(rng.integers(0, len(data)))]
        out.append(bytes(copy))
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, bomb_bytes):
    """A tree of everything hostile, extracted once in a subprocess that must finish; returns a namespace."""
    from types import SimpleNamespace

    base = tmp_path_factory.mktemp("hostile")
    root = base / "images"
    rng = np.random.default_rng(7)
    for k, (ext, (fmt, options)) in enumerate(FORMATS.items()):
        data = encoded(picture(k), fmt, **options)
        (root / "fuzz").mkdir(parents=True, exist_ok=True)
        (root / f"fuzz/orig-{ext}.{ext}").write_bytes(data)
        (root / f"fuzz/copy-{ext}.{ext}").write_bytes(data)
        for j, mutant in enumerate(mutants(data, 6, rng)):
            (root / f"fuzz/mutant-{ext}-{j}.{ext}").write_bytes(mutant)
    special = root / "special"
    special.mkdir()
    os.mkfifo(special / "pipe.jpg")
    (special / "zero.jpg").symlink_to("/dev/zero")
    (special / "dangling.png").symlink_to(special / "missing.png")
    (special / "loop.png").symlink_to(special / "loop.png")
    with open(special / "huge.tif", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    (special / "empty.jpg").write_bytes(b"")
    (root / "bombs").mkdir()
    for fmt, data in bomb_bytes.items():
        (root / f"bombs/bomb.{fmt}").write_bytes(data)
    frames = root / "frames"
    frames.mkdir()
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    red.save(frames / "red.png")
    others = [Image.new("RGB", (16, 16), tuple(int(c) for c in rng.integers(0, 256, 3))) for _ in range(3000)]
    red.save(frames / "many.gif", save_all=True, append_images=others, duration=10)
    names = root / "names"
    for name in ["with space.png", "café.png", "new\nline.png", "plain.png", "photo.jpg/inner.png"]:
        (names / name).parent.mkdir(parents=True, exist_ok=True)
        picture(100).save(names / name, format="PNG")
    picture(100).save(os.path.join(os.fsencode(names), b"caf\xe9.png"), format="PNG")  # not UTF-8
    (names / "link.png").symlink_to(root / "fuzz/orig-png.png")
    (names / "loop").symlink_to(root, target_is_directory=True)
    (base / "outside").mkdir()
    (base / "outside/kept.png").write_bytes((root / "fuzz/orig-png.png").read_bytes())
    (root / "linked").symlink_to(base / "outside", target_is_directory=True)
    for name in ["__MACOSX/fuzz/x.png", "__MACOSX/fuzz/._x.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        picture(0).save(root / name, format="PNG")
    (root / "notes").mkdir()
    (root / "notes/readme.txt").write_text("nothing to see")

    out = base / "features"
    argv = [
        sys.executable,
        "-m",
        "pipeline",
        "extract",
        str(root),
        "--out",
        str(out),
        *SMALL,
        "--shard-size",
        "16",
        "--batch-size",
        "8",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)  # a hang fails here
    assert done.returncode == 0, done.stderr[-3000:]
    rows, manifest = read_rows(out)
    rows = {image_id: np.concatenate([row[key] for key in sorted(row)]) for image_id, row in rows.items()}  # all taps in one
    return SimpleNamespace(
        root=root,
        out=out,
        rows=rows,
        manifest=manifest,
        stderr=done.stderr,
        errors={e["id"]: e["reason"] for e in manifest["errors"]},
    )


def test_every_listed_file_is_a_row_or_an_error_and_inspect_verify_passes(hostile, run_cli):
    listed = [r.id for r in list_source(hostile.root).records]
    assert not set(hostile.rows) & set(hostile.errors)
    assert sorted([*hostile.rows, *hostile.errors]) == sorted(listed) and hostile.manifest["listed"] == len(listed)
    assert all(np.isfinite(row).all() for row in hostile.rows.values())
    mutant_rows = sum(i.startswith("fuzz/mutant-") for i in hostile.rows)
    assert 0 < mutant_rows < 6 * len(FORMATS)  # some corrupted files still decode, most do not
    run_cli("inspect", hostile.out, "--verify")


def test_copies_and_links_give_the_row_of_their_original(hostile):
    rows = hostile.rows
    originals = {ext: rows[f"fuzz/orig-{ext}.{ext}"] for ext in FORMATS}
    for ext, row in originals.items():
        np.testing.assert_allclose(rows[f"fuzz/copy-{ext}.{ext}"], row, rtol=1e-5, atol=1e-6)
        assert not any(np.allclose(row, other, rtol=1e-3) for e, other in originals.items() if e != ext)
    for twin in ("names/link.png", "linked/kept.png"):
        np.testing.assert_allclose(rows[twin], originals["png"], rtol=1e-5, atol=1e-6)


def test_special_files_and_bombs_are_errors_with_their_reason(hostile):
    expected = {
        "special/pipe.jpg": "not a regular file (named pipe)",
        "special/zero.jpg": "not a regular file (character device)",
        "special/dangling.png": "dangling symlink",
        "special/loop.png": "symlink loop",
        "special/huge.tif": "exceeds the 1 GiB cap",
        "special/empty.jpg": "empty file",
    }
    for image_id, reason in expected.items():
        assert reason in hostile.errors[image_id]
    bombs = {i: reason for i, reason in hostile.errors.items() if i.startswith("bombs/")}
    assert len(bombs) == 6 and all("179-megapixel cap" in reason for reason in bombs.values())


def test_a_gif_of_thousands_of_frames_is_its_first_frame(hostile):
    np.testing.assert_allclose(hostile.rows["frames/many.gif"], hostile.rows["frames/red.png"], rtol=1e-5, atol=1e-6)


def test_odd_names_are_valid_utf8_ids_in_hdf5(hostile):
    for entry in hostile.manifest["shards"]:
        with h5py.File(hostile.out / entry["file"], "r") as f:
            for raw in f["ids"][:]:
                raw.decode("utf-8")  # strict: HDF5 holds valid UTF-8 only
    rows = hostile.rows
    for image_id in [
        "names/with space.png",
        "names/café.png",
        "names/new\nline.png",
        "names/caf\\xe9.png",
        "names/photo.jpg/inner.png",
    ]:
        np.testing.assert_allclose(rows[image_id], rows["names/plain.png"], rtol=1e-5, atol=1e-6)


def test_what_the_listing_ignored_is_printed_as_warnings(hostile):
    assert "warning: folder __MACOSX (macOS archive metadata) ignored" in hostile.stderr
    assert "warning: folder notes holds no images; ignored" in hostile.stderr
    assert "warning: folder names/loop was already listed through another path" in hostile.stderr
    assert "Traceback" not in hostile.stderr


def test_on_error_fail_names_the_listed_symlink_not_its_target(tmp_path, run_cli):
    picture(1).save(tmp_path / "ok.png")
    (tmp_path / "images/cat").mkdir(parents=True)
    (tmp_path / "images/cat/good.png").write_bytes((tmp_path / "ok.png").read_bytes())
    (tmp_path / "broken-target.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "images/cat/listed-name.png").symlink_to(tmp_path / "broken-target.png")
    result = run_cli("extract", tmp_path / "images", "--out", tmp_path / "f", *SMALL, "--on-error", "fail", code=1)
    assert f"cannot decode {tmp_path / 'images/cat/listed-name.png'}:" in result.output
    assert "broken-target" not in result.output


def test_on_error_fail_stops_at_a_file_the_listing_refused(tmp_path, run_cli):
    picture(1).save(tmp_path / "good.png")
    with open(tmp_path / "huge.tif", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    result = run_cli("extract", tmp_path, "--out", tmp_path / "f", *SMALL, "--on-error", "fail", code=1)
    assert f"huge.tif: file of {MAX_FILE_BYTES + 1:,} bytes exceeds the 1 GiB cap (--on-error fail stops here)" in result.output


def test_a_latin1_csv_is_one_clear_sentence(tmp_path):
    picture(1).save(tmp_path / "café.png")
    (tmp_path / "list.csv").write_bytes("path,label\ncafé.png,x\n".encode("latin-1"))
    result = CliRunner().invoke(cli, ["extract", str(tmp_path / "list.csv"), "--out", str(tmp_path / "f"), *SMALL])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: CSV {tmp_path / 'list.csv'} is not UTF-8 text: byte 0xe9 on line 2 is not valid UTF-8; save it as UTF-8"
    )


def test_a_changed_image_is_not_up_to_date(tmp_path, run_cli):
    for seed in range(3):
        picture(seed).save(tmp_path / f"{seed}.png")
    args = ["extract", tmp_path, "--out", tmp_path / "f", *SMALL]
    run_cli(*args)
    assert "up to date" in run_cli(*args).output
    picture(9).save(tmp_path / "1.png")  # same name, same size class, other pixels and mtime
    again = CliRunner().invoke(cli, [str(a) for a in args])
    assert "up to date" not in again.output


def test_predict_prints_the_listing_warnings(head_run, tmp_path, run_cli):
    source = tmp_path / "new"
    (source / "__MACOSX").mkdir(parents=True)
    picture(1).save(source / "__MACOSX/x.png")
    picture(2).save(source / "y.png")
    result = run_cli("predict", head_run.run, source, "--out", tmp_path / "p.csv")
    assert "warning: folder __MACOSX (macOS archive metadata) ignored" in result.output
    assert "predicted 1 images, 0 errors" in result.output


def test_a_source_only_the_fallback_can_decode(tmp_path, run_cli):
    for seed in range(2):
        picture(seed).save(tmp_path / f"{seed}.tif")
    run_cli("extract", tmp_path, "--out", tmp_path / "f", *SMALL)
    manifest = shards.read_manifest(tmp_path / "f")
    assert (manifest["rows"], manifest["errors"], manifest["precision"]["rows_checked"]) == (2, [], 2)


def test_predict_lists_a_file_whose_name_is_not_utf8(head_run, tmp_path, run_cli):
    picture(1).save(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"), format="PNG")
    run_cli("predict", head_run.run, tmp_path, "--out", tmp_path.parent / "p.csv")
    row = (tmp_path.parent / "p.csv").read_bytes().splitlines()[1]
    assert row.startswith(b"caf\\xe9.png,")  # the id: valid UTF-8, the raw byte escaped
    assert os.path.join(os.fsencode(tmp_path), b"caf\xe9.png") in row  # the path: the file's own bytes
