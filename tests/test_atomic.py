"""Atomic outputs: the temp folder a killed writer left is removed by the next writer of the same
target — prepare's scratch file in it is as large as the data — and nothing a live writer, another
host or another target owns is touched."""

import os
import socket
import subprocess
import time
from pathlib import Path

from pipeline.atomic import atomic_path


def test_the_next_writer_removes_what_a_killed_writer_left_and_nothing_else(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs: a writer SIGKILLed mid-write
    host = socket.gethostname().replace(".", "-")
    abandoned = tmp_path / f".prepared.{gone.pid}@{host}.k1ll3d.tmp"
    (abandoned / "prepared").mkdir(parents=True)
    (abandoned / "prepared" / "decoded.scratch.npy").write_bytes(b"\0" * 4096)
    kept = [tmp_path / f".prepared.{os.getppid()}@{host}.l1ve.tmp",  # a writer still running
            tmp_path / f".prepared.{gone.pid}@another-host.n0de.tmp",  # shared storage: not ours to judge
            tmp_path / f".features.{gone.pid}@{host}.0ther.tmp"]  # another target's
    for folder in kept:
        folder.mkdir()

    with atomic_path(tmp_path / "prepared") as out:
        out.mkdir()
        (out / "images.npy").write_bytes(b"new")

    assert not abandoned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["prepared", *(k.name for k in kept)])
    assert (tmp_path / "prepared" / "images.npy").read_bytes() == b"new"


def test_a_killed_writer_not_yet_reaped_counts_as_gone(tmp_path):
    zombie = subprocess.Popen(["true"])  # exits at once; not waited for, so it stays a zombie
    host = socket.gethostname().replace(".", "-")
    abandoned = tmp_path / f".features.{zombie.pid}@{host}.z0mb1e.tmp"
    abandoned.mkdir()
    for _ in range(200):  # until it has exited (its /proc state turns to Z)
        if Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.01)
    with atomic_path(tmp_path / "features") as out:
        out.mkdir()
    assert not abandoned.exists()
    zombie.wait()
