"""Which otprune a child imports, and the identity of the code that decides its results: the
content hash of the files a run loads (otprune.harness.loaded_code: otprune's modules it imports,
the task folders) and the versions of torch, transformers, lmms-eval and llava-torch (the
ones compared, otprune.harness.records.CODE_KEYS), with otprune's version for the reader, all as
the child's interpreter sees them. Every record holds it; a record of other
code is not taken for a finished run of this one (otprune.harness.records.same_code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from otprune.harness import resources

_PROBE = """
import importlib.metadata as md, importlib.util, json, pathlib, sys
eps = [e.value for e in md.entry_points(group="lmms_eval.models") if e.name == "otprune"]
def origin(name):
    try:
        spec = importlib.util.find_spec(name)
    except ImportError as error:
        return "not importable: %s" % error
    return spec.origin if spec else None
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
try:
    # The child's own otprune tells which of its files decide a run (an older one cannot: None).
    from otprune.harness.loaded_code import code_sha256
    code = code_sha256(pathlib.Path(folder) for folder in sys.argv[1:])
except (ImportError, OSError, SyntaxError):
    code = None
print(json.dumps({"entry_point": eps[0] if eps else None, "otprune": origin("otprune"),
                  "patches": origin("otprune.patches"), "version": version("otprune"),
                  "code": {"otprune": version("otprune"), "code_sha256": code, "torch": version("torch"),
                           "transformers": version("transformers"), "lmms_eval": version("lmms_eval"),
                           "llava": version("llava-torch")}}))
"""


def task_folders() -> list[Path]:
    """The task folders a child's lmms-eval may read (each ``include_path`` of the task catalogue)."""
    return sorted({resources.ROOT / spec["include_path"] for spec in resources.load_catalogue().values() if "include_path" in spec})


def otprune_copy(env: dict) -> dict:
    """Which otprune a child started with ``env`` imports, its version and entry point, and the
    checkout's commit (``+dirty`` with uncommitted changes; None when not run from a checkout)."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _PROBE, *map(str, task_folders())], env=env, cwd=resources.ROOT, capture_output=True, text=True, timeout=120
        )
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, IndexError, json.JSONDecodeError):
        info = {"entry_point": None, "otprune": None, "patches": None, "version": None, "code": None}
    info["checkout_commit"] = None
    checkout = resources.CHECKOUT
    if checkout is not None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=30).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True, timeout=30).stdout.strip()
            info["checkout_commit"] = (commit + ("+dirty" if dirty else "")) or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def describe_copy(info: dict) -> list[str]:
    """What to tell the user about the otprune a child imports (warnings first)."""
    lines = []
    here = resources.CHECKOUT or resources.PACKAGE
    install = f"pip install -e {resources.CHECKOUT} with {sys.executable}" if resources.CHECKOUT else f"install otprune for {sys.executable}"
    patches = info.get("patches") or ""
    if not info.get("entry_point"):
        lines.append(
            f"warning: no otprune distribution is installed for {sys.executable}, so lmms-eval will not load its "
            f"entry point and pruning runs will fail their check; {install}"
        )
    elif not patches.endswith(".py"):
        lines.append(
            f"warning: otprune.patches is not importable by {sys.executable} (otprune comes from {info.get('otprune')}), "
            f"so lmms-eval cannot load the pruning entry point and pruning runs will fail their check; {install}"
        )
    elif not patches.startswith(str(here)):
        lines.append(f"warning: the child imports otprune.patches from {patches}, not from this otprune ({here})")
    lines.append(f"otprune in the child: {info.get('otprune')} (version {info.get('version')}, checkout {info.get('checkout_commit')})")
    return lines


def current_code() -> dict | None:
    """The code identity of a child this otprune would start now (``None`` when it cannot tell)."""
    return otprune_copy(resources.checkout_first(dict(os.environ))).get("code")
