"""Listing images from a folder tree or a CSV into (id, path, label, split) records.

Each listed file is stat'ed once, following symlinks. A file that cannot be read safely (not a
regular file, over the size cap, a dangling symlink or a symlink loop) is still listed, with
the reason in `problem`, so it ends as an error entry instead of silently vanishing.
"""

import csv
import errno
import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.errors import PipelineError

MAX_FILE_BYTES = 1 << 30  # 1 GiB: an uncompressed 16-bit RGB TIFF from the largest camera sensor (151 MP) is 0.9 GB
_FILE_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "named pipe",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# First-level folder names that mean "split", not "class"; validation is an alias of val.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
UNLABELED = -1
# Folders that zip archives made on macOS carry: resource forks, never images.
IGNORED_FOLDERS = frozenset({"__MACOSX"})


def file_problem(info):
    """Why a file with this `os.stat` result is not read, or "" when it is."""
    if not stat.S_ISREG(info.st_mode):
        return f"not a regular file ({_FILE_KINDS.get(stat.S_IFMT(info.st_mode), 'special file')})"
    if info.st_size > MAX_FILE_BYTES:
        return f"file of {info.st_size:,} bytes exceeds the {MAX_FILE_BYTES / 2**30:g} GiB cap"
    if info.st_size == 0:
        return "empty file"
    return ""


@dataclass(frozen=True)
class ImageRecord:
    id: str  # path relative to the source root, POSIX separators (or the CSV's id column); valid UTF-8
    path: str  # absolute path to read: the listed path, symlinks not resolved
    label: int  # index into Listing.classes, or -1
    split: str  # "train", "val", "test" or ""
    size: int = 0  # bytes, from the stat (0 when it failed)
    mtime_ns: int = 0  # modification time, from the stat (0 when it failed)
    problem: str = ""  # why the file is not read ("" when it is), e.g. "not a regular file (named pipe)"


@dataclass(frozen=True)
class Listing:
    root: str
    records: tuple[ImageRecord, ...]  # sorted by id
    classes: tuple[str, ...]  # index -> class name, sorted
    warnings: tuple[str, ...] = ()  # for the user: what was ignored and why

    def fingerprint(self):
        """sha256 of what decides the rows: ids, class names, splits, file sizes and mtimes (not where the files are)."""
        h = hashlib.sha256()
        for r in self.records:
            name = self.classes[r.label] if r.label >= 0 else ""
            h.update(json.dumps([r.id, name, r.split, r.size, r.mtime_ns]).encode() + b"\n")
        return h.hexdigest()


_READABLE = "make it readable or give another source"


def list_source(source):
    """List a folder tree or a .csv file; fail clearly if it is missing or holds no images."""
    source = Path(source)
    try:
        info = os.stat(source)
    except (FileNotFoundError, NotADirectoryError):
        raise PipelineError(f"source {source} does not exist; give a folder of images or a CSV file") from None
    except OSError as e:  # a parent folder without search permission, a symlink loop
        raise PipelineError(f"source {source} cannot be read ({_stat_failure(e, source)}); {_READABLE}") from None
    if stat.S_ISDIR(info.st_mode):
        listing = _list_folder(source, info)
    elif source.suffix.lower() != ".csv":
        raise PipelineError(f"source {source} is neither a folder nor a .csv file")
    elif not stat.S_ISREG(info.st_mode):
        raise PipelineError(f"source {source} is not a regular file; give a folder of images or a CSV file")
    else:
        listing = _list_csv(source)
    if not listing.records:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise PipelineError(f"source {source} holds no images (looked for {exts}, any case)")
    return listing


