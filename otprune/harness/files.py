"""Files the harness writes and reads: atomically replaced JSON, and their digests."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path


class LeaseLost(OSError):
    """A write under a runs folder whose lease another harness took over (otprune.harness.folder_lock)."""


# Runs folders this process no longer holds -> why: nothing more is written under them.
_LOST: dict[Path, str] = {}


def refuse_writes_under(folder: Path, why: str) -> None:
    """From now on, :func:`write_atomically` under ``folder`` raises :class:`LeaseLost` with ``why``."""
    _LOST[Path(folder).resolve()] = why


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part (a crash leaves a hidden .tmp).
    Raises :class:`LeaseLost` under a runs folder whose lease this process lost."""
    target = Path(path).resolve()
    for folder, why in list(_LOST.items()):
        if target.is_relative_to(folder):
            raise LeaseLost(f"not writing {path}: {why}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_results(path: Path) -> dict:
    """A JSON object written by a run (lmms-eval's results, a setting, a child's pid), or ``{}``
    when it is unreadable, cut short by a crash, or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_type(value) -> str:
    return "null" if value is None else type(value).__name__
