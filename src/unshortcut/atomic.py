"""Write folders and files so that a crash never leaves output that reads as complete.

Everything is built under a hidden temporary sibling and renamed into place at the
end; renames within one filesystem are atomic, so a reader sees either nothing or the
finished result. A folder that replaces another is swapped in with one atomic
exchange (``renameat2(RENAME_EXCHANGE)`` on Linux; two renames elsewhere).

Temporary siblings are named ``.NAME.tmp-<pid>@<host>-<random>`` (``old`` instead of
``tmp`` for a replaced folder on its way out), so a process killed with SIGKILL leaves
something recognisable: the next write of the same target removes the leftovers of
processes that are no longer alive on this machine and says so (a
:class:`LeftoverWarning`), and puts a replaced folder back when its successor never
arrived.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unshortcut.errors import UnshortcutError

#: Which machine wrote a temporary (pids mean nothing on another host of a shared disk).
HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8")).hexdigest()[:8]
_TEMPORARY = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[0-9a-f]{8})-[0-9a-z]+$"
)


class LeftoverWarning(UserWarning):
    """Temporary files of a killed earlier run were removed (or a folder restored)."""


def _umask() -> int:
    """The process umask (temporary files are created 0600/0700; results should not be)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_name(target: Path, kind: str = "tmp") -> str:
    """A hidden sibling name for ``target`` that says who made it and why."""
    return f".{Path(target).name}.{kind}-{os.getpid()}@{HOST_TAG}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """Temporaries in ``parent`` (of target ``name``, or of any) whose writer is dead.

    Only those written on this machine: a pid from another host says nothing here.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = []
    for entry in os.scandir(parent):
        match = _TEMPORARY.match(entry.name)
        if (
            match
            and (name is None or match["name"] == name)
            and match["host"] == HOST_TAG
            and not _alive(int(match["pid"]))
        ):
            found.append(Path(entry.path))
    return sorted(found)


def clean_leftovers(parent: Path, name: str | None = None) -> list[str]:
    """Remove dead writers' temporaries in ``parent``; return what was done, in words.

    A replaced folder (``old``) whose target no longer exists was caught between the
    two renames of a swap without ``renameat2``: it is put back instead of removed.
    """
    done = []
    for path in leftovers(parent, name):
        match = _TEMPORARY.match(path.name)
        assert match is not None
        target = path.with_name(match["name"])
        if match["kind"] == "old" and not target.exists():
            path.rename(target)
            done.append(f"restored {target} from {path.name}, left by a killed run")
            continue
        size = _size(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        done.append(f"removed {path} ({size / 2**20:.1f} MB), left by a killed run")
    return done


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size if path.exists() else 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _warn_leftovers(target: Path) -> None:
    for text in clean_leftovers(target.parent, target.name):
        warnings.warn(text, LeftoverWarning, stacklevel=4)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where that is unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def move_into_place(source: Path, target: Path) -> None:
    """Put folder ``source`` at ``target``, replacing what is there atomically.

    A reader of ``target`` sees the old folder or the new one, never neither (with
    ``renameat2``; elsewhere there is a moment between two renames, which
    :func:`clean_leftovers` repairs if the process dies in it).
    """
    source, target = Path(source), Path(target)
    if not target.exists():
        source.rename(target)
        return
    trash = target.with_name(temporary_name(target, "old"))
    if _exchange(source, target):
        source.rename(trash)
    else:
        target.rename(trash)
        source.rename(target)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False, clean: bool = True) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` only if the block succeeds.

    ``clean`` first removes leftovers of killed writers of the same target (off where a
    caller has already cleaned the whole parent).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise UnshortcutError(f"{target}: already exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    if clean:
        _warn_leftovers(target)
    tmp = target.with_name(temporary_name(target))
    tmp.mkdir(mode=0o777 & ~_umask())
    try:
        yield tmp
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if error.filename is None:  # a failed write names no file: name the folder
            raise OSError(error.errno, error.strerror, str(target)) from error
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, target)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` that replaces it only if the block succeeds.

    For files written in pieces (a memory map, an appended ``.npy``) rather than at once.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _warn_leftovers(target)
    tmp = target.with_name(temporary_name(target))
    try:
        tmp.touch(mode=0o666 & ~_umask(), exist_ok=False)
        yield tmp
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.filename is None:  # a failed write names no file: name the one meant
            raise OSError(error.errno, error.strerror, str(target)) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file and a rename."""
    with atomic_file(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # the rename must not outrun the data after a power cut


def atomic_write_text(target: Path, text: str) -> None:
    """Text twin of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(target, text.encode("utf-8"))