def is_image_name(name):
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _text_of_name(name):
    """A file name as valid UTF-8 text: bytes that are not UTF-8 become backslash escapes (\\xe9)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _list_folder(root, info):
    files, top_folders, warnings = _walk(root, info)
    with_images = {parts[0] for parts, _, _ in files if len(parts) > 1}
    for name in sorted(top_folders - with_images):
        warnings.append(f"folder {name} holds no images; ignored")
    split_mode = bool(with_images) and all(d.lower() in SPLIT_NAMES for d in with_images)
    entries, found = [], {}  # (id, class name or None, split); id -> (path, size, mtime_ns, problem)
    for parts, path, facts in files:
        image_id = "/".join(parts)
        split = ""
        if split_mode and len(parts) > 1:
            split, parts = SPLIT_NAMES[parts[0].lower()], parts[1:]
        class_name = parts[0] if len(parts) > 1 else None
        entries.append((image_id, class_name, split))
        found[image_id] = (path, *facts)
    return _build_listing(root, entries, found, warnings)


def _walk(root, root_info):
    """Image-named files under root: [(id parts as text, path, (size, mtime_ns, problem))], top folders read, warnings.

    Hidden entries are skipped. Folder symlinks are followed, but each real folder is walked
    once, so a symlink loop ends. A folder below root that cannot be read is a warning, not an abort; root itself is an error.
    """
    files, top_folders, warnings = [], set(), []
    seen = set()  # (device, inode) of walked folders
    pending = [((), str(Path(root).absolute()), root_info)]
    while pending:
        parts, folder, info = pending.pop()
        shown = "/".join(parts) or "."
        if (info.st_dev, info.st_ino) in seen:
            warnings.append(f"folder {shown} was already listed through another path (a symlink loop?); skipped")
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as e:
            if not parts:  # the source itself: nothing could be listed
                raise PipelineError(f"source folder {root} cannot be read ({_stat_failure(e, folder)}); {_READABLE}") from None
            warnings.append(f"folder {shown} cannot be read ({_stat_failure(e, folder)}); skipped")
            continue
        if len(parts) == 1:
            top_folders.add(parts[0])
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = _text_of_name(entry.name)
            info, failure = _stat(entry.path)
            if info is not None and stat.S_ISDIR(info.st_mode):
                if entry.name in IGNORED_FOLDERS:
                    warnings.append(f"folder {'/'.join((*parts, name))} (macOS archive metadata) ignored")
                    continue
                folders.append(((*parts, name), entry.path, info))
            elif is_image_name(entry.name):
                files.append(((*parts, name), entry.path, _file_facts(info, failure)))
        pending.extend(reversed(folders))  # walked in name order
    return files, top_folders, warnings


def _file_facts(info, failure):
    """(size, mtime_ns, problem) from a stat result, or from the reason the stat failed."""
    return (info.st_size, info.st_mtime_ns, file_problem(info)) if info is not None else (0, 0, failure)


def _stat(path):
    """(os.stat result following symlinks, "") or (None, why it failed)."""
    try:
        return os.stat(path), ""
    except OSError as e:
        return None, _stat_failure(e, path)
    except ValueError:  # a NUL character, from a CSV
        return None, "invalid path (it contains a NUL character)"


def _stat_failure(error, path):
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(error, FileNotFoundError):
        return "dangling symlink" if os.path.islink(path) else "file not found"
    return (error.strerror or str(error)).lower()


def _list_csv(csv_path):
    base = csv_path.parent
    try:
        raw = csv_path.read_bytes()
    except OSError as e:
        raise PipelineError(f"CSV {csv_path} cannot be read ({(e.strerror or str(e)).lower()}); {_READABLE}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise PipelineError(
            f"CSV {csv_path} is not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} is not valid UTF-8; save it as UTF-8"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = reader.fieldnames or []
        if "path" not in columns:
            raise PipelineError(
                f"CSV {csv_path} needs a 'path' column (optional: label, split, id); found {', '.join(columns) or 'none'}"
            )
        rows = list(reader)
    except csv.Error as e:
        raise PipelineError(f"CSV {csv_path} line {reader.line_num} cannot be parsed: {e}") from None
    entries, found = [], {}
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
        if "\x00" in image_id:
            raise PipelineError(f"CSV {csv_path} line {line} has a NUL character in its id")
        label = (row.get("label") or "").strip() or None
        entries.append((image_id, label, SPLIT_NAMES.get(split_raw.lower(), "")))
        path = str((base / raw_path).absolute())
        found[image_id] = (path, *_file_facts(*_stat(path)))
    return _build_listing(csv_path, entries, found)


def _build_listing(root, entries, found, warnings=()):
    """`found` maps each id to (path, size, mtime_ns, problem)."""
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

    def record(image_id, name, split):
        path, size, mtime_ns, problem = found[image_id]
        return ImageRecord(image_id, path, index[name] if name is not None else UNLABELED, split, size, mtime_ns, problem)

    records = tuple(sorted((record(*entry) for entry in entries), key=lambda r: r.id))
    return Listing(str(root), records, classes, tuple(warnings))
