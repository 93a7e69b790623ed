import errno
import os

import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.sources import MAX_FILE_BYTES, UNLABELED, list_source


def touch_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path, format="PNG")


def by_id(listing):
    return {r.id: r for r in listing.records}


def test_class_folders_label_root_images_unlabeled_and_recursion(tmp_path):
    for rel in ["dog/a.png", "cat/b.PNG", "cat/deep/er/c.jpeg", "loose.JPG"]:
        touch_image(tmp_path / rel)
    listing = list_source(tmp_path)
    assert listing.classes == ("cat", "dog")
    records = by_id(listing)
    assert [r.id for r in listing.records] == sorted(records)
    assert records["dog/a.png"].label == 1
    assert records["cat/deep/er/c.jpeg"].label == 0
    assert records["loose.JPG"].label == UNLABELED
    assert all(r.split == "" for r in listing.records)
    assert records["dog/a.png"].path == str(tmp_path.absolute() / "dog/a.png")


def test_split_folders_are_splits_and_validation_means_val(tmp_path):
    for rel in ["train/cat/a.png", "validation/dog/b.png", "test/cat/c.png", "test/d.png"]:
        touch_image(tmp_path / rel)
    records = by_id(list_source(tmp_path))
    assert records["train/cat/a.png"].split == "train"
    assert records["validation/dog/b.png"].split == "val"
    assert records["validation/dog/b.png"].label == 1
    assert records["test/d.png"].split == "test" and records["test/d.png"].label == UNLABELED


def test_split_names_mixed_with_a_class_folder_are_classes(tmp_path):
    for rel in ["train/a.png", "zebra/b.png"]:
        touch_image(tmp_path / rel)
    listing = list_source(tmp_path)
    assert listing.classes == ("train", "zebra")
    assert all(r.split == "" for r in listing.records)


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    touch_image(tmp_path / "cat/a.webp")
    touch_image(tmp_path / "cat/.hidden.png")
    touch_image(tmp_path / ".cache/cat/x.png")
    (tmp_path / "cat/notes.txt").write_text("hi")
    (tmp_path / "cat/b.TIFF").write_bytes(b"")
    assert [r.id for r in list_source(tmp_path).records] == ["cat/a.webp", "cat/b.TIFF"]


def test_csv_with_all_columns(tmp_path):
    touch_image(tmp_path / "imgs/x.png")
    touch_image(tmp_path / "imgs/y.png")
    (tmp_path / "list.csv").write_text("path,label,split,id\nimgs/x.png,b,validation,first\nimgs/y.png,a,,second\n")
    listing = list_source(tmp_path / "list.csv")
    records = by_id(listing)
    assert listing.classes == ("a", "b")
    assert records["first"].label == 1 and records["first"].split == "val"
    assert records["second"].label == 0 and records["second"].split == ""
    assert records["first"].path == str(tmp_path.absolute() / "imgs/x.png")


def test_csv_with_only_paths_uses_the_path_as_id(tmp_path):
    (tmp_path / "list.csv").write_text("path\nsub/x.png\n")
    (record,) = list_source(tmp_path / "list.csv").records
    assert record.id == "sub/x.png" and record.label == UNLABELED


def test_the_fingerprint_follows_ids_labels_splits_sizes_and_mtimes_not_location(tmp_path):
    touch_image(tmp_path / "one/cat/a.png")
    touch_image(tmp_path / "two/cat/a.png")
    original, copy = tmp_path / "one/cat/a.png", tmp_path / "two/cat/a.png"
    os.utime(copy, ns=(original.stat().st_atime_ns, original.stat().st_mtime_ns))  # a copy that keeps mtimes (cp -p)

    def same():
        return list_source(tmp_path / "one").fingerprint() == list_source(tmp_path / "two").fingerprint()

    assert same()
    mtime = original.stat().st_mtime_ns
    copy.write_bytes(original.read_bytes() + b"\0")  # another size, the same mtime
    os.utime(copy, ns=(mtime, mtime))
    assert not same()
    copy.write_bytes(original.read_bytes())  # the same bytes, another mtime
    os.utime(copy, ns=(mtime, mtime + 1))
    assert not same()
    os.utime(copy, ns=(mtime, mtime))
    assert same()
    touch_image(tmp_path / "two/cat/b.png")
    assert not same()


def test_the_fingerprint_cannot_be_fooled_by_tabs_in_ids_or_labels(tmp_path):
    touch_image(tmp_path / "x.png")
    (tmp_path / "one.csv").write_text('path,id,label\nx.png,"a\tb",c\n')
    (tmp_path / "two.csv").write_text('path,id,label\nx.png,a,"b\tc"\n')
    assert list_source(tmp_path / "one.csv").fingerprint() != list_source(tmp_path / "two.csv").fingerprint()


