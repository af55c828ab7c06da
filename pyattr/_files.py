"""Atomic file writes: a temporary file beside the target, then a rename (torch-free)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_beside(path: Path, suffix: str) -> Path:
    """An empty temporary file in ``path``'s folder (hidden, named after it), for :func:`publish`."""
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the permissions a plainly created file would have (``mkstemp`` makes it 0600),
    then rename it to ``path`` in one step: readers see the old file or the whole new one."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
