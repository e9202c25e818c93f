"""Writes that never tear: every file or folder a user keeps (checkpoints, block stores, libraries, reports,
plots, cost tables, benchmark results) is written under a temporary name beside its target and renamed into
place once complete (STYLE 15). A crash, Ctrl-C or a full disk leaves the whole old version or the whole new
one, never half of one, and no temporary left behind.

Beside the target, so the rename stays on one file system (os.replace is atomic there, on POSIX and Windows).
Flushed to disk before the rename: without fsync, a crash soon after can leave the new name on blocks that
were never written (ext4's delayed allocation).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path


def _temporary(path: Path, kind: str) -> Path:
    """A hidden name beside `path`, unique to this write; the suffix is kept (savefig picks the format by it)."""
    return path.with_name(f".{path.stem}.{kind}-{secrets.token_hex(4)}{path.suffix}")


def _sync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write the file at `path` to; renamed onto `path` when the block ends cleanly,
    removed when it raises (any old file at `path` is then untouched). A symbolic link at `path` is kept: the
    file it names is replaced, as a plain write through the link would (`replaced_folder` keeps links too)."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, "tmp")
    try:
        yield tmp
        _sync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: done once, at import, before any thread writes files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def default_mode(path: str | Path) -> Path:
    """Give `path` the permissions a plain open() would (0o666 less the umask): safetensors' save_file creates its
    files readable by their owner alone (0600), so a checkpoint saved over another (0644) became unreadable to a
    server running as another user."""
    os.chmod(path, 0o666 & ~_UMASK)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`text` UTF-8 encoded at `path`, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def replaced_folder(target: str | Path) -> Iterator[Path]:
    """A fresh folder beside `target` to write a whole folder into (a checkpoint, a fusion output). When the
    block ends cleanly it replaces `target` whole: the old folder is renamed aside, the new one into place,
    the old one deleted. So at every moment `target` holds the old folder or the new one (for the instant
    between the two renames the old one sits at `.<name>.old-<hex>`). When the block raises, the new folder is
    removed and `target` is as it was. A symlink at `target` keeps pointing where it did; that folder is
    replaced."""
    target = Path(target)
    target = target.resolve() if target.is_symlink() else target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    new = _temporary(target, "tmp")
    new.mkdir()
    try:
        yield new
        for file in new.rglob("*"):
            if file.is_file() and not file.is_symlink():
                _sync(file)
        _swap(new, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def _swap(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = _temporary(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    try:
        shutil.rmtree(old)
    except OSError as e:  # the new folder is in place: a leftover is worth a warning, not a failure
        warnings.warn(f"{target}: written, but its previous version at {old} could not be deleted ({e})", stacklevel=4)
