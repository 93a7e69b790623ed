import os

import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.sources import UNLABELED, list_source


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
    assert records["dog/a.png"].path == str((tmp_path / "dog/a.png").resolve())


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
    assert records["first"].path == str((tmp_path / "imgs/x.png").resolve())


def test_csv_with_only_paths_uses_the_path_as_id(tmp_path):
    (tmp_path / "list.csv").write_text("path\nsub/x.png\n")
    (record,) = list_source(tmp_path / "list.csv").records
    assert record.id == "sub/x.png" and record.label == UNLABELED


def test_the_fingerprint_follows_ids_labels_splits_sizes_and_mtimes_not_location(tmp_path):
    for tree in ("one", "two"):
        touch_image(tmp_path / tree / "cat/a.png")
        os.utime(tmp_path / tree / "cat/a.png", ns=(10**18, 10**18))
    assert list_source(tmp_path / "one").fingerprint() == list_source(tmp_path / "two").fingerprint()
    os.utime(tmp_path / "two/cat/a.png", ns=(10**18, 10**18 + 1))
    assert list_source(tmp_path / "one").fingerprint() != list_source(tmp_path / "two").fingerprint()
    os.utime(tmp_path / "two/cat/a.png", ns=(10**18, 10**18))
    touch_image(tmp_path / "two/cat/b.png")
    assert list_source(tmp_path / "one").fingerprint() != list_source(tmp_path / "two").fingerprint()


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
    ],
)
def test_bad_sources_fail_with_a_clear_message(tmp_path, setup, message):
    with pytest.raises(PipelineError, match=message):
        list_source(setup(tmp_path))
