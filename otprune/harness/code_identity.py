"""Which otprune a child imports, and the identity of the code that decides its results: the
pruning code's content hash and the versions of torch, transformers, lmms-eval and llava-torch (the
ones compared, otprune.harness.records.CODE_KEYS), with otprune's version for the reader, all as
the child's interpreter sees them. Every record holds it; a record of other
code is not taken for a finished run of this one (otprune.harness.records.same_code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from otprune.harness import resources

# The modules whose source decides what a pruned run computes (the packages otprune.patches and
# otprune.plugins: every file of them). An outside plugin's package is named in the run's setting.
PRUNING_CODE = (
    "otprune.patches",
    "otprune.plugins",
    "otprune.methods",
    "otprune.contract",
    "otprune.selectors",
    "otprune.selection",
    "otprune.prune_config",
    "otprune.measures",
    "otprune.sample_timer",
    "otprune.greedy_triton",
    "otprune.checks",
    "otprune.stack",
)

_PROBE = (
    f"MODULES = {PRUNING_CODE!r}\n"
    + """
import hashlib, importlib.metadata as md, importlib.util, json, pathlib
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
def code_sha256():
    # The code that decides a run's result: the patches and the otprune modules they import.
    files = []
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            return None
        folder = pathlib.Path(spec.origin).parent
        files += sorted(folder.glob("*.py")) if name in ("otprune.patches", "otprune.plugins") else [pathlib.Path(spec.origin)]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\\0" + path.read_bytes() + b"\\0")
    return digest.hexdigest()[:16]
try:
    code = code_sha256()
except (ImportError, OSError):
    code = None
print(json.dumps({"entry_point": eps[0] if eps else None, "otprune": origin("otprune"),
                  "patches": origin("otprune.patches"), "version": version("otprune"),
                  "code": {"otprune": version("otprune"), "code_sha256": code, "torch": version("torch"),
                           "transformers": version("transformers"), "lmms_eval": version("lmms_eval"),
                           "llava": version("llava-torch")}}))
"""
)


def otprune_copy(env: dict) -> dict:
    """Which otprune a child started with ``env`` imports, its version and entry point, and the
    checkout's commit (``+dirty`` with uncommitted changes; None when not run from a checkout)."""
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=resources.ROOT, capture_output=True, text=True, timeout=120)
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
