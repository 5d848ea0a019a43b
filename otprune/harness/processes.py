"""The lmms-eval children of this process, each the leader of its own process group, stopped with
it; and the children of earlier harnesses still alive on this host."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from otprune.harness import resources
from otprune.harness.files import read_results, write_atomically
from otprune.harness.records import record_path


def slurm_job_id() -> str | None:
    """The Slurm job this process runs in, as squeue names it (``A_i`` for an array's task)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _group_alive(child: dict) -> bool:
    """Whether the child's process group still has a process (and its leader, if any, is that child)."""
    try:
        os.killpg(int(child["pgid"]), 0)
    except (ProcessLookupError, PermissionError, KeyError, TypeError, ValueError):
        return False
    try:
        cmdline = Path(f"/proc/{int(child['pgid'])}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return any(part.endswith(b"lmms_eval") for part in cmdline)


def stale_children(runs_label_dir: Path) -> list[dict]:
    """lmms-eval children of earlier harnesses still running: an attempt folder with a ``child.json``
    whose process group lives and that has no record (the harness died before writing it)."""
    stale = []
    for path in sorted(runs_label_dir.glob("*/*/attempts/*/child.json")):
        attempt = path.parent
        run_folder = attempt.parent.parent
        if record_path(run_folder, attempt.name).exists():
            continue
        child = read_results(path)
        # A Slurm job's child (on this host or another) is the scheduler's to report.
        if child and child.get("executor") != "slurm" and child.get("host", socket.gethostname()) == socket.gethostname() and _group_alive(child):
            stale.append({**child, "folder": str(run_folder), "attempt": str(attempt)})
    return stale


# Sets the child's parent-death signal, then becomes the command: a harness killed with SIGKILL
# takes its children along (Linux; elsewhere the start-up check reports them).
_EXEC_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class Children:
    """The live lmms-eval children of this harness, each the leader of its own process group."""

    def __init__(self, executor: str = "local"):
        self.executor = executor
        self._lock = threading.Lock()
        self._groups: dict[int, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.stop_reason = ""
        self.stop_signal = 0

    def start(self, cmd: list[str], env: dict, log, attempt: Path, tasks) -> subprocess.Popen | None:
        """Start ``cmd`` in a new session; ``None`` once the harness is stopping."""
        launcher = [sys.executable, "-c", _EXEC_WITH_PARENT, str(os.getpid())] if sys.platform.startswith("linux") else []
        with self._lock:
            if self.stopping.is_set():
                return None
            process = subprocess.Popen(launcher + cmd, cwd=resources.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._groups[process.pid] = process
        write_atomically(
            attempt / "child.json",
            json.dumps(
                {
                    "pid": process.pid,
                    "pgid": process.pid,
                    "host": socket.gethostname(),
                    "executor": self.executor,
                    "slurm_job_id": slurm_job_id(),
                    "tasks": list(tasks),
                    "cmd": cmd,
                }
            )
            + "\n",
        )
        return process

    def finished(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._groups.pop(process.pid, None)

    def stop(self, reason: str, grace: float = 10.0) -> int:
        """Stop every child's process group (SIGTERM, SIGKILL after ``grace`` s); returns how many."""
        with self._lock:
            self.stopping.set()
            self.stop_reason = reason
            groups = list(self._groups)
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_group_exists(g) for g in groups):
            time.sleep(0.1)
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)
        return len(groups)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