def test_files_that_cannot_be_read_safely_are_listed_with_the_reason(tmp_path):
    touch_image(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    with open(tmp_path / "huge.tif", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    (tmp_path / "empty.jpg").write_bytes(b"")
    records = by_id(list_source(tmp_path))
    assert {i: r.problem for i, r in records.items()} == {
        "ok.png": "",
        "pipe.jpg": "not a regular file (named pipe)",
        "zero.jpg": "not a regular file (character device)",
        "dangling.png": "dangling symlink",
        "loop.png": "symlink loop",
        "huge.tif": f"file of {MAX_FILE_BYTES + 1:,} bytes exceeds the 1 GiB cap",
        "empty.jpg": "empty file",
    }
    facts = (tmp_path / "ok.png").stat()
    assert (records["ok.png"].size, records["ok.png"].mtime_ns) == (facts.st_size, facts.st_mtime_ns)
    assert records["huge.tif"].size == MAX_FILE_BYTES + 1


def test_a_symlinked_class_folder_is_followed_and_paths_are_the_listed_ones(tmp_path):
    touch_image(tmp_path / "elsewhere/a.png")
    root = tmp_path / "root"
    touch_image(root / "dog/b.png")
    (root / "cat").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "dog/c.png").symlink_to(tmp_path / "elsewhere/a.png")
    listing = list_source(root)
    records = by_id(listing)
    assert listing.classes == ("cat", "dog") and sorted(records) == ["cat/a.png", "dog/b.png", "dog/c.png"]
    assert records["cat/a.png"].label == 0
    assert records["cat/a.png"].path == str(root.absolute() / "cat/a.png")
    assert records["dog/c.png"].path == str(root.absolute() / "dog/c.png")  # the link, not its target
    assert records["dog/c.png"].size == (tmp_path / "elsewhere/a.png").stat().st_size  # the target's stat


def test_a_folder_symlink_loop_ends_with_a_warning(tmp_path):
    touch_image(tmp_path / "cat/a.png")
    (tmp_path / "cat/again").symlink_to(tmp_path / "cat", target_is_directory=True)
    (tmp_path / "cat/up").symlink_to(tmp_path, target_is_directory=True)
    listing = list_source(tmp_path)
    assert [r.id for r in listing.records] == ["cat/a.png"]
    assert any(w.startswith("folder cat/again was already listed") for w in listing.warnings)
    assert any(w.startswith("folder cat/up was already listed") for w in listing.warnings)


def test_a_macosx_folder_and_folders_without_images_do_not_turn_split_mode_off(tmp_path):
    for rel in ["train/cat/a.png", "val/dog/b.png", "__MACOSX/train/cat/a.png", "__MACOSX/train/cat/._a.png"]:
        touch_image(tmp_path / rel)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/readme.txt").write_text("no images here")
    listing = list_source(tmp_path)
    assert listing.classes == ("cat", "dog")
    assert {r.id: r.split for r in listing.records} == {"train/cat/a.png": "train", "val/dog/b.png": "val"}
    assert listing.warnings == ("folder __MACOSX (macOS archive metadata) ignored", "folder notes holds no images; ignored")


def test_odd_names_are_listed_with_valid_utf8_ids(tmp_path):
    names = ["with space.png", "café.png", "日本.png", "new\nline.png", "tab\t.png", "emoji😀.png"]
    for name in names:
        touch_image(tmp_path / name)
    raw = os.fsencode(tmp_path)
    touch_image(tmp_path / os.fsdecode(b"caf\xe9.png"))  # Latin-1, not UTF-8
    touch_image(tmp_path / os.fsdecode(b"cl\xffss") / "x.png")
    touch_image(tmp_path / "photo.jpg" / "inner.png")  # a folder named like an image is a folder
    listing = list_source(tmp_path)
    records = by_id(listing)
    assert sorted(records) == sorted([*names, "caf\\xe9.png", "cl\\xffss/x.png", "photo.jpg/inner.png"])
    assert listing.classes == ("cl\\xffss", "photo.jpg")
    for record in records.values():
        record.id.encode("utf-8")  # no surrogates: valid UTF-8 for HDF5
        assert record.problem == "" and os.path.isfile(record.path)
    assert os.fsencode(records["caf\\xe9.png"].path) == raw + b"/caf\xe9.png"


def test_a_name_that_spells_an_escape_of_another_is_refused_naming_the_id(tmp_path):
    touch_image(tmp_path / os.fsdecode(b"caf\xe9.png"))
    touch_image(tmp_path / "caf\\xe9.png")  # a literal backslash, x, e, 9
    with pytest.raises(PipelineError, match=r"lists id 'caf\\\\xe9.png' more than once"):
        list_source(tmp_path)


def test_a_folder_that_cannot_be_read_is_a_warning(tmp_path, monkeypatch):
    touch_image(tmp_path / "cat/a.png")
    touch_image(tmp_path / "dog/b.png")
    scandir = os.scandir

    def denied_for_dog(path):  # chmod 0 would not stop root, who runs these tests in CI
        if os.path.basename(path) == "dog":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied_for_dog)
    listing = list_source(tmp_path)
    assert [r.id for r in listing.records] == ["cat/a.png"]
    assert listing.warnings == ("folder dog cannot be read (permission denied); skipped",)


