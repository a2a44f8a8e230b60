"""Atomic outputs: write beside the target, fsync, rename. A killed stage leaves no half file, and
what a SIGKILLed writer left beside it is removed by the next writer of the same target."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _writer_tag() -> str:
    """Who writes a temp folder: this host and process (dots kept out: they separate the name)."""
    return f"{os.getpid()}@{socket.gethostname().replace('.', '-')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    with contextlib.suppress(OSError, IndexError):  # a killed process its parent has not reaped yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def remove_abandoned(target: Path) -> None:
    """Remove the temp folders of target's writers that were killed mid-write (SIGKILL skips the
    clean-up in atomic_path, and prepare's scratch file is as large as the data): those of this
    host whose process is gone. A live writer's, or another host's, are left alone."""
    host = _writer_tag().split("@", 1)[1]
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        writer = leftover.name[len(target.name) + 2 :].split(".", 1)[0]  # "<pid>@<host>"
        pid, _, on_host = writer.partition("@")
        if pid.isdigit() and on_host == host and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path in target's folder; on success it replaces target (file or folder)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)
    temp_dir = tempfile.mkdtemp(prefix=f".{target.name}.{_writer_tag()}.", suffix=".tmp", dir=target.parent)
    tmp = Path(temp_dir) / target.name
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            _remove(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            _remove(old)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(target: Path, data) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
