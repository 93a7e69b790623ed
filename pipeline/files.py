"""Every write that must be all-or-nothing, and the locks that keep two writers apart.

A crash at any moment leaves either the old file (or directory) or the complete new one:
new content goes to a uniquely named hidden sibling first and is renamed into place. Unique
temp names mean that two processes never share (or delete) each other's half-written files.
The new content is fsynced before the rename and the directory after it (`durable_replace`),
so a power loss, not only a killed process, keeps what was renamed into place.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError

# .<name>.pipeline-<host>-<pid>.<8 hex>.tmp: what temp_sibling makes. The marker tells them from a user's own files
# (a `.thesis.123.abcdef12.tmp` is not ours); host and pid tell whether their writer is provably dead.
_TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.pipeline-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
# errno values of a write that fails for lack of room or rights, not because of a bug
STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class LockBusy(PipelineError):
    """`locked` without `wait` found the lock held by another process."""


def host_tag(hostname=None):
    """8 hex digits naming this machine (or `hostname`) in temp names: a pid means something only on its own host."""
    return hashlib.sha256((hostname or socket.gethostname()).encode()).hexdigest()[:8]


def temp_sibling(path, pid=None):
    """A unique hidden path next to `path`, for content that will be renamed onto it (`pid`: the writer's, default ours)."""
    path = Path(path)
    return path.with_name(f".{path.name}.pipeline-{host_tag()}-{pid or os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_temp(name):
    """Whether a file name is one temp_sibling makes (its writer alive or not)."""
    return _TEMP_PATTERN.match(name) is not None


def leftover_temps(directory, name=None):
    """Temp files and dirs that temp_sibling made in `directory` whose writer is provably dead; only those for `name` if given.

    Provably dead: made on this host by a process that no longer exists. A temp of a live process
    (another command at work), or from another host sharing the directory, is never returned.
    """
    found = ((p, _TEMP_PATTERN.match(p.name)) for p in Path(directory).iterdir())
    return sorted(p for p, match in found if match and name in (None, match["name"]) and _dead_here(match))


def _dead_here(match):
    """Whether the writer a temp name records ran on this host and no longer exists."""
    if match["host"] != host_tag():
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except OverflowError:  # no process can have such a pid
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def file_sha256(path, size, mtime_ns):
    """sha256 (hex) of a file's bytes, or "" when it cannot be read or no longer has this `size` and `mtime_ns`.

    The stat is checked after reading, so a file rewritten while it was hashed is not given the
    new content's hash under the old stat.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        info = os.stat(path)
    except (OSError, ValueError):
        return ""
    return digest.hexdigest() if (info.st_size, info.st_mtime_ns) == (int(size), int(mtime_ns)) else ""


def lock_beside(path):
    """The lock file of an output that is replaced by renaming (so a lock inside it would move away with it)."""
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def storage_errors(what, remedy):
    """Turn a write that fails for lack of room or rights into one sentence: `what` could not be written; `remedy`."""
    try:
        yield
    except OSError as e:
        if e.errno not in STORAGE_ERRORS:
            raise
        raise PipelineError(f"cannot write {what}: {STORAGE_ERRORS[e.errno]}; {remedy}") from None


def remove(path):
    """Delete a file or a directory tree; a missing one is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def durable_replace(new, path):
    """Rename the file or directory `new` onto `path` so that the result survives a power loss.

    A rename alone is not durable: the kernel may write the new name to disk before the data it
    names. So `new` (for a directory, every file and directory in it) is fsynced first, then
    renamed, then the parent directory, which holds the new name, is fsynced.
    """
    new, path = Path(new), Path(path)
    sync_tree(new)
    os.replace(new, path)
    _fsync(path.parent, directory=True)


def sync_tree(path):
    """fsync a file, or every file and directory in a directory tree, so that its bytes are on disk."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        _fsync(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(os.path.join(root, name))
        _fsync(root, directory=True)


def _fsync(path, directory=False):
    """fsync `path` through a read-only descriptor (Linux flushes the file's data whichever descriptor asks)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP)):  # some filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; rename it over `path` (durably) only if the block succeeds."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield an empty sibling directory that replaces `path` only when the block succeeds.

    An existing `path` is renamed aside before the new one is renamed in, so a crash leaves the
    old directory, the new one, or none (which a rerun recomputes), never a mix.
    """
    path = Path(path).absolute()
    staging = temp_sibling(path)
    staging.mkdir(parents=True)
    try:
        yield staging
        replace_dir(staging, path)
    finally:
        remove(staging)


def replace_dir(new, path):
    """Rename the directory `new` to `path` (durably); an existing `path` is renamed aside first and deleted afterwards."""
    path = Path(path)
    if not path.exists():
        durable_replace(new, path)
        return
    old = temp_sibling(path)
    path.rename(old)
    try:
        durable_replace(new, path)
    except BaseException:
        if not path.exists():
            old.rename(path)  # put the old directory back rather than leave none
        raise
    remove(old)


def swap_dir(new, path):
    """Put the directory `new` in the place of the existing directory `path` in one atomic step, then delete the old one.

    Linux swaps the two names at once (renameat2 RENAME_EXCHANGE), so a reader or a crash sees
    the old directory or the new one, never none. Where the system cannot, `replace_dir` does it
    in two renames.
    """
    new, path = Path(new), Path(path)
    sync_tree(new)
    if not _exchange(new, path):
        replace_dir(new, path)
        return
    _fsync(path.parent, directory=True)
    remove(new)  # now the old directory


def _exchange(a, b):
    """Swap the paths `a` and `b` atomically; False where the system has no such call."""
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a filesystem or kernel without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_json(path, obj):
    """Write `obj` as indented, strict JSON (no NaN), atomically."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path):
    return json.loads(Path(path).read_text())


def make_dir(path, what="output directory"):
    """mkdir -p with one clear sentence when it cannot be made (a file in the way, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PipelineError(f"{what} {path} cannot be made: {path} or one of its parents is a file") from None
    except OSError as e:
        raise PipelineError(f"{what} {path} cannot be made: {e.strerror}") from None
    return path


@contextlib.contextmanager
def locked(lock_file, what, *, shared=False, wait=False):
    """Hold an advisory lock (fcntl.flock) on `lock_file` for the block.

    `what` names the thing guarded in the error. Without `wait`, a lock held by another process
    fails at once naming that process. The kernel drops a dead process's lock, so a lock file
    left by a killed run is simply taken over. Shared holders exclude exclusive ones only.
    """
    lock_file = Path(lock_file)
    try:
        handle = open(lock_file, "a+b", buffering=0)  # unbuffered: nothing is left to flush (and fail) at close
    except OSError as e:
        raise PipelineError(f"cannot write to {lock_file.parent} ({e.strerror}); {what} needs a writable directory") from None
    with handle:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(handle, mode if wait else mode | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            handle.seek(0)
            holder = handle.read().decode(errors="replace").strip() or "another process"
            raise LockBusy(
                f"{what} is in use by {holder} (lock {lock_file}); wait for it to finish or stop it, then rerun"
            ) from None
        try:
            handle.truncate(0)
            handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, only without the note of who holds it
        yield


DIR_LOCK_NAME = ".pipeline.lock"  # the lock inside an output directory whose files are written in place


@contextlib.contextmanager
def output_guard(
    path: Path | str, what: str, *, into: bool = False, lock_file: Path | None = None, shared: bool = False, wait: bool = False
) -> Iterator[None]:
    """Hold the output `path` for the block: the lock's folder made, the lock taken, a killed writer's temps removed.

    `what` names the output in the errors. The lock is `lock_file`, by default beside `path` (an
    output replaced by renaming) or, with `into` (a directory whose files are written in place),
    inside it. Holding the lock exclusively, this process is the one writer, so the temp files a
    killed writer left are removed: those of `path` beside it, or with `into` every one in it.
    Shared holders (tasks of one job array) remove nothing.
    """
    path = Path(path)
    lock_file = Path(lock_file or (path / DIR_LOCK_NAME if into else lock_beside(path)))
    make_dir(lock_file.parent, "--out" if lock_file.parent == path else "--out's folder")
    with locked(lock_file, what, shared=shared, wait=wait):
        if not shared:
            if into:
                leftovers = leftover_temps(path) if path.is_dir() else []
            else:
                leftovers = leftover_temps(path.parent, path.name)
            for leftover in leftovers:
                remove(leftover)
        yield


def check_space(path: Path | str, needed: int, what: str, freeable: int = 0, freed_by: str = "the old output") -> None:
    """Fail before computing when `needed` bytes will not fit where `path` goes (HDF5 cannot recover from a disk that fills mid-file).

    `what` says what needs them ("2 shards need"); `freeable` bytes, which `freed_by` frees once
    replaced but holds now, count as free.
    """
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free + freeable:
        also = f" (plus {_mib(freeable)} MiB {freed_by} would free)" if freeable else ""
        raise PipelineError(
            f"{what} about {_mib(needed)} MiB but only {_mib(free)} MiB are free{also} where {path} goes; "
            "free space (or use another --out) and rerun"
        )


def _mib(size):
    return f"{size / 2**20:,.{0 if size >= 2**20 else 1}f}"
