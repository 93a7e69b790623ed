"""Listing images from a folder tree or a CSV into (id, path, label, split) records."""

import csv
import json
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.errors import PipelineError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# First-level folder names that mean "split", not "class"; validation is an alias of val.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
UNLABELED = -1


@dataclass(frozen=True)
class ImageRecord:
    id: str  # path relative to the source root, POSIX separators (or the CSV's id column)
    path: str  # absolute path to read
    label: int  # index into Listing.classes, or -1
    split: str  # "train", "val", "test" or ""
    size: int = 0  # bytes
    mtime_ns: int = 0
    problem: str = ""  # why the file cannot be read, or "" when it can


@dataclass(frozen=True)
class Listing:
    root: str
    records: tuple[ImageRecord, ...]  # sorted by id
    classes: tuple[str, ...]  # index -> class name, sorted

    def fingerprint(self):
        """sha256 of what decides the rows: ids, class names and splits (not where the files are)."""
        h = hashlib.sha256()
        for r in self.records:
            name = self.classes[r.label] if r.label >= 0 else ""
            h.update(json.dumps([r.id, name, r.split, r.size, r.mtime_ns]).encode() + b"\n")
        return h.hexdigest()


def list_source(source):
    """List a folder tree or a .csv file; fail clearly if it is missing or holds no images."""
    source = Path(source)
    if not source.exists():
        raise PipelineError(f"source {source} does not exist; give a folder of images or a CSV file")
    if source.is_dir():
        listing = _list_folder(source)
    elif source.suffix.lower() == ".csv":
        listing = _list_csv(source)
    else:
        raise PipelineError(f"source {source} is neither a folder nor a .csv file")
    if not listing.records:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise PipelineError(f"source {source} holds no images (looked for {exts}, any case)")
    return listing


def is_image_name(name):
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(root):
    """Relative POSIX paths of image files under root, skipping hidden files and folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if is_image_name(name):
                yield PurePosixPath(Path(dirpath, name).relative_to(root).as_posix())


def _list_folder(root):
    top_dirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    split_mode = bool(top_dirs) and all(d.lower() in SPLIT_NAMES for d in top_dirs)
    entries = []  # (id, class name or None, split)
    for rel in _walk_images(root):
        parts = rel.parts
        split = ""
        if split_mode and len(parts) > 1:
            split, parts = SPLIT_NAMES[parts[0].lower()], parts[1:]
        class_name = parts[0] if len(parts) > 1 else None
        entries.append((rel.as_posix(), class_name, split))
    return _build_listing(root, entries, lambda rel: str((root / rel).resolve()))


def _list_csv(csv_path):
    base = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "path" not in columns:
            raise PipelineError(
                f"CSV {csv_path} needs a 'path' column (optional: label, split, id); found {', '.join(columns) or 'none'}"
            )
        rows = list(reader)
    entries, paths = [], {}
    for line, row in enumerate(rows, start=2):
        raw_path = (row.get("path") or "").strip()
        if not raw_path:
            raise PipelineError(f"CSV {csv_path} line {line} has an empty path")
        split_raw = (row.get("split") or "").strip()
        if split_raw and split_raw.lower() not in SPLIT_NAMES:
            raise PipelineError(
                f"CSV {csv_path} line {line} has split {split_raw!r}; use train, val (or validation), test or leave it empty"
            )
        image_id = (row.get("id") or "").strip() or PurePosixPath(Path(raw_path).as_posix()).as_posix()
        label = (row.get("label") or "").strip() or None
        entries.append((image_id, label, SPLIT_NAMES.get(split_raw.lower(), "")))
        paths[image_id] = str((base / raw_path).resolve())
    return _build_listing(csv_path, entries, paths.__getitem__)


def _build_listing(root, entries, path_of):
    ids = [e[0] for e in entries]
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise PipelineError(f"source {root} lists id {dup!r} more than once; ids must be unique")
    classes = tuple(sorted({e[1] for e in entries if e[1] is not None}))
    index = {name: i for i, name in enumerate(classes)}
    records = tuple(
        sorted(
            (
                ImageRecord(image_id, path_of(image_id), index[name] if name is not None else UNLABELED, split, *_stat(path_of(image_id)))
                for image_id, name, split in entries
            ),
            key=lambda r: r.id,
        )
    )
    return Listing(str(root), records, classes)


def _stat(path):
    """(size, mtime_ns, problem) of a file to be read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0, 0, "file not found"
    except OSError as e:
        return 0, 0, e.strerror
    return st.st_size, st.st_mtime_ns, ""
