"""Atomic file writes: a temporary file beside the target, then a rename (torch-free).

Temporary files and staging folders carry the host name and process id of their writer
(``.<stem>.pyattr-<host>-<pid>-<random>``). A writer that is stopped by SIGTERM removes its own
(:func:`terminate_cleanly` turns SIGTERM into an exception, so ``finally`` blocks run); one killed
by SIGKILL cannot, and the next writer into the same folder removes what it left
(:func:`sweep_stale`: entries of this host whose process no longer exists).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import PyattrError


class Terminated(PyattrError):
    """Raised in the main thread when the process receives SIGTERM inside :func:`terminate_cleanly`
    (a :class:`PyattrError`: the CLIs report it as one ``pyattr: error:`` line and exit code 2)."""


def _tag() -> str:
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"
    return f"pyattr-{host}-{os.getpid()}-"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (True when it cannot be told: its files are then left alone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # exists, owned by someone else (or cannot tell): leave its files alone
    return True


def sweep_stale(folder: Path) -> list[Path]:
    """Remove the hidden temporary files and staging folders in ``folder`` that a pyattr process of this
    host left when it was killed (its process id no longer runs). Returns what was removed."""
    host = re.escape(_tag().split("-")[1])
    pattern = re.compile(rf"^\..*\.pyattr-{host}-(\d+)-[^/]*$")
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


_SWEPT: set[str] = set()  # folders this process has swept (once each: a folder of 10k outputs is listed once)
_SWEPT_LOCK = threading.Lock()


def _sweep_once(folder: Path) -> None:
    key = os.path.abspath(folder)
    with _SWEPT_LOCK:
        if key in _SWEPT:
            return
        _SWEPT.add(key)
    sweep_stale(folder)


def temp_beside(path: Path, suffix: str) -> Path:
    """An empty temporary file in ``path``'s folder (hidden, named after it), for :func:`publish`.
    Stale temporary files of killed writers in that folder are swept first (once per folder and process)."""
    path = Path(path)
    _sweep_once(path.parent)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.{_tag()}", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def written_atomically(path: Path, suffix: str) -> Iterator[Path]:
    """A :func:`temp_beside` file to write ``path``'s content into, published as ``path`` (:func:`publish`) when the block
    ends without an exception, removed in any case (a reader never sees a partial file)."""
    tmp = temp_beside(path, suffix)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def staging_folder(folder: Path, name: str = "run") -> Path:
    """A new hidden folder inside ``folder`` to write a command's outputs into before they are moved
    into place (:func:`publish`); stale staging folders of killed writers are swept first."""
    _sweep_once(folder)
    return Path(tempfile.mkdtemp(prefix=f".{name}.{_tag()}", dir=folder))


def publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the permissions a plainly created file would have (``mkstemp`` makes it 0600),
    then rename it to ``path`` in one step: readers see the old file or the whole new one."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (instead of ending the
    process on the spot), so ``finally`` blocks remove temporary files. Does nothing outside the main
    thread. The previous handler is restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated by SIGTERM; temporary files removed, nothing partial left")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
