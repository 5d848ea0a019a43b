"""One writer per runs folder, also across hosts that share the folder over a network filesystem.

Two locks, because neither holds everywhere: ``.lock`` is a kernel lock (flock), dropped however
the holder ends, but on some network filesystems local to each host; ``.lease.json`` names the
holder's host and pid, is created exclusively (atomic on NFS too), and is renewed every
``RENEW_S`` seconds while the holder lives, so that a host that died without removing it does not
block the folder for longer than ``LEASE_S``. (Two hosts taking over the same stale lease within
the same milliseconds could both succeed: reading, removing and creating it are three steps. A
renewal that races a take-over, between its read and its write, overwrites it once; the new
holder's next renewal then finds the lease not its own and stops: one of the two goes on.)
A holder that finds its lease taken over writes nothing more there and stops (``FolderLock._lose``).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from otprune.harness.files import read_results, refuse_writes_under, write_atomically

LEASE_S = 120.0
RENEW_S = 20.0


class FolderBusy(RuntimeError):
    """Another harness holds the runs folder."""


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def _holder(lease: dict) -> str:
    age = time.time() - float(lease.get("renewed", 0))
    return f"host {lease.get('host')}, pid {lease.get('pid')}, started {lease.get('started')}, renewed {age:.0f} s ago"


class FolderLock:
    """Held from construction to :meth:`release` (or the process's end)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.lease_path = folder / ".lease.json"
        self.handle = open(folder / ".lock", "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise FolderBusy(f"another harness is writing to {folder} ({holder}); wait for it to finish or stop it, then run again") from None
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {self.me['pid']} on {self.me['host']}, started {self.me['started']}")
        self.handle.flush()
        try:
            self._take_lease(folder)
        except BaseException:
            self.handle.close()
            raise
        self.lost: str | None = None
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True)
        self._renewer.start()

    def _take_lease(self, folder: Path) -> None:
        lease = read_results(self.lease_path)
        if lease:
            fresh = time.time() - float(lease.get("renewed", 0)) < LEASE_S
            here = lease.get("host") == self.me["host"]
            # On this host the kernel lock already answered; a fresh lease of a live pid here is a
            # filesystem whose locks do not hold, a stale one a dead harness whose pid was reused.
            if fresh and (not here or (lease.get("pid") != self.me["pid"] and _alive(lease.get("pid")))):
                raise FolderBusy(f"another harness is writing to {folder} ({_holder(lease)}); wait for it to finish or stop it, then run again")
            self.lease_path.unlink(missing_ok=True)
        try:
            fd = os.open(self.lease_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise FolderBusy(f"another harness took {folder} at the same moment ({_holder(read_results(self.lease_path))}); run again later") from None
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps({**self.me, "renewed": time.time()}) + "\n")

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            holder = read_results(self.lease_path)
            if (holder.get("host"), holder.get("pid")) != (self.me["host"], self.me["pid"]):
                self._lose(holder)
                return
            try:
                write_atomically(self.lease_path, json.dumps({**self.me, "renewed": time.time()}) + "\n")
            except OSError as error:
                print(f"warning: cannot renew the lease {self.lease_path} ({error.strerror}); trying again in {RENEW_S:.0f} s", file=sys.stderr, flush=True)

    def _lose(self, holder: dict) -> None:
        """Another harness took the lease over (this one stalled past ``LEASE_S``): from now on it
        writes nothing there, and the process stops as on SIGTERM (the local executor stops its
        children; without a handler the process ends), so that one harness writes, not two."""
        folder = self.lease_path.parent
        self.lost = f"the lease of {folder} was taken over by another harness ({_holder(holder)})"
        refuse_writes_under(folder, self.lost)
        print(f"error: {self.lost}; this harness stops submitting and writing there now. Its finished runs are kept", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    def release(self) -> None:
        self._stop.set()
        self._renewer.join()
        lease = read_results(self.lease_path)
        if lease.get("pid") == self.me["pid"] and lease.get("host") == self.me["host"]:
            self.lease_path.unlink(missing_ok=True)
        self.handle.close()


def lock_runs_folder(folder: Path) -> FolderLock:
    """Hold ``folder`` for this harness; raises ``FolderBusy`` naming the holder (host, pid)."""
    return FolderLock(folder)