def test_csv_paths_are_made_absolute_not_resolved_and_missing_files_are_problems(tmp_path):
    touch_image(tmp_path / "real/x.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "real/x.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "list.csv").write_text("path\nlink.png\nmissing.png\npipe.png\n")
    records = by_id(list_source(tmp_path / "list.csv"))
    assert records["link.png"].path == str(tmp_path.absolute() / "link.png") and records["link.png"].problem == ""
    assert records["missing.png"].problem == "file not found"
    assert records["pipe.png"].problem == "not a regular file (named pipe)"


def write(name, text):
    def setup(root):
        (root / name).write_text(text)
        return root / name

    return setup


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p, "holds no images"),
        (lambda p: p / "missing", "does not exist"),
        (write("x.txt", ""), "neither a folder nor a .csv"),
        (write("l.csv", "file,label\na.png,x\n"), "needs a 'path' column"),
        (write("l.csv", "path,split\na.png,dev\n"), "split 'dev'"),
        (write("l.csv", "path,id\na.png,k\nb.png,k\n"), "id 'k' more than once"),
        (write("l.csv", "path\n"), "holds no images"),
        (
            lambda p: (p / "l.csv").write_bytes(b"path,label\nx.png,caf\xe9\n") and p / "l.csv",
            "not UTF-8 text: byte 0xe9 on line 2",
        ),
        (lambda p: (p / "l.csv").write_bytes(b"path\nx\x00.png\n") and p / "l.csv", "line 2 .*NUL"),
        (lambda p: os.mkfifo(p / "l.csv") or p / "l.csv", "is not a regular file"),
    ],
)
def test_bad_sources_fail_with_a_clear_message(tmp_path, setup, message):
    with pytest.raises(PipelineError, match=message):
        list_source(setup(tmp_path))


def denied(function, path):
    """`function` failing with EACCES for `path` (chmod 0 would not stop root, who runs these tests in CI)."""

    def guarded(target, *args, **kwargs):
        if os.path.abspath(os.fspath(target)) == os.path.abspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(target))
        return function(target, *args, **kwargs)

    return guarded


def test_a_csv_that_cannot_be_read_is_one_sentence(tmp_path, monkeypatch):
    import pathlib

    (tmp_path / "l.csv").write_text("path\na.png\n")
    read_bytes = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: denied(read_bytes, tmp_path / "l.csv")(self))
    with pytest.raises(
        PipelineError, match=r"^CSV .*l\.csv cannot be read \(permission denied\); make it readable or give another source$"
    ):
        list_source(tmp_path / "l.csv")


def test_a_source_folder_that_cannot_be_read_is_an_error_not_an_empty_listing(tmp_path, monkeypatch):
    touch_image(tmp_path / "images/cat/a.png")
    monkeypatch.setattr(os, "scandir", denied(os.scandir, tmp_path / "images"))
    with pytest.raises(PipelineError, match=r"^source folder .*images cannot be read \(permission denied\); make it readable"):
        list_source(tmp_path / "images")


def test_a_source_that_cannot_even_be_stat_ed_is_one_sentence(tmp_path, monkeypatch):
    (tmp_path / "l.csv").write_text("path\na.png\n")
    monkeypatch.setattr(os, "stat", denied(os.stat, tmp_path / "l.csv"))
    with pytest.raises(PipelineError, match=r"^source .*l\.csv cannot be read \(permission denied\); make it readable"):
        list_source(tmp_path / "l.csv")


def test_an_unreadable_csv_through_the_cli_is_one_line(tmp_path, monkeypatch, run_cli):
    import pathlib

    (tmp_path / "l.csv").write_text("path\na.png\n")
    read_bytes = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: denied(read_bytes, tmp_path / "l.csv")(self))
    result = run_cli("extract", tmp_path / "l.csv", "--out", tmp_path / "f", "--weights", "random", code=1)
    assert (
        result.output.strip().splitlines()[-1].startswith(f"Error: CSV {tmp_path / 'l.csv'} cannot be read (permission denied)")
    )
